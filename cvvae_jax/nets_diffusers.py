"""Encoder and decoder in the diffusers block layout.

One topology serves two official models: the CV-VAE for SD3 (`Encoder3D` /
`Decoder3D` of models/vae_models3d_sd3.py, 3D convs from `SD3Kit`) and the
Stable Diffusion image VAE (diffusers `Encoder` / `Decoder`, 2D convs from
`ImageKit`). Attribute names are the official ones (`down_blocks.0.resnets.1`,
`mid_block.attentions.0.to_q`, ...).
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from .conv_kits import resnet
from .layers import DiffusersAttention, Downsample, GroupNorm, Upsample, activation

EPS = 1e-6  # resnet_eps and the output norms of diffusers' VAE encoder/decoder


class _Blocks(nnx.Module):
    """`DownEncoderBlock` / `UpDecoderBlock`: resnets then an optional resampler."""

    def __init__(self, resnets, *, downsamplers=None, upsamplers=None):
        self.resnets = nnx.List(resnets)
        if downsamplers is not None:
            self.downsamplers = nnx.List(downsamplers)
        if upsamplers is not None:
            self.upsamplers = nnx.List(upsamplers)

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for s in list(getattr(self, "downsamplers", [])) + list(getattr(self, "upsamplers", [])):
            x = s(x)
        return x


class MidBlock(nnx.Module):
    def __init__(self, c, kit, *, groups, act, add_attention, rngs):
        self.resnets = nnx.List([_res(kit, c, c, groups, act, rngs) for _ in range(2)])
        self.attentions = nnx.List(
            [DiffusersAttention(c, groups, EPS, dtype=kit.dtype, param_dtype=kit.param_dtype,
                                rngs=rngs)] if add_attention else []
        )

    def __call__(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


def _res(kit, cin, cout, groups, act, rngs):
    return resnet(kit, cin, cout, shortcut_name="conv_shortcut", groups=groups, eps=EPS,
                  act=act, rngs=rngs)


class Encoder(nnx.Module):
    def __init__(self, kit, *, in_channels: int, out_channels: int, block_out_channels: Sequence[int],
                 layers_per_block: int, groups: int, act_fn: str, mid_attention: bool,
                 time_down: Sequence[bool], rngs: nnx.Rngs):
        act = activation(act_fn)  # the resnets'; the output activation is always SiLU
        boc = list(block_out_channels)
        self.conv_in = kit.main(in_channels, boc[0], 3, rngs)
        blocks, cin = [], boc[0]
        for i, cout in enumerate(boc):
            resnets = [_res(kit, cin if j == 0 else cout, cout, groups, act, rngs)
                       for j in range(layers_per_block)]
            final = i == len(boc) - 1
            down = None if final else [Downsample(kit.down(cout, time_down[i], rngs))]
            blocks.append(_Blocks(resnets, downsamplers=down))
            cin = cout
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(boc[-1], kit, groups=groups, act=act,
                                  add_attention=mid_attention, rngs=rngs)
        self.conv_norm_out = GroupNorm(boc[-1], groups, EPS, param_dtype=kit.param_dtype, rngs=rngs)
        self.conv_out = kit.main(boc[-1], 2 * out_channels, 3, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, jax.nn.silu))


class Decoder(nnx.Module):
    def __init__(self, kit, *, in_channels: int, out_channels: int, block_out_channels: Sequence[int],
                 layers_per_block: int, groups: int, act_fn: str, mid_attention: bool,
                 time_up: Sequence[bool], rngs: nnx.Rngs):
        act = activation(act_fn)  # the resnets'; the output activation is always SiLU
        rev = list(reversed(block_out_channels))
        self.conv_in = kit.main(in_channels, rev[0], 3, rngs)
        self.mid_block = MidBlock(rev[0], kit, groups=groups, act=act,
                                  add_attention=mid_attention, rngs=rngs)
        blocks, cin = [], rev[0]
        for i, cout in enumerate(rev):
            resnets = [_res(kit, cin if j == 0 else cout, cout, groups, act, rngs)
                       for j in range(layers_per_block + 1)]
            final = i == len(rev) - 1
            n = 2 if time_up[i] else 1
            up = None if final else [Upsample(kit.up(cout, time_up[i], rngs), n)]
            blocks.append(_Blocks(resnets, upsamplers=up))
            cin = cout
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = GroupNorm(rev[-1], groups, EPS, param_dtype=kit.param_dtype, rngs=rngs)
        self.conv_out = kit.main(rev[-1], out_channels, 3, rngs)

    def features(self, z: jax.Array) -> jax.Array:
        """The input of `conv_out` (the training objective's adaptive weight needs it)."""
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_norm_out(x, jax.nn.silu)

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.conv_out(self.features(z))
