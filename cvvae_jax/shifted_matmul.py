"""Stride-1 and stride-2 convolutions as bf16 matmuls over shifted windows of flattened
frames, for CPUs with bf16 dot products (AMX tiles or AVX512_BF16).

XLA:CPU runs every convolution in f32: its float normalization converts bf16 operands to
f32 first, so bf16 compute made the model no faster there. Its bf16 x bf16 -> f32 dot
goes to YNNPACK, which uses the bf16 dot products of CPUs that have them: on a 2-core
Xeon with AMX a 4096^2 bf16 matmul ran at 1167 GFLOP/s against 270 in f32, while XLA's
f32 convolutions ran the model's 3x3 convs at 240-360 GFLOP/s; on a 2-core AMD EPYC with
AVX512_BF16 (and AVX512_VP2INTERSECT, no AMX) 725-831 against 390-411, and these forms ran
the causal 3x3x3 convs below at 707 / 848 / 734 GFLOP/s against 327 / 412 / 394 for
XLA's f32 ones. On an earlier AMD EPYC with AVX512_BF16 (without VP2INTERSECT), forms
without the bands and the stacked taps below ran slower than XLA's f32 convolutions; the
present forms have not run there.

Zero-padded to Hp x Wp and flattened to rows (Hp * Wp, C), a frame's tap (dh, dw) of a
stride-1 conv reads the rows shifted by dh * Wp + dw: the conv is a sum of matmuls of
contiguous row windows. Outputs are computed on the padded width (Wp columns, of which
the first Wo are kept) so that every tap is one window. One axis of taps is stacked on
the contraction axis, K = taps x C (the time taps of a 3D conv, else the row taps), as
AMX runs narrow contractions slowly (a 81920x128 by 128x128 bf16 matmul at 209 GFLOP/s,
81920x384 by 384x128 at 527). Every other tap is one matmul of a window of that stack
(each row tap its own window), whose f32 output the sum reads at the column tap's shift.
Stacking a second axis copied more than it saved: with the time and column taps stacked
(K = 9C) a 128-channel 3x3x3 conv on 3x576x576 frames ran at 249 GFLOP/s, against 500.

The output rows go in bands, a loop whose matmul operand is about BAND_BYTES and whose
sums are rounded band by band. YNNPACK ran a tall matmul at half the rate of the same
work in short ones (81920x384 by 384x128 at 448 GFLOP/s; forty 8192-row ones, each
called on its own, at 952), and a band's f32 sums stay in cache until they are
rounded. Operands of 0.75 / 1.5 / 3 / 6 MiB ran the 128-channel conv on 3x576x576
frames at 631 / 672 / 677 / 640 GFLOP/s and a 512-channel one on 5x72x72 at 956 / 994 /
873 / 870. A causal 3x3x3 conv on 5 frames of 128x128x128 / 64x64x256 / 32x32x512 ran at
672 / 780 / 892 GFLOP/s, against 545 / 708 / 810 unbanded in the same session, and 332 /
324 / 364 for the f32 loop of XLA's 2D convs on an earlier day (`benchmarks/conv_forms.py
--options package --dtype fp32,bf16`, min of 3).

A stride-2 conv (the downsamplers) reads each of the four stride phases of the padded
frame (every other row and column, from row a and column b) as an image of its own: tap
(dh, dw) is phase (dh % 2, dw % 2) shifted by (dh // 2, dw // 2), so the taps are windows
as above, with no multiply-add wasted. Its first form, a stride-1 conv over 2x2 blocks of
pixels stacked on the channels, did 16/9 of the work of a 3x3 kernel: the encoder's
downsamplers at 17x256x256 took 0.84 / 0.49 / 0.25 s that way, 0.46 / 0.30 / 0.12 s as
phases (`benchmarks/stages.py --dtype bf16`, one session).

The forward pass of one frame: `frame_loop` loops it over frames, and `conv_forms` keeps
its own gradient forms around it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Padding = tuple[tuple[int, int], tuple[int, int]]
CPUINFO = "/proc/cpuinfo"
# The CPU flags of bf16 dot products: AMX tiles, AVX-512's.
BF16_DOT_FLAGS = ("amx_bf16", "avx512_bf16")
# A band's matmul operand, in bytes (see the module docstring).
BAND_BYTES = 3 << 19


@functools.cache
def bf16_dot_flag() -> str | None:
    """The first of BF16_DOT_FLAGS that Linux's /proc/cpuinfo lists for this CPU (None where
    it lists none, or the file does not exist): the bf16 dot products behind the matmul
    rates these forms are chosen for (see the module docstring)."""
    try:
        with open(CPUINFO) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split())
                    return next((flag for flag in BF16_DOT_FLAGS if flag in flags), None)
    except OSError:
        pass
    return None


def takes_strides(strides) -> bool:
    """Whether `frame_conv` runs a conv with these (H, W) `strides`: None (stride 1), (1, 1) or
    (2, 2), the strides whose taps are windows of one image or of its four stride phases."""
    return strides is None or tuple(strides) in ((1, 1), (2, 2))


def frame_conv(frames, kernel: jax.Array, padding: Padding, dtype, precision=None, strides=None,
               band_rows: int | None = None, out_dtype=jnp.float32) -> jax.Array:
    """`sum_d conv2d(frames[d], kernel[d])`, zero `padding` ((lo, hi), (lo, hi)) in H and W, stride
    1 or `strides` (2, 2): products of operands in `dtype`, summed in f32 and rounded once to
    `out_dtype` (f32 for a caller that adds to it first). The output rows go in bands of at
    most `band_rows` (default: a matmul operand of about BAND_BYTES).

    frames: kt arrays (..., H, W, C) sharing their leading axes; kernel (kt, kh, kw, C, O).
    """
    stride = 1 if strides is None else strides[0]
    if not takes_strides(strides):
        raise ValueError(f"frame_conv: strides {strides}; 1 or 2 in H and W")
    kt, kh, kw, cin, cout = kernel.shape
    (hlo, hhi), (wlo, whi) = padding
    *lead, h, w, _ = frames[0].shape
    hp, wp = h + hlo + hhi, w + wlo + whi
    ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    # Each stride phase of the padded frame is an image of its own, hq x wq: tap (dh, dw)
    # reads phase (dh % s, dw % s) shifted by (dh // s, dw // s).
    hq, wq = -(-hp // stride), -(-wp // stride)
    rows = ho * wq
    # One axis of taps on the contraction axis: time taps, else (stride 1) row taps.
    stack_rows = kt == 1 and stride == 1
    depth, reach = (kh if stack_rows else kt) * cin, (kw - 1) // stride
    band_rows = band_rows or max(1, BAND_BYTES // (depth * jnp.dtype(dtype).itemsize))
    bands = -(-rows // band_rows)
    band = -(-rows // bands)
    # Each band's windows run `reach` rows past it, the last band's past the phase image.
    span = bands * band + reach
    length = max((kh - 1) // stride * wq + span, hq * wq)
    row = len(lead)
    bits = jnp.dtype(f"uint{jnp.dtype(dtype).itemsize * 8}")
    pads = [(0, 0)] * row + [(hlo, hhi + stride * hq - hp), (wlo, whi + stride * wq - wp), (0, 0)]
    images = [jnp.pad(lax.bitcast_convert_type(f.astype(dtype), bits), pads)
              .reshape(*lead, hq, stride, wq, stride, cin) for f in frames]

    def flat(image, a, b):
        f = image[..., a, :, b, :].reshape(*lead, hq * wq, cin)
        return jnp.pad(f, [(0, 0)] * row + [(0, length - hq * wq), (0, 0)])

    def stacked(parts):
        return parts[0] if len(parts) == 1 else jnp.stack(parts, axis=-2).reshape(*lead, -1, depth)

    def matrices(taps):
        return [k.reshape(depth, cout).astype(dtype) for k in taps]

    # (stack, [(row offset, matrices of the column shifts 0, 1, ...)]) per phase image that
    # a tap reads.
    if stack_rows:
        image = flat(images[0], 0, 0)
        groups = [(stacked([image[..., dh * wq:dh * wq + span, :] for dh in range(kh)]),
                   [(0, matrices(kernel[0, :, dw] for dw in range(kw)))])]
    else:
        groups = [(stacked([flat(image, a, b) for image in images]),
                   [(dh // stride * wq, matrices(kernel[:, dh, dw] for dw in range(b, kw, stride)))
                    for dh in range(a, kh, stride)])
                  for a in range(min(stride, kh)) for b in range(min(stride, kw))]

    def band_sum(i):
        y = None
        for stack, windows in groups:
            for offset, ks in windows:
                window = lax.dynamic_slice_in_dim(stack, i * band + offset, band + reach, row)
                window = lax.bitcast_convert_type(window, dtype)
                for shift, k in enumerate(ks):
                    out = jnp.dot(window, k, precision=precision, preferred_element_type=jnp.float32)
                    out = lax.slice_in_dim(out, shift, shift + band, axis=row)
                    y = out if y is None else y + out
        return y

    if bands == 1:
        y = band_sum(0).astype(out_dtype)
    else:
        # Into zeros: with the first band padded to the whole as the buffer (`frame_loop.frame_loop`),
        # a 128-channel conv of 3x576x576 frames took 1.54 s, against 1.35 s. Carried as bits, as
        # XLA:CPU carries no bf16 array into a loop (`frame_loop.as_bits`).
        out_bits = jnp.dtype(f"uint{jnp.dtype(out_dtype).itemsize * 8}")
        y = lax.fori_loop(0, bands, lambda i, y: lax.dynamic_update_slice_in_dim(
            y, lax.bitcast_convert_type(band_sum(i).astype(out_dtype), out_bits), i * band, row),
            jnp.zeros((*lead, bands * band, cout), out_bits))
        y = lax.bitcast_convert_type(y, out_dtype)
    y = lax.slice_in_dim(y, 0, rows, axis=row)
    return y.reshape(*lead, ho, wq, cout)[..., :wo, :]
