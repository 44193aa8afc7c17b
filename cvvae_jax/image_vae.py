"""`ImageVAE`: the Stable Diffusion image VAE (diffusers `AutoencoderKL`) in Flax.

Images are channels-last (B, H, W, 3). It is CV-VAE's frozen regulariser: the
video latents must decode with this model's decoder. Same API as `CVVAE`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from . import nets_diffusers
from .conv_kits import ImageKit
from .model_config import ImageVAEConfig
from .posterior import DiagonalGaussian
from .pretrained import PIXEL_MAX_ABS, Pretrained, bound_part, check_pixels


class ImageVAE(Pretrained):
    """(B, H, W, 3) <-> (B, H/8, W/8, latent_channels)."""

    CONFIG_CLASSES = (ImageVAEConfig,)

    def __init__(self, config: ImageVAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        kit = ImageKit(dtype, param_dtype)
        common = dict(block_out_channels=config.block_out_channels,
                      layers_per_block=config.layers_per_block, groups=config.norm_num_groups,
                      act_fn=config.act_fn, mid_attention=config.mid_block_add_attention, rngs=rngs)
        no_time = [False] * config.levels
        z = config.latent_channels
        self.encoder = nets_diffusers.Encoder(kit, in_channels=config.in_channels, out_channels=z,
                                              time_down=no_time, **common)
        self.decoder = nets_diffusers.Decoder(kit, in_channels=z, out_channels=config.out_channels,
                                              time_up=no_time, **common)
        self.quant_conv = kit.main(2 * z, 2 * z, 1, rngs) if config.use_quant_conv else None
        self.post_quant_conv = kit.main(z, z, 1, rngs) if config.use_post_quant_conv else None

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def encode_moments(self, x: jax.Array) -> jax.Array:
        h = self.encoder(x.astype(self.dtype))
        return h if self.quant_conv is None else self.quant_conv(h)

    def decode_latents(self, z: jax.Array) -> jax.Array:
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode(self, x) -> DiagonalGaussian:
        """(B, H, W, 3) in [-1, 1] -> posterior over (B, H/8, W/8, latent_channels)."""
        x = check_pixels(x, name="encode", rank=4, channels=self.config.in_channels,
                         layout="(B, H, W, C)", max_abs=PIXEL_MAX_ABS)
        s = self.config.space_factor
        if x.shape[1] % s or x.shape[2] % s:
            raise ValueError(f"encode: H x W = {x.shape[1]} x {x.shape[2]}; both must be "
                             f"multiples of {s}")
        return DiagonalGaussian.from_moments(bound_part(self, "encode_moments")(x))

    def decode(self, z) -> jax.Array:
        """(B, h, w, latent_channels) -> (B, 8h, 8w, 3) pixels (compute dtype)."""
        z = check_pixels(z, name="decode", rank=4, channels=self.latent_channels,
                         layout="(B, h, w, C)")
        return bound_part(self, "decode_latents")(z)

