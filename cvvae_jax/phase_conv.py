"""Strided convs, and stride-1 convs read with their edge pads, with the gradients XLA:CPU
runs fast.

A strided conv is a sum over stride phases of stride-1 convs (`_phase_split`): along an axis
of stride s, phase r reads every s-th element of the padded input from r with the taps r,
r + s, ... XLA:CPU's gradients of a strided conv (dilated convs) ran 5-120x slower than its
forward pass; those of the phases run on its fast path. `split_grad_conv` is the conv with
those gradients, its forward frame by frame (`frame_loop.conv_frames`) where that is faster.
"""

from __future__ import annotations

import functools
import itertools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from . import shifted_matmul
from .conv_core import EDGE, FEW_CHANNELS, ZEROS, Numerics, pad_input, use_shifted_matmul, xla_conv, zero_pads
from .frame_loop import conv_frames

if TYPE_CHECKING:
    from .layers import Conv


def _grows(kernel: jax.Array, padding) -> bool:
    """Whether zero `padding` makes the conv's output larger than its input: the 2x2-tap
    phase convs of `nearest2x_conv`, padded by one."""
    return any(lo + hi > k - 1 for (lo, hi), k in zip(padding, kernel.shape[:kernel.ndim - 2]))


def kernel_grad(numerics, x: jax.Array, kernel: jax.Array, padding, g: jax.Array,
                strides=None) -> jax.Array:
    """The gradient of `xla_conv(numerics, x, kernel, padding, strides)` with respect to `kernel`,
    for the output cotangent `g`. A strided conv, or one whose padding grows its output, gets
    it from `_phase_split` (VALID stride-1 convs of a zero-padded copy of x): XLA:CPU's
    kernel gradient of the padded form ran 200-300x slower (a 2x2-tap 256 -> 2048-channel
    conv of 9x32x32: 77.8 s against 0.25 s)."""
    if strides is not None or _grows(kernel, padding):
        strides = strides or (1,) * (kernel.ndim - 2)
        form = lambda k: _phase_split(x, k, padding, strides, numerics)  # noqa: E731
    else:
        form = lambda k: xla_conv(numerics, x, k, padding)  # noqa: E731
    gk, = jax.linear_transpose(form, kernel)(g)
    return gk


def edge_padded_conv(conv: "Conv", x: jax.Array, strides) -> jax.Array:
    """`split_grad_conv` of x edge-padded by the conv's pads, no bias; where it runs frame by
    frame, the frames read their edge pads from x itself (`_frames_read_pads`)."""
    numerics = Numerics(conv.dtype, conv.precision)
    kernel = conv.kernel[...]
    if _by_frames(kernel, strides, numerics):
        return _frames_read_pads(x, kernel, tuple(map(tuple, conv.pads)), strides, numerics)
    return split_grad_conv(pad_input(x, conv.pads, (EDGE,)), kernel, tuple(zero_pads(conv.pads)), strides,
                           numerics)


def _by_frames(kernel: jax.Array, strides, numerics: Numerics) -> bool:
    """Whether `split_grad_conv` runs its forward frame by frame (`conv_frames`)."""
    return _shifted_applies(kernel, strides, numerics) or (
        strides is not None and kernel.ndim == 5 and kernel.shape[0] > 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _frames_read_pads(x, kernel, pads, strides, numerics):
    # `split_grad_conv` of x edge-padded, where it runs frame by frame: the frames read
    # their edge pads (in time, and in space frame by frame) from x itself (`frame_reader`),
    # with no padded copy of x. The encoder's first downsampler at 17x256x256 (`stages.py`'s
    # block, alternating in one process): 0.39 -> 0.35 s in bf16, 0.58 -> 0.50 s in fp32.
    return conv_frames(x, kernel, pads, numerics, strides)


def _frames_read_pads_fwd(x, kernel, pads, strides, numerics):
    return _frames_read_pads(x, kernel, pads, strides, numerics), (x, kernel)


def _frames_read_pads_bwd(pads, strides, numerics, residuals, g):
    return edge_padded_grads(*residuals, pads, strides, numerics, g)


def edge_padded_grads(x, kernel, pads, strides, numerics, g):
    """The (x, kernel) cotangents of `split_grad_conv` of x edge-padded by `pads`, whose zero
    pads the conv makes: its rules, then the edge padding's transpose."""
    xe, pad_vjp = jax.vjp(lambda x: pad_input(x, pads, (EDGE,)), x)
    gxe, gk = _split_grad_conv_bwd(tuple(zero_pads(pads)), strides, numerics, (xe, kernel), g)
    gx, = pad_vjp(gxe)
    return gx, gk


_frames_read_pads.defvjp(_frames_read_pads_fwd, _frames_read_pads_bwd)


def _strided_out(padded_size, taps, strides) -> list[int]:
    """Output size per axis of a VALID strided conv of the already padded input."""
    return [(size - k) // s + 1 for size, k, s in zip(padded_size, taps, strides)]


def _crop(y: jax.Array, out) -> jax.Array:
    """A phase's stride-1 conv output cut to the strided conv's output size."""
    return y[(...,) + tuple(slice(0, o) for o in out) + (slice(None),)]


def _phase_split(x: jax.Array, kernel: jax.Array, padding, strides, numerics) -> jax.Array:
    """The strided conv as a sum over stride phases: along an axis of stride s, phase r reads
    every s-th element of the zero-padded x from r, with the kernel taps r, r + s, ...; each
    phase is a stride-1 VALID conv, cropped to the strided conv's output. Same taps, same
    multiply-adds."""
    n = kernel.ndim - 2
    lead = [(0, 0)] * (x.ndim - n - 1)
    x = jnp.pad(x, lead + list(padding) + [(0, 0)])
    taps = kernel.shape[:n]
    out = _strided_out(x.shape[x.ndim - n - 1:-1], taps, strides)
    y = None
    for phase in itertools.product(*(range(min(s, k)) for s, k in zip(strides, taps))):
        picks = tuple(slice(r, None, s) for r, s in zip(phase, strides))
        part = _crop(xla_conv(numerics, x[(...,) + picks + (slice(None),)], kernel[picks], [(0, 0)] * n), out)
        y = part if y is None else y + part
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def split_grad_conv(x, kernel, padding, strides, numerics):
    # `xla_conv` (strides None: stride 1) with the gradients XLA:CPU runs fast: a strided
    # conv's from `_phase_split`, and the kernel gradient from `kernel_grad`. Frame by frame
    # (`conv_frames`) where bf16 matmuls apply, and for every strided 3D conv with time taps:
    # XLA:CPU ran its 2D convs per frame and tap 1.2-3x faster than its 3D strided conv (f32,
    # the encoder's downsamplers at 17x256x256: 0.64 / 0.55 / 0.32 s against 1.36 / 0.90 /
    # 0.40 s; the discriminator's RGB input conv 0.034 s against 0.10 s, and 0.045 s against
    # 0.11 s in bf16 on AMX, where its frames run as matmuls).
    if _by_frames(kernel, strides, numerics):
        return conv_frames(x, kernel, tuple((lo, hi, ZEROS) for lo, hi in padding), numerics, strides)
    return xla_conv(numerics, x, kernel, padding, strides)


def _shifted_applies(kernel: jax.Array, strides, numerics: Numerics) -> bool:
    """Whether `split_grad_conv` runs forward as bf16 matmuls: stride 1, or 2 in space (the
    downsamplers); more than FEW_CHANNELS on both sides (fewer are `matmul_conv`'s). Strided
    3D convs go frame by frame whatever this says."""
    return (use_shifted_matmul(numerics.dtype) and min(kernel.shape[-2:]) > FEW_CHANNELS
            and shifted_matmul.takes_strides(None if strides is None else strides[-2:]))


def _split_grad_conv_fwd(x, kernel, padding, strides, numerics):
    return split_grad_conv(x, kernel, padding, strides, numerics), (x, kernel)


def _phase_input_grad(x: jax.Array, kernel: jax.Array, padding, strides, numerics,
                      g: jax.Array) -> jax.Array:
    """The input gradient of the strided conv, phase by phase: each stride phase's
    stride-1 gradient, interleaved back into place. The phases partition the padded input,
    so they fill one buffer; transposing `_phase_split` as a whole summed one zero-padded
    full-size gradient per phase instead (8 x 612 MB alive at once for the encoder's
    128-channel downsampler at 17x256x256)."""
    n = kernel.ndim - 2
    lead, chans = x.shape[: x.ndim - n - 1], x.shape[-1]
    size = [x.shape[len(lead) + a] + lo + hi for a, (lo, hi) in enumerate(padding)]
    taps = kernel.shape[:n]
    out = _strided_out(size, taps, strides)
    longest = [-(-size[a] // strides[a]) for a in range(n)]
    parts = []
    for phase in itertools.product(*(range(s) for s in strides)):
        if any(r >= k for r, k in zip(phase, taps)):  # no tap reads this phase
            parts.append(jnp.zeros((*lead, *longest, chans), x.dtype))
            continue
        picks = tuple(slice(r, None, s) for r, s in zip(phase, strides))
        span = [len(range(r, size[a], strides[a])) for a, r in enumerate(phase)]

        def form(xp, picks=picks):
            return _crop(xla_conv(numerics, xp, kernel[picks], [(0, 0)] * n), out)

        gp, = jax.linear_transpose(form, jax.ShapeDtypeStruct((*lead, *span, chans), x.dtype))(g)
        parts.append(jnp.pad(gp, [(0, 0)] * len(lead)
                             + [(0, m - s) for m, s in zip(longest, span)] + [(0, 0)]))
    # (phases..., lead..., longest..., C) -> lead..., (longest_a, stride_a)..., C
    stacked = jnp.stack(parts).reshape(*strides, *lead, *longest, chans)
    nl = len(lead)
    perm = [n + i for i in range(nl)]
    for a in range(n):
        perm += [n + nl + a, a]
    y = stacked.transpose(*perm, n + nl + n).reshape(*lead, *(m * s for m, s in zip(longest, strides)), chans)
    keep = tuple(slice(lo, lo + x.shape[nl + a]) for a, (lo, _) in enumerate(padding))
    return y[(...,) + keep + (slice(None),)]


def _split_grad_conv_bwd(padding, strides, numerics, residuals, g):
    x, kernel = residuals
    if strides is None:
        gx, = jax.linear_transpose(lambda x: xla_conv(numerics, x, kernel, padding), x)(g)
    else:
        gx = _phase_input_grad(x, kernel, padding, strides, numerics, g)
    return gx, kernel_grad(numerics, x, kernel, padding, g, strides)


split_grad_conv.defvjp(_split_grad_conv_fwd, _split_grad_conv_bwd)
