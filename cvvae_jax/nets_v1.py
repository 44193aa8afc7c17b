"""The CV-VAE v1 encoder and decoder (`CVVAEModel`, LDM block names).

Attribute names follow models/vae_models.py so that NNX state paths are the
official state-dict keys (`encoder.down.0.block.1.conv1.weight`, ...).
"""

from __future__ import annotations

import jax
from flax import nnx

from .conv_kits import V1Kit, resnet
from .layers import GroupNorm, LDMAttention, Downsample, Upsample
from .model_config import CVVAEConfig

GROUPS, EPS = 32, 1e-5  # `Normalize` in the official code
RESOLUTION = 256  # the official constructor's `resolution`, against which attn_resolutions is read


def _attn(kind: str, channels: int, kit: V1Kit, rngs) -> LDMAttention | None:
    if kind == "none":
        return None
    return LDMAttention(channels, temporal=kind == "spatial-temporal-xformer", eps=EPS,
                        dtype=kit.dtype, param_dtype=kit.param_dtype, rngs=rngs)


def _res(kit, cin, cout, rngs):
    return resnet(kit, cin, cout, shortcut_name="nin_shortcut", groups=GROUPS, eps=EPS,
                  act=jax.nn.silu, rngs=rngs)


class Level(nnx.Module):
    """One resolution of the encoder (`down[i]`) or decoder (`up[i]`)."""

    def __init__(self, blocks, attns, *, downsample=None, upsample=None):
        self.block = nnx.List(blocks)
        self.attn = nnx.List(attns)
        if downsample is not None:
            self.downsample = downsample
        if upsample is not None:
            self.upsample = upsample

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Mid(nnx.Module):
    def __init__(self, c, kit, attn_type, rngs):
        self.block_1 = _res(kit, c, c, rngs)
        self.attn_1 = _attn(attn_type, c, kit, rngs)
        self.block_2 = _res(kit, c, c, rngs)

    def __call__(self, x):
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nnx.Module):
    """(B, T, H, W, C) -> (B, 1 + (T-1)/4, H/8, W/8, 2 z) moments."""

    def __init__(self, cfg: CVVAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kit = V1Kit(dtype, param_dtype, causal=cfg.causal_encoder,
                    use_3d_conv=cfg.use_3d_conv, half_3d=cfg.half_3d)
        ch, mult = cfg.ch, cfg.ch_mult
        self.conv_in = kit.main(cfg.in_channels, ch, 3, rngs)
        levels, block_in = [], ch
        for i, time_down in enumerate(cfg.time_down_levels()):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(_res(kit, block_in, ch * mult[i], rngs))
                block_in = ch * mult[i]
                if RESOLUTION >> i in cfg.attn_resolutions and cfg.encoder_attn_type != "none":
                    attns.append(_attn(cfg.encoder_attn_type, block_in, kit, rngs))
            last = i == cfg.levels - 1
            down = None if last else Downsample(kit.down(block_in, time_down, rngs))
            levels.append(Level(blocks, attns, downsample=down))
        self.down = nnx.List(levels)
        self.mid = Mid(block_in, kit, cfg.encoder_attn_type, rngs)
        self.norm_out = GroupNorm(block_in, GROUPS, EPS, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = kit.main(block_in, 2 * cfg.z_channels, 3, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(self.norm_out(x, jax.nn.silu))


class Decoder(nnx.Module):
    """(B, 1 + k, h, w, z) latents -> (B, 1 + 4k, 8h, 8w, 3) pixels."""

    def __init__(self, cfg: CVVAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kit = V1Kit(dtype, param_dtype, causal=cfg.causal_decoder,
                    use_3d_conv=cfg.use_3d_conv, half_3d=cfg.half_3d)
        ch, mult, n = cfg.ch, cfg.ch_mult, cfg.levels
        block_in = ch * mult[-1]
        self.conv_in = kit.main(cfg.z_channels, block_in, 3, rngs)
        self.mid = Mid(block_in, kit, cfg.decoder_attn_type, rngs)
        levels = [None] * n
        for i in reversed(range(n)):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(_res(kit, block_in, ch * mult[i], rngs))
                block_in = ch * mult[i]
                if RESOLUTION >> i in cfg.attn_resolutions and cfg.decoder_attn_type != "none":
                    attns.append(_attn(cfg.decoder_attn_type, block_in, kit, rngs))
            up = None
            if i != 0:
                time_up = i % 2 == 1
                up = Upsample(kit.up(block_in, time_up, rngs), 2 if time_up else 1)
            levels[i] = Level(blocks, attns, upsample=up)
        self.up = nnx.List(levels)
        self.norm_out = GroupNorm(block_in, GROUPS, EPS, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = kit.main(block_in, cfg.out_ch, 3, rngs)

    def features(self, z: jax.Array) -> jax.Array:
        """The input of `conv_out` (the training objective's adaptive weight needs it)."""
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.norm_out(x, jax.nn.silu)

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.conv_out(self.features(z))
