"""`CVVAE`: the public video VAE API (encode to a posterior, decode to pixels).

Both official variants live behind this one class; `from_pretrained` picks the
network from config.json's `_class_name`:
- `CVVAEModel` (v1, SD2.1-compatible, 4 latent channels): `nets_v1`;
- `CVVAESD3Model` (16 latent channels): `nets_diffusers` with 3D convs.

`encode`/`decode` take and return channels-last arrays, check their input, and
run the official frame chunking and spatial tiling of config.json around a
jitted network call (`tiling.py`). Inside your own jitted code (training), call
`encode_moments`/`decode_latents`, which run the network on the whole input.
"""

from __future__ import annotations

import itertools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from . import inflate, nets_diffusers, nets_v1, tiling
from .conv_kits import SD3Kit
from .model_config import CVVAEConfig, CVVAESD3Config, frame_count_problem
from .posterior import DiagonalGaussian
from .pretrained import PIXEL_MAX_ABS, Pretrained, bound_part, check_pixels

# Called with (chunks done, chunks in all) after each frame chunk has been computed.
Progress = Callable[[int, int], None]


class CVVAE(Pretrained):
    """The CV-VAE video VAE: (B, 1 + 4k, H, W, 3) <-> (B, 1 + k, H/8, W/8, C)."""

    CONFIG_CLASSES = (CVVAEConfig, CVVAESD3Config)

    def __init__(self, config: CVVAEConfig | CVVAESD3Config, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        if isinstance(config, CVVAEConfig):
            self.encoder = nets_v1.Encoder(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.decoder = nets_v1.Decoder(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            common = dict(block_out_channels=config.block_out_channels,
                          layers_per_block=config.layers_per_block, groups=config.norm_num_groups,
                          act_fn=config.act_fn, mid_attention=config.mid_block_add_attention, rngs=rngs)
            time = config.time_down_levels()
            self.encoder = nets_diffusers.Encoder(
                SD3Kit(dtype, param_dtype, causal=config.causal_encoder, half_3d=config.half_3d),
                in_channels=config.in_channels, out_channels=config.out_channels,
                time_down=time, **common)
            self.decoder = nets_diffusers.Decoder(
                SD3Kit(dtype, param_dtype, causal=config.causal_decoder, half_3d=config.half_3d),
                in_channels=config.out_channels, out_channels=config.in_channels,
                time_up=time, **common)

    @classmethod
    def from_image_vae(cls, image_vae, *, seed: int = 0, param_dtype=jnp.float32, **config_overrides):
        """A v1 CV-VAE inflated from an `ImageVAE` (SD 2.1 layout); see `inflate.py`.

        `config_overrides` set CVVAEConfig fields the image VAE does not determine
        (e.g. `en_de_n_frames_a_time`, `tile_spatial_size`).
        """
        return inflate.inflate(cls, image_vae, seed=seed, param_dtype=param_dtype,
                               **config_overrides)

    # -- network calls for jitted user code -------------------------------------------------

    def encode_moments(self, x: jax.Array) -> jax.Array:
        """Encoder output (mean and log-variance concatenated on the channel axis)."""
        return self.encoder(x.astype(self.dtype))

    def decode_latents(self, z: jax.Array) -> jax.Array:
        return self.decoder(z.astype(self.dtype))

    # -- the checked, chunked and tiled API -----------------------------------------------

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def _check_video(self, x) -> jax.Array:
        cfg = self.config
        x = check_pixels(x, name="encode", rank=5, channels=cfg.in_channels, layout="(B, T, H, W, C)",
                         max_abs=PIXEL_MAX_ABS)
        _, t, h, w, _ = x.shape
        problem = frame_count_problem(t, cfg.time_factor)
        if problem:
            raise ValueError(f"encode: T={t} frames; {problem}; trim or pad the clip first")
        s = cfg.space_factor
        if h % s or w % s:
            raise ValueError(f"encode: H x W = {h} x {w}; both must be multiples of {s} "
                             f"(e.g. {h - h % s} x {w - w % s}); resize or crop first")
        return x

    def _pieces(self, method: str, x: jax.Array, *, encode: bool, progress=None) -> jax.Array:
        """`method` run over the official frame chunks and spatial tiles of x."""
        cfg = self.config
        plan = None
        if cfg.tile_spatial_size is not None:
            make = tiling.TilePlan.for_encode if encode else tiling.TilePlan.for_decode
            plan = make(cfg.tile_spatial_size, cfg.space_factor, cfg.tile_overlap_ratio)
        per_chunk = cfg.encode_frames_per_chunk if encode else cfg.decode_frames_per_chunk
        net = bound_part(self, method)
        tick = None
        if progress is not None:
            pieces = len(tiling.chunk_bounds(x.shape[1], per_chunk)) * (
                plan.count(x.shape[2], x.shape[3]) if plan else 1)
            done = itertools.count(1)

            def tick():
                progress(next(done), pieces)

        return tiling.chunked(lambda c: tiling.tiled(net, c, plan, tick), x, per_chunk)

    def encode(self, x, progress: Progress | None = None) -> DiagonalGaussian:
        """(B, 1 + 4k, H, W, 3) in [-1, 1] -> posterior over (B, 1 + k, H/8, W/8, C).

        `progress(done, total)` is called after each piece, a spatial tile of a frame chunk
        (e.g. a tqdm update).
        """
        moments = self._pieces("encode_moments", self._check_video(x), encode=True,
                               progress=progress)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z, progress: Progress | None = None) -> jax.Array:
        """(B, 1 + k, h, w, C) latents -> (B, 1 + 4k, 8h, 8w, 3) pixels (compute dtype)."""
        z = check_pixels(z, name="decode", rank=5, channels=self.latent_channels,
                         layout="(B, T, h, w, C)")
        return self._pieces("decode_latents", z, encode=False, progress=progress)

    def reconstruct(self, x, key: jax.Array | None = None) -> jax.Array:
        """decode(encode(x)), from the posterior mode or, given a key, a sample."""
        post = self.encode(x)
        return self.decode(post.mode() if key is None else post.sample(key))
