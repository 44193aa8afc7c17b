"""Building blocks shared by the 3D CV-VAE networks and the 2D image VAE.

Everything is channels-last: videos are (B, T, H, W, C), images (B, H, W, C).
Parameter names mirror the PyTorch modules they replace (`kernel`/`scale`/`bias`
standing for torch's `weight`/`bias`), so that a flat path of the NNX state is the
official state-dict key; `weights.py` relies on that.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from . import conv_core, conv_forms, remat, upsample
from .conv_core import EDGE, ZEROS, AxisPad

Dtype = Any

# torch's default conv/linear init, kaiming_uniform(a=sqrt(5)), is U(+-1/sqrt(fan_in)).
torch_like_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    # torch.nn.GELU defaults to the exact erf form.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown act_fn {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def same_pads(ndim: int, p: int, mode: str) -> tuple[AxisPad, ...]:
    return ((p, p, mode),) * ndim


def causal_pads(p: int, space_mode: str) -> tuple[AxisPad, ...]:
    """Time padded only in front (replicating the first frame): frame t never sees t+1."""
    return ((2 * p, 0, EDGE), (p, p, space_mode), (p, p, space_mode))


class Conv(nnx.Conv):
    """A convolution over the trailing `len(kernel_size)` axes with per-axis padding.

    torch pads explicitly before its convolutions (replicate in time, zeros or
    replicate in space); we replicate explicitly too and let the convolution pad
    the zeros (`conv_core.pad_input` / `zero_pads`), so the numbers match. Leading
    axes beyond the convolved ones are batch axes, which is how a 2D conv runs frame
    by frame on a (B, T, H, W, C) video. RGB-sized convs run as matmuls
    (`conv_forms.matmul_conv`), which XLA does far faster; on CPU, 3D convs run as a
    loop over frames of 2D convs per time tap (`conv_forms.time_loop_conv`), or with an
    RGB-sized input as one 2D conv of the taps stacked on channels
    (`conv_forms.time_fold_conv`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        pads: Sequence[AxisPad],
        *,
        strides: Sequence[int] | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kernel_size = tuple(kernel_size)
        if len(pads) != len(kernel_size):
            raise ValueError(f"need one pad per conv axis, got {pads} for kernel {kernel_size}")
        super().__init__(
            in_features,
            out_features,
            kernel_size,
            strides=tuple(strides) if strides else 1,
            padding=tuple(conv_core.zero_pads(pads)),
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=torch_like_init,
            rngs=rngs,
        )
        self.pads = tuple(pads)
        for _, _, mode in pads:
            if mode not in (ZEROS, EDGE):
                raise ValueError(f"unknown padding mode {mode!r}")

    def __call__(self, x: jax.Array) -> jax.Array:
        if conv_forms.use_time_fold(self):
            return conv_forms.time_fold_conv(self, x)
        if (min(self.in_features, self.out_features) <= conv_core.FEW_CHANNELS
                and conv_core.unit_strides(self)):
            return conv_forms.matmul_conv(self, x)
        if conv_forms.use_time_loop(self):
            return conv_forms.time_loop_conv(self, x)
        if conv_forms.use_strided_conv(self):
            return conv_forms.strided_conv(self, x)
        if conv_core.use_shifted_matmul(self.dtype) and conv_core.unit_strides(self):
            return conv_forms.shifted_matmul_conv(self, x)
        return super().__call__(conv_core.pad_input(x, self.pads, (EDGE,)))


def conv2d(cin, cout, k, *, dtype, param_dtype, rngs, pad_mode=ZEROS, strides=None) -> Conv:
    """torch Conv2d(k, padding=k // 2); on a video it runs frame by frame."""
    return Conv(cin, cout, (k, k), same_pads(2, k // 2, pad_mode), strides=strides,
                dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class GroupNorm(nnx.GroupNorm):
    """GroupNorm, and optionally the activation after it, computed in float32 and cast back
    to the compute dtype once.

    Statistics run over every non-batch axis, which for a (B, T, H, W, C) video is
    what torch's GroupNorm does on (B, C, T, H, W). The variance takes two passes, as
    torch's matches a one-pass variance poorly on activations with a large mean. Each pass
    sums per channel first (channels are the contiguous axis), then per group: summing the
    grouped (..., groups, C / groups) layout directly, as flax does, ran 8x slower on XLA:CPU
    (a 5x256x256x128 mean: 49 ms against 6). Normalisation, affine and activation are one
    elementwise pass in float32, where the activation of the bf16 result ran 1.5x slower
    than in f32. GroupNorm + SiLU of 5x256x256x128: 186 -> 101 ms in fp32, 209 -> 111 ms
    with bf16 activations.
    """

    def __init__(self, channels: int, groups: int, eps: float, *, param_dtype, rngs):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups")
        super().__init__(channels, groups, epsilon=eps, dtype=jnp.float32,
                         param_dtype=param_dtype, use_fast_variance=False, rngs=rngs)

    def __call__(self, x: jax.Array, act: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
        """`act(group_norm(x))` (`act` None: the norm alone) in x's dtype."""
        return _group_norm(x, self.scale[...], self.bias[...], self.num_groups, self.epsilon, act)


def _group_norm_act(x, scale, bias, groups: int, eps: float, act):
    axes = tuple(range(1, x.ndim - 1))
    c = x.shape[-1]
    count = math.prod(x.shape[1:-1]) * (c // groups)
    x_mean, x_var, x_out = _apart(x)

    def per_channel(group_sums):  # (B, groups) -> (B, 1..., C), broadcastable against x
        return jnp.repeat(group_sums, c // groups, axis=-1).reshape(x.shape[0], *[1] * len(axes), c)

    def group_sum(y):
        return y.sum(axes).reshape(x.shape[0], groups, -1).sum(-1)

    mean = per_channel(group_sum(x_mean.astype(jnp.float32)) / count)
    var = group_sum(jnp.square(x_var.astype(jnp.float32) - mean)) / count
    a = per_channel(lax.rsqrt(var + eps)) * scale.astype(jnp.float32)
    y = x_out.astype(jnp.float32) * a + (bias.astype(jnp.float32) - mean * a)
    return (act(y) if act is not None else y).astype(x.dtype)


def _apart(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x three times, as values XLA:CPU does not merge, for GroupNorm's three passes.

    Each pass converts a bf16 x to f32 where it reads it. Given one x, XLA's CSE makes the
    three converts one (and one with any other f32 use of x, such as a residual sum), which
    YNNPACK's reductions do not take in: XLA wrote the f32 copy out in full first.
    GroupNorm + SiLU of a bf16 17x256x256x128: 293-363 ms with the copy, 187-193 ms
    without; the bf16 encode / decode at 17x256x256, both forms alternating in one process:
    median 10.3 -> 9.0 s / 22.7 -> 21.2 s. Elsewhere (f32 x, accelerators) the three are x
    itself."""
    if x.dtype == jnp.float32 or not conv_core.on_cpu():
        return x, x, x
    return lax.optimization_barrier((x, x, x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x, scale, bias, groups, eps, act):
    return _group_norm_act(x, scale, bias, groups, eps, act)


def _group_norm_fwd(x, scale, bias, groups, eps, act):
    return _group_norm_act(x, scale, bias, groups, eps, act), (x, scale, bias)


def _group_norm_bwd(groups, eps, act, residuals, g):
    # Recomputed from the input: autodiff's own residuals (the f32 input, the normalised
    # activation, the per-channel broadcasts) raised XLA's plan for the paper-width train
    # step (17x256x256, fp32, per-block remat) from 17.29 to 19.92 GiB.
    _, vjp = jax.vjp(lambda *a: _group_norm_act(*a, groups, eps, act), *residuals)
    return vjp(g)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def single_head_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(C)) v over axis 1 of (N, L, C) arrays, one head."""
    out = jax.nn.dot_product_attention(q[:, :, None, :], k[:, :, None, :], v[:, :, None, :])
    return out[:, :, 0, :]


def _per_frame(x: jax.Array) -> jax.Array:
    """(..., H, W, C) -> (N, H, W, C): the official blocks fold time into the batch
    before their GroupNorm, so its statistics are per frame."""
    return x.reshape(-1, *x.shape[-3:])


def _tokens(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, H*W, C)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


class LDMAttention(nnx.Module):
    """The LDM `AttnBlock` / `MemoryEfficientAttnBlock`: per-frame spatial attention.

    q/k/v/proj_out are 1x1 Conv2d in the official weights, kept as such here.
    With `temporal=True` it is `MemoryEfficientAttnVideoBlock`: the spatial result
    (without its residual) goes through a LayerNorm + attention over time at each
    pixel, and only then is added to the input.
    """

    def __init__(self, channels: int, *, temporal: bool, eps: float, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = GroupNorm(channels, 32, eps, param_dtype=param_dtype, rngs=rngs)
        self.q = conv2d(channels, channels, 1, **kw)
        self.k = conv2d(channels, channels, 1, **kw)
        self.v = conv2d(channels, channels, 1, **kw)
        self.proj_out = conv2d(channels, channels, 1, **kw)
        self.temporal = temporal
        if temporal:
            lin = dict(kernel_init=torch_like_init, **kw)
            self.norm_t = nnx.LayerNorm(channels, epsilon=1e-5, dtype=jnp.float32,
                                        param_dtype=param_dtype, use_fast_variance=False, rngs=rngs)
            self.q_t = nnx.Linear(channels, channels, **lin)
            self.k_t = nnx.Linear(channels, channels, **lin)
            self.v_t = nnx.Linear(channels, channels, **lin)
            self.proj_out_t = nnx.Linear(channels, channels, **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.norm(_per_frame(x))
        q, k, v = _tokens(self.q(h)), _tokens(self.k(h)), _tokens(self.v(h))
        h = self.proj_out(single_head_attention(q, k, v).reshape(h.shape)).reshape(x.shape)
        if self.temporal:
            b, t, hh, ww, c = h.shape
            h = h.transpose(0, 2, 3, 1, 4).reshape(b * hh * ww, t, c)
            h = self.norm_t(h.astype(jnp.float32)).astype(x.dtype)
            h = self.proj_out_t(single_head_attention(self.q_t(h), self.k_t(h), self.v_t(h)))
            h = h.reshape(b, hh, ww, t, c).transpose(0, 3, 1, 2, 4)
        return x + h


class DiffusersAttention(nnx.Module):
    """diffusers `Attention` as the VAE mid-blocks build it: one head, GroupNorm in,
    linear q/k/v/out with bias, residual. Runs per frame on videos."""

    def __init__(self, channels: int, groups: int, eps: float, *, dtype, param_dtype, rngs):
        lin = dict(kernel_init=torch_like_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group_norm = GroupNorm(channels, groups, eps, param_dtype=param_dtype, rngs=rngs)
        self.to_q = nnx.Linear(channels, channels, **lin)
        self.to_k = nnx.Linear(channels, channels, **lin)
        self.to_v = nnx.Linear(channels, channels, **lin)
        self.to_out = nnx.List([nnx.Linear(channels, channels, **lin)])

    def __call__(self, x: jax.Array) -> jax.Array:
        h = _tokens(self.group_norm(_per_frame(x)))
        h = single_head_attention(self.to_q(h), self.to_k(h), self.to_v(h))
        return x + self.to_out[0](h).reshape(x.shape)


class ResnetBlock(remat.Block):
    """norm1 -> act -> conv1 -> norm2 -> act -> conv2, plus a (projected) shortcut.

    The convolutions are built by the caller, so the same block serves the causal
    3D encoder, the 3D decoder, the `half_3d` variant and the 2D image VAE. The
    shortcut's attribute name differs between the LDM (`nin_shortcut`) and
    diffusers (`conv_shortcut`) layouts, hence `shortcut_name`.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        *,
        conv1: Conv,
        conv2: Conv,
        shortcut: Conv | None,
        shortcut_name: str,
        groups: int,
        eps: float,
        act: Callable[[jax.Array], jax.Array],
        param_dtype,
        rngs,
    ):
        self.norm1 = GroupNorm(cin, groups, eps, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = conv1
        self.norm2 = GroupNorm(cout, groups, eps, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = conv2
        self.act = act
        self.shortcut_name = shortcut_name if shortcut is not None else None
        if shortcut is not None:
            setattr(self, shortcut_name, shortcut)

    def forward(self, x: jax.Array) -> jax.Array:
        h = self.conv1(self.norm1(x, self.act))
        h = self.conv2(self.norm2(h, self.act))
        if self.shortcut_name is not None:
            x = getattr(self, self.shortcut_name)(x)
        return x + h


class Downsample(remat.Block):
    """A strided conv; a module of its own because the official key is `...downsample(rs.0).conv`."""

    def __init__(self, conv: Conv):
        self.conv = conv

    def forward(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(remat.Block):
    """Nearest 2x in space, then a conv; with `up_time=2` the conv emits two frames
    per input frame and the first output frame is dropped (1 + k -> 1 + 2k).

    The two run fused (`upsample.nearest2x_conv`): 4/9 of the work, same numbers.
    """

    def __init__(self, conv: Conv, up_time: int):
        upsample.check_nearest2x(conv)
        self.conv = conv
        self.up_time = up_time

    def forward(self, x: jax.Array) -> jax.Array:
        return upsample.nearest2x_conv(self.conv, x, self.up_time)
