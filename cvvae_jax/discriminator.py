"""The official 3D PatchGAN discriminator, `NLayerDiscriminator3D`.

CV-VAE trains against `lvdm.modules.autoencoding.lpips.model.model.NLayerDiscriminator3D`
(configs/cvvae_sd3_constraint_training.yaml: input_nc 3, ndf 64, n_layers 4, no
ActNorm, half_3d and causal off). Layer `i` of the official `nn.Sequential` is
`main[i]` here, LeakyReLUs included, so NNX paths are the official state-dict keys
(`main.0.weight`, `main.2.conv1.weight`, ...) and `weights.py` loads and saves them.

Layout at n_layers=4 (channels ndf * [1, 2, 4, 8, 8]):

    main.0      conv 3x3x3 stride 2, zero padding (causal: first frame replicated in front)
    main.2, 5   ResnetBlockDown3D with a 2x average pool in time and space
    main.8, 11  ResnetBlockDown3D without pooling
    each block is followed by GroupNorm(32) and LeakyReLU(0.2)
    main.14     conv 3x3x3 to one logit per patch
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import weights
from .layers import ZEROS, Conv, GroupNorm, causal_pads, same_pads, torch_like_init
from .pretrained import check_pixels

GROUPS, EPS = 32, 1e-5  # `Normalize` in the official code
SLOPE = 0.2
TEMB_CHANNELS = 512  # ResnetBlockDown3D's default; its temb_proj is never used by the discriminator

# The official constructor's defaults; note half_3d=True there, while the training config sets False.
OFFICIAL_DEFAULTS = {"input_nc": 3, "ndf": 64, "n_layers": 4, "use_actnorm": False,
                     "half_3d": True, "causal": False}
_OFFICIAL_TO_OURS = {"input_nc": "in_channels", "ndf": "ndf", "n_layers": "n_layers",
                     "half_3d": "half_3d", "causal": "causal"}


def kwargs_from_official(params: Mapping) -> dict:
    """Constructor kwargs from the official `params` (the YAML's `discriminator_config.params`).

    Keys the YAML leaves out take the official class defaults, not ours.
    """
    unknown = sorted(set(params) - set(OFFICIAL_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown NLayerDiscriminator3D params {unknown}; "
                         f"known: {sorted(OFFICIAL_DEFAULTS)}")
    merged = {**OFFICIAL_DEFAULTS, **params}
    if merged.pop("use_actnorm"):
        raise NotImplementedError("use_actnorm=True (ActNorm instead of GroupNorm) is not supported; "
                                  "the CV-VAE training config uses use_actnorm=False")
    return {_OFFICIAL_TO_OURS[k]: v for k, v in merged.items()}


def official_params(**kwargs) -> dict:
    """The official `params` (all of them) for our constructor kwargs: kwargs_from_official's inverse."""
    ours_to_official = {ours: official for official, ours in _OFFICIAL_TO_OURS.items()}
    return {**OFFICIAL_DEFAULTS, "use_actnorm": False,
            **{ours_to_official[k]: v for k, v in kwargs.items()}}


def _uniform_init(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _conv(cin: int, cout: int, kernel, pads, *, strides=None, dtype, param_dtype,
          rngs: nnx.Rngs) -> Conv:
    """A `layers.Conv` with the official `weights_init`: kernel N(0, 0.02), while the bias
    keeps torch's default U(+-1/sqrt(fan_in)). It is built abstractly first, so the
    default init of `layers.Conv` is never computed."""
    conv = nnx.eval_shape(lambda: Conv(cin, cout, kernel, pads, strides=strides, dtype=dtype,
                                       param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    shape = conv.kernel.shape
    conv.kernel.set_value(0.02 * jax.random.normal(rngs.params(), shape, param_dtype))
    conv.bias.set_value(_uniform_init(math.prod(shape[:-1]) ** -0.5)(rngs.params(), (cout,), param_dtype))
    return conv


def _pool_2x(x: jax.Array) -> jax.Array:
    """The blocks' downsampling: an odd clip first gets its first frame repeated in front,
    then `avg_pool3d(kernel_size=2, stride=2)`, which drops an odd last row/column."""
    if x.shape[1] % 2:
        x = jnp.concatenate([x[:, :1], x], axis=1)
    b, t, h, w, c = x.shape
    if h < 2 or w < 2:
        raise ValueError(f"NLayerDiscriminator3D: a {h}x{w} feature map is too small to pool; "
                         "the input is too small for this n_layers")
    x = x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(b, t // 2, 2, h // 2, 2, w // 2, 2, c)
    return x.mean(axis=(2, 4, 6), dtype=jnp.float32).astype(x.dtype)


class LeakyReLU(nnx.Module):
    """Parameter-free, but it holds its index in `main` as in the official Sequential."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.leaky_relu(x, SLOPE)


class ResnetBlockDown3D(nnx.Module):
    """norm1 -> SiLU -> conv1 -> [pool] -> norm2 -> SiLU -> conv2, plus a [pooled, projected]
    shortcut. The official discriminator does not pass `causal` down, so these convs always
    zero-pad on every axis; `half_3d` makes conv2 a per-frame 2D conv."""

    def __init__(self, cin: int, cout: int, *, downsample: bool, half_3d: bool, dtype,
                 param_dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.norm1 = GroupNorm(cin, GROUPS, EPS, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = _conv(cin, cout, (3, 3, 3), same_pads(3, 1, ZEROS), **kw)
        self.temb_proj = nnx.Linear(TEMB_CHANNELS, cout, kernel_init=torch_like_init,
                                    bias_init=_uniform_init(TEMB_CHANNELS ** -0.5), **kw)
        self.norm2 = GroupNorm(cout, GROUPS, EPS, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = (_conv(cout, cout, (3, 3), same_pads(2, 1, ZEROS), **kw) if half_3d
                      else _conv(cout, cout, (3, 3, 3), same_pads(3, 1, ZEROS), **kw))
        self.nin_shortcut = (_conv(cin, cout, (1, 1, 1), same_pads(3, 0, ZEROS), **kw)
                             if cin != cout else None)
        self.downsample = downsample

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(self.norm1(x, jax.nn.silu))
        if self.downsample:
            h, x = _pool_2x(h), _pool_2x(x)
        h = self.conv2(self.norm2(h, jax.nn.silu))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class NLayerDiscriminator3D(nnx.Module):
    """(B, T, H, W, in_channels) in [-1, 1] -> patch logits (B, T', H', W', 1).

    The first conv maps a size n to ceil(n / 2) on every axis; each of the n_layers - 2
    pooling blocks then takes T to ceil(T / 2) and H, W to floor(H / 2), floor(W / 2).
    At n_layers=4, (17, 256, 256) -> (3, 32, 32) and (1, 256, 256) -> (1, 32, 32).
    """

    def __init__(self, *, in_channels: int = 3, ndf: int = 64, n_layers: int = 4,
                 half_3d: bool = False, causal: bool = False, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if ndf <= 0 or ndf % GROUPS:
            raise ValueError(f"ndf must be a positive multiple of {GROUPS} (GroupNorm groups), got {ndf}")
        if n_layers < 0:
            raise ValueError(f"n_layers must be >= 0, got {n_layers}")
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.in_channels = in_channels
        self.param_dtype = param_dtype
        first_pads = causal_pads(1, ZEROS) if causal else same_pads(3, 1, ZEROS)
        main = [_conv(in_channels, ndf, (3, 3, 3), first_pads, strides=(2, 2, 2), **kw), LeakyReLU()]
        c = ndf
        widths = [(ndf * min(2 ** n, 8), True) for n in range(1, n_layers - 1)]
        widths += [(ndf * min(2 ** n_layers, 8), False)] * 2
        for cout, downsample in widths:
            main += [
                ResnetBlockDown3D(c, cout, downsample=downsample, half_3d=half_3d, **kw),
                GroupNorm(cout, GROUPS, EPS, param_dtype=param_dtype, rngs=rngs),
                LeakyReLU(),
            ]
            c = cout
        main.append(_conv(c, 1, (3, 3, 3), same_pads(3, 1, ZEROS), **kw))
        self.main = nnx.List(main)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = check_pixels(x, name="NLayerDiscriminator3D", rank=5, channels=self.in_channels,
                         layout="(B, T, H, W, C)")
        for layer in self.main:
            x = layer(x)
        return x


def discriminator_state_dict(module: NLayerDiscriminator3D, dtype=np.float32) -> dict[str, np.ndarray]:
    """The official PyTorch state dict (numpy arrays, torch layout)."""
    return weights.to_state_dict(nnx.state(module), dtype)


def save_discriminator(module: NLayerDiscriminator3D, path: str | Path, *, dtype=np.float32) -> Path:
    """Write the official state dict as a safetensors file."""
    path = Path(path)
    weights.write_safetensors(path, discriminator_state_dict(module, dtype))
    return path


def load_discriminator_state(module: NLayerDiscriminator3D,
                             source: str | Path | Mapping[str, np.ndarray]) -> NLayerDiscriminator3D:
    """Fill `module` in place from an official-layout state dict, or a .safetensors/.bin file
    (or a directory holding one). Keys must match exactly: inside a training checkpoint the
    discriminator's keys start with `loss.discriminator.`, which the caller strips."""
    if isinstance(source, (str, Path)):
        file = Path(source)
        file = weights.find_weights(file) if file.is_dir() else file
        state_dict, where = weights.read_state_dict(file), str(file)
    else:
        state_dict, where = {k: np.asarray(v) for k, v in source.items()}, "the state dict"
    state = weights.fill_state(nnx.state(module), state_dict, source=where,
                               param_dtype=module.param_dtype)
    nnx.update(module, state)
    return module
