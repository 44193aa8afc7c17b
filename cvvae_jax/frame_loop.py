"""Convs computed one output frame at a time, in a loop that writes each frame in place.

A 3D conv's output frame t is the sum over its time taps d of 2D convs of input frame
t + d: XLA:CPU runs the 2D convolutions 1.3-2x faster than its 3D one (benchmarks/conv_forms.py
on the full-size model's widths), and one frame at a time keeps one frame's tap outputs
alive, not whole-clip outputs per tap. The frames read their time padding from the clip
itself (`frame_reader`), so no padded copy is made. Where bf16 matmuls apply
(`conv_core.use_shifted_matmul`) each frame's taps run as `shifted_matmul.frame_conv`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from . import shifted_matmul
from .conv_core import EDGE, ZEROS, Numerics, pad_input, use_shifted_matmul, xla_conv, zero_pads


def frame_reader(x: jax.Array, pads) -> Callable[[jax.Array], jax.Array]:
    """`read(i)`: frame i of x (time axis x.ndim - 4) padded in time by pads[0] = (lo, hi, mode),
    so frame 0 is the first of the lo padding, with its edge pads in space applied (zero pads
    are left to the conv). The time padding is read from x (a clamped frame index reads the
    edge frame, a masked one zeros), so no padded copy of x is made. Frames keep their time
    axis (length 1)."""
    (lo, _, mode), space = pads[0], pads[1:]
    axis = x.ndim - 4
    length = x.shape[axis]
    bits = as_bits(x)

    def read(i):
        j = i - lo
        # Clamped into x: the edge frame. (dynamic_slice would wrap a negative start around.)
        f = lax.dynamic_slice_in_dim(bits, jnp.clip(j, 0, length - 1), 1, axis)
        f = lax.bitcast_convert_type(f, x.dtype)
        if mode == ZEROS:
            f = jnp.where((j >= 0) & (j < length), f, jnp.zeros((), f.dtype))
        return pad_input(f, space, (EDGE,))

    return read


def frame_loop(frames: int, produce: Callable[[jax.Array], jax.Array], axis: int, step: int = 1,
               first: jax.Array | None = None) -> jax.Array:
    """`concatenate([first, *(produce(t) for t in range(1, frames))], axis)`, each piece written in
    place by a loop; `first` defaults to produce(0). Every produce(t) is `step` long on `axis`,
    `first` may be shorter."""
    # The first piece, zero-padded to the whole, is the buffer the loop writes into: a zeros
    # buffer would be one constant that XLA shares between the loops and copies for each, a
    # whole output more.
    first = produce(0) if first is None else first
    start = first.shape[axis]
    out = jnp.pad(as_bits(first), [(0, 0)] * axis + [(0, (frames - 1) * step)] + [(0, 0)] * (first.ndim - axis - 1))
    out = lax.fori_loop(1, frames, lambda t, o: lax.dynamic_update_slice_in_dim(
        o, as_bits(produce(t)), start + (t - 1) * step, axis), out)
    return lax.bitcast_convert_type(out, first.dtype)


def as_bits(x: jax.Array) -> jax.Array:
    """A bf16 (or f16) x as its bits, other arrays as they are. XLA:CPU carries no bf16 array
    into a loop: it converts each to an f32 copy first, which the loop converts back frame
    by frame (1.1 GB written after the decoder's last upsampler at 17x256x256). Bits it
    carries as they are, and a loop's bits are the next loop's without a copy; converting
    them back to floats folds into the consumer's fusion. A bf16 decode at 17x256x256 went
    from 29.8 to 27.5 s with the loops reading bits, and from 25.4 to 21.9 s with their
    outputs written as bits too."""
    if x.dtype.itemsize >= 4:
        return x
    return lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}"))


def time_frames(length: int, pads, taps: int, stride: int = 1) -> int:
    """Output frames of a conv with `taps` time taps over `length` frames padded by pads[0]."""
    return (length + pads[0][0] + pads[0][1] - taps) // stride + 1


def frame_taps_conv(frames, kernel: jax.Array, pads, numerics: Numerics, out_dtype=None,
                    strides=None) -> jax.Array:
    """`sum_d conv2d(frames[d], kernel[d])` with the zero pads of `pads` and `strides` (None: 1)
    in space: bf16 matmuls (`shifted_matmul`: stride 1 or 2) where they apply, else one XLA
    conv per tap. In `out_dtype` (default: the compute dtype); the matmul form sums in f32
    and rounds once."""
    space = zero_pads(pads)[-2:]
    out_dtype = out_dtype or numerics.dtype
    if use_shifted_matmul(numerics.dtype) and shifted_matmul.takes_strides(strides):
        return shifted_matmul.frame_conv(frames, kernel, space, numerics.dtype, numerics.precision, strides,
                                         out_dtype=out_dtype)
    return sum(xla_conv(numerics, f, kernel[d], space, strides) for d, f in enumerate(frames)).astype(out_dtype)


def conv_frames(x: jax.Array, kernel: jax.Array, pads, numerics: Numerics, strides=None) -> jax.Array:
    """The conv of unpadded x by `kernel` with the (lo, hi, mode) `pads`, no bias, as a loop over
    output frames: per frame, `frame_taps_conv` of the frames its time taps read. A 2D kernel
    takes every leading index of x as a frame."""
    if kernel.ndim == 4:
        *lead, h, w, c = x.shape
        y = conv_frames(x.reshape(-1, h, w, c), kernel[None], ((0, 0, ZEROS), *pads), numerics,
                        strides and (1, *strides))
        return y.reshape(*lead, *y.shape[1:])
    stride = strides[0] if strides else 1
    read = frame_reader(x, pads)
    taps = kernel.shape[0]
    return frame_loop(time_frames(x.shape[-4], pads, taps, stride),
                      lambda t: frame_taps_conv([read(stride * t + d) for d in range(taps)], kernel, pads,
                                                numerics, strides=strides and tuple(strides[1:])),
                      x.ndim - 4)

