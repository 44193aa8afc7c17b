"""The nearest-2x upsample fused into the conv after it: the decoders' upsamplers.

After a nearest 2x upsample every output pixel of a 3x3 conv sees only two distinct rows
and two distinct columns of x, so each of the four output phases is a 2x2 conv of x with
summed taps: 4/9 of the multiply-adds, and the 4x larger input is never built. The
decoder's upsamplers carry ~40% of its FLOPs, which makes this the largest single saving
in decode (benchmarks/README.md has the figures). The phase convs run as
`conv_forms.padded_conv`; padded by one, their output is one larger than x.

Where the convs run as bf16 matmuls (`conv_core.use_shifted_matmul`), the upsampler
runs frame by frame: each frame's phases are summed, biased and put in place in f32 and
its output frames written once in bf16. Put in place for the whole clip afterwards, the
phases cost more than the matmuls that made them: in XLA's per-op profile of a bf16
decode at 17x256x256 (27.5 s), the last upsampler's phase matmuls took 1.7 s and its
whole-clip phase buffer, interleave and an f32 copy of its output 4.2 s. Frame by frame
the decode took 25.4 s.
"""

from __future__ import annotations

import functools
import itertools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from . import conv_core, conv_forms, frame_loop
from .conv_core import Numerics

if TYPE_CHECKING:
    from .layers import Conv


def check_nearest2x(conv: "Conv") -> None:
    k, pads = conv.kernel_size, conv.pads
    if k[-2:] != (3, 3) or any(p[:2] != (1, 1) for p in pads[-2:]) or not conv_core.unit_strides(conv):
        raise ValueError(f"nearest2x_conv needs a stride-1 3x3 conv padded by one in space, "
                         f"got kernel {k}, pads {pads}, strides {conv.strides}")


def nearest2x_conv(conv: "Conv", x: jax.Array, up_time: int = 1) -> jax.Array:
    """`conv(x repeated 2x in H and W)` for a stride-1 conv whose last two axes are 3x3 padded by one.

    With `up_time=n` the conv's n*C outputs are n frames of C channels (torch
    `rearrange(x, "b (n c) t h w -> b c (t n) h w")`) and the first output frame
    is dropped: 1 + k frames become 1 + n*k.
    """
    check_nearest2x(conv)
    # Summed in float32: half-precision stored weights would round each of the sums, which
    # the 3x3 conv of the upsampled image never does (1e-3 off the official decode in fp16).
    k = phase_kernel(conv.kernel[...].astype(jnp.float32))
    bias = None if conv.bias is None else conv.bias[...]
    numerics = Numerics(conv.dtype, conv.precision)
    # Padding x by one (zeros or edge) is padding the upsampled image by one.
    if conv_core.use_shifted_matmul(conv.dtype):
        return _frame_by_frame(x, k, bias, tuple(conv.pads), up_time, numerics)
    return _whole_clip(x, k, bias, tuple(conv.pads), up_time, numerics)


def _phase_taps(k: jax.Array, axis: int) -> jax.Array:
    """3 taps (w0, w1, w2) along `axis` -> 2 taps per output phase, stacked on a new last-but-one
    axis: phase 0 reads rows (m-1, m) with (w0, w1 + w2), phase 1 rows (m, m+1) with (w0 + w1, w2)."""
    w0, w1, w2 = (lax.index_in_dim(k, i, axis) for i in range(3))
    even = jnp.concatenate([w0, w1 + w2], axis)
    odd = jnp.concatenate([w0 + w1, w2], axis)
    return jnp.stack([even, odd], axis=-2)


def phase_kernel(kernel: jax.Array) -> jax.Array:
    """(..., 3, 3, I, O) -> (..., 2, 2, I, 4 * O): the 2x2 taps of the four phases (row phase,
    column phase) side by side on the output axis."""
    n = kernel.ndim - 2
    k = _phase_taps(kernel, n - 2)  # (..., 2, 3, I, 2, O)
    k = _phase_taps(k, n - 1)  # (..., 2, 2, I, 2, 2, O)
    *taps, cin, _, _, cout = k.shape
    return k.reshape(*taps, cin, 4 * cout)


def _biased(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    return y if bias is None else y + jnp.tile(bias, 4).astype(y.dtype)


def _whole_clip(x, k, bias, pads, up_time, numerics):
    y = _biased(conv_forms.padded_conv(x, k, pads, numerics), bias)
    return _interleave(y, up_time)


def _interleave(y: jax.Array, up_time: int) -> jax.Array:
    """The phase conv's output (..., [T,] H + 1, W + 1, 4 * up_time * C) put in place: (..., [1 + up_time
    * (T - 1),] 2H, 2W, C)."""
    *lead, hp, wp, _ = y.shape
    h, w = hp - 1, wp - 1
    y = y.reshape(*lead, hp, wp, 2, 2, up_time, -1)
    # Each phase lands on its strided positions by interior padding, and the padded
    # phases are summed (exact: every output element gets one phase's value plus
    # zeros). XLA fuses pads and adds into one loop, so the full-resolution result
    # is written once; stacking, transposing and slicing the phases wrote it up to three times.
    # Negative low time padding drops frame 0's first phase, the dropped first frame.
    zero = jnp.zeros((), y.dtype)
    out = None
    for pt in range(up_time):
        time = [] if up_time == 1 else [(pt - 1, up_time - 1 - pt, up_time - 1)]
        lead_pads = [(0, 0, 0)] * (len(lead) - len(time)) + time
        for py, px in itertools.product((0, 1), (0, 1)):
            phase = y[..., py:py + h, px:px + w, py, px, pt, :]
            phase = lax.pad(phase, zero, lead_pads + [(py, 1 - py, 1), (px, 1 - px, 1), (0, 0, 0)])
            out = phase if out is None else out + phase
    return out


def _frame_in_place(y: jax.Array, up_time: int) -> jax.Array:
    """One frame's phases (..., 1, H + 1, W + 1, 4 * up_time * C) put in place: (..., up_time, 2H, 2W, C).
    Stacked and reshaped: on a frame, writing it once more is cheaper than `_interleave`'s
    padded sum, which evaluates every phase at every output position."""
    *lead, _, hp, wp, _ = y.shape
    h, w = hp - 1, wp - 1
    y = y.reshape(*lead, hp, wp, 2, 2, up_time, -1)
    rows = [jnp.stack([y[..., py:py + h, px:px + w, py, px, :, :] for px in (0, 1)], axis=-3)
            for py in (0, 1)]  # (..., H, W, 2 (px), up_time, C) per row phase
    out = jnp.stack(rows, axis=-5)  # (..., H, 2 (py), W, 2 (px), up_time, C)
    n = len(lead)
    out = jnp.moveaxis(out, -2, n)  # (..., up_time, H, 2, W, 2, C)
    return out.reshape(*lead, up_time, 2 * h, 2 * w, out.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _frame_by_frame(x, k, bias, pads, up_time, numerics):
    # `_whole_clip`, with every frame's phase conv, bias and interleave done before the next.
    if k.ndim == 4:  # 2D: every leading index is a frame, with no time taps
        *lead, h, w, c = x.shape
        out = _frames(x.reshape(-1, h, w, c), k[None], bias, ((0, 0, conv_core.ZEROS),) + pads, 1, numerics)
        return out.reshape(*lead, *out.shape[1:])
    return _frames(x, k, bias, pads, up_time, numerics)


def _frames(x, k, bias, pads, up_time, numerics):
    read = frame_loop.frame_reader(x, pads)
    taps = k.shape[0]
    axis = x.ndim - 4

    def frame(t):  # (..., up_time, 2H, 2W, C) on the time axis
        y = frame_loop.frame_taps_conv([read(t + d) for d in range(taps)], k, pads, numerics, jnp.float32)
        out = _frame_in_place(_biased(y, bias), up_time)  # (..., 1, up_time, 2H, 2W, C)
        return out.reshape(*out.shape[:axis], up_time, *out.shape[-3:]).astype(numerics.dtype)

    # Frame 0's first time phase is the dropped first frame.
    first = lax.slice_in_dim(frame(0), up_time - 1, up_time, axis=axis)
    return frame_loop.frame_loop(frame_loop.time_frames(x.shape[axis], pads, taps), frame, axis, up_time,
                                 first=first)


def _frame_by_frame_fwd(x, k, bias, pads, up_time, numerics):
    return _frame_by_frame(x, k, bias, pads, up_time, numerics), (x, k, bias)


def _frame_by_frame_bwd(pads, up_time, numerics, residuals, g):
    # `_whole_clip`'s gradients: the interleave transposed, then the phase conv's own rules.
    x, k, bias = residuals
    phases = jax.eval_shape(lambda: conv_forms.padded_conv(x, k, pads, numerics))
    gy, = jax.linear_transpose(lambda y: _interleave(y, up_time), phases)(g)
    gb = None if bias is None else gy.astype(jnp.float32).reshape(-1, 4, bias.shape[-1]).sum((0, 1))
    gx, gk = conv_forms.padded_conv_grads(x, k, pads, numerics, gy)
    return gx, gk, None if gb is None else gb.astype(bias.dtype)


_frame_by_frame.defvjp(_frame_by_frame_fwd, _frame_by_frame_bwd)
