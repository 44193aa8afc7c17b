"""Convolutions computed in a form XLA runs faster than the literal one, same numbers.

Each function takes a `layers.Conv` (its kernel, bias, padding, dtype) and returns
what calling it on the stated input returns, up to float rounding:

- `nearest2x_conv(conv, x)` is `conv(x upsampled 2x nearest in H and W)`. After a nearest 2x
  upsample every output pixel of a 3x3 conv sees only two distinct rows and two
  distinct columns of x, so each of the four output phases is a 2x2 conv of x with
  summed taps: 4/9 of the multiply-adds, and the 4x larger input is never built.
  The decoder's upsamplers carry ~40% of its FLOPs, which makes this the largest
  single saving in decode (benchmarks/README.md has the figures).
- `matmul_conv(conv, x)` handles convs with few input or output channels (the RGB
  `conv_out`s, and the `conv_in`s but the 3D ones on CPU), which XLA:CPU's convolution
  ran at a few GFLOP/s: the
  taps become one matmul, then a sum of shifted slices (few outputs) or the
  shifted slices are stacked first (few inputs).
- `time_fold_conv(conv, x)` runs a 3D conv with RGB-sized input (the encoder's `conv_in`)
  as one 2D conv of the time-shifted frames stacked on channels, on CPU: 0.56 s against
  1.22 s for `matmul_conv` and 1.05 s for the time split, at 17x256x256 with 128 outputs
  (benchmarks/conv_forms.py).
- `time_split_conv(conv, x)` runs a 3D conv as one 2D conv per time tap, summed.
  XLA:CPU's 2D convolution runs them 1.2-2.3x faster than its 3D one (more for narrow
  convs; benchmarks/conv_forms.py on the full-size model's widths). Other backends have fast 3D
  convolutions, so `Conv` uses it on CPU only, and only while its extra memory (two
  more conv outputs) stays under TIME_SPLIT_MAX_EXTRA_BYTES. The 3D phase convs of
  `nearest2x_conv` (the time-doubling upsamplers) are split the same way.

`compiler_options()` goes with these forms: jaxlib 0.10's XLA:CPU hands 2D
convolutions to YNNPACK, whose f32 convolution ran the model's 3x3 convs at 81-122
GFLOP/s on an AVX2 CPU where XLA's own (Eigen) convolution reached 133-143. YNNPACK
keeps the dots and the reductions: without its reduce fusions XLA writes GroupNorm's
squared deviations out in full before summing them, a whole activation more at the
peak (2.7 GiB of a 17x576x576 decode piece). Every jit of this package passes it; pass
it to your own `jax.jit` around the models on CPU.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

if TYPE_CHECKING:
    from .layers import Conv

# One spatial axis of padding: (before, after, mode) with mode "zeros" or "edge".
# "edge" is torch's "replicate".
AxisPad = tuple[int, int, str]

ZEROS = "zeros"
EDGE = "edge"

# At most this many channels on either side and `matmul_conv` beats XLA:CPU's convolution.
FEW_CHANNELS = 8
# The time split keeps two more conv outputs alive than the 3D conv does. Like a cuDNN
# workspace limit, this caps that extra memory: above it, big tiles take the 3D conv.
TIME_SPLIT_MAX_EXTRA_BYTES = 2**31
# XLA:CPU options: YNNPACK keeps the dots and reductions, convolutions go back to XLA.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options() -> dict[str, str] | None:
    """The `jax.jit(..., compiler_options=...)` for this package's models on the default backend."""
    return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


def pad_input(x: jax.Array, pads, modes=(ZEROS, EDGE)) -> jax.Array:
    """Apply the (lo, hi, mode) pads whose mode is in `modes` to the trailing spatial axes of x."""
    lead = ((0, 0),) * (x.ndim - len(pads) - 1)
    for mode, np_mode in ((ZEROS, "constant"), (EDGE, "edge")):
        widths = lead + tuple((lo, hi) if m == mode else (0, 0) for lo, hi, m in pads) + ((0, 0),)
        if mode in modes and any(w != (0, 0) for w in widths):
            x = jnp.pad(x, widths, mode=np_mode)
    return x


def zero_pads(pads) -> list[tuple[int, int]]:
    """The zero pads as lax padding: the convolution pads them itself, which XLA:CPU runs
    up to 3x faster than a VALID convolution of a zero-padded copy."""
    return [(lo, hi) if m == ZEROS else (0, 0) for lo, hi, m in pads]


def unit_strides(conv: "Conv") -> bool:
    return conv.strides in (1, None) or set(conv.strides) == {1}


def _conv(conv: "Conv", x: jax.Array, kernel: jax.Array, padding, split_time: bool = False) -> jax.Array:
    """A stride-1 conv of channels-last x (any leading batch axes) in the Conv's dtype, no bias.

    With `split_time` a 3D conv runs as one 2D conv per time tap on shifted frames, summed."""
    n = kernel.ndim - 2
    if split_time:
        frames = _time_taps(x, padding[0], kernel.shape[0])
        return sum(_conv(conv, f, kernel[d], padding[1:]) for d, f in enumerate(frames))
    batch = x.shape[: x.ndim - n - 1]
    spatial = "DHW"[-n:]
    y = lax.conv_general_dilated(
        x.reshape(-1, *x.shape[-n - 1:]).astype(conv.dtype), kernel.astype(conv.dtype),
        (1,) * n, padding,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        precision=conv.precision)
    return y.reshape(*batch, *y.shape[1:])


def _time_taps(x: jax.Array, time_pad: tuple[int, int], taps: int) -> list[jax.Array]:
    """The frames each time tap of a stride-1 3D conv reads: x zero-padded in time by
    `time_pad`, shifted by 0 .. taps - 1."""
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 4) + [time_pad] + [(0, 0)] * 3)
    t = x.shape[-4] - taps + 1
    return [x[..., d:d + t, :, :, :] for d in range(taps)]


def _add_bias(conv: "Conv", y: jax.Array, repeat: int = 1) -> jax.Array:
    if conv.bias is None:
        return y
    return y + jnp.tile(conv.bias[...], repeat).astype(conv.dtype)


def _phase_taps(k: jax.Array, axis: int) -> jax.Array:
    """3 taps (w0, w1, w2) along `axis` -> 2 taps per output phase, stacked on a new last-but-one
    axis: phase 0 reads rows (m-1, m) with (w0, w1 + w2), phase 1 rows (m, m+1) with (w0 + w1, w2)."""
    w0, w1, w2 = (lax.index_in_dim(k, i, axis) for i in range(3))
    even = jnp.concatenate([w0, w1 + w2], axis)
    odd = jnp.concatenate([w0 + w1, w2], axis)
    return jnp.stack([even, odd], axis=-2)


def nearest2x_conv(conv: "Conv", x: jax.Array, up_time: int = 1) -> jax.Array:
    """`conv(x repeated 2x in H and W)` for a stride-1 conv whose last two axes are 3x3 padded by one.

    With `up_time=n` the conv's n*C outputs are n frames of C channels (torch
    `rearrange(x, "b (n c) t h w -> b c (t n) h w")`) and the first output frame
    is dropped: 1 + k frames become 1 + n*k.
    """
    check_nearest2x(conv)
    k = conv.kernel[...]  # (..., 3, 3, I, O)
    n = k.ndim - 2
    k = _phase_taps(k, n - 2)  # (..., 2, 3, I, 2, O)
    k = _phase_taps(k, n - 1)  # (..., 2, 2, I, 2, 2, O)
    *taps, cin, _, _, cout = k.shape
    # Padding x by one (zeros or edge) is padding the upsampled image by one.
    y = _conv(conv, pad_input(x, conv.pads, (EDGE,)), k.reshape(*taps, cin, 4 * cout),
              zero_pads(conv.pads), split_time=use_time_split(conv, x, 4 * cout))
    y = _add_bias(conv, y, 4)
    *lead, hp, wp, _ = y.shape
    h, w = hp - 1, wp - 1
    c = cout // up_time
    y = y.reshape(*lead, hp, wp, 2, 2, up_time, c)
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


def check_nearest2x(conv: "Conv") -> None:
    k, pads = conv.kernel_size, conv.pads
    if k[-2:] != (3, 3) or any(p[:2] != (1, 1) for p in pads[-2:]) or not unit_strides(conv):
        raise ValueError(f"nearest2x_conv needs a stride-1 3x3 conv padded by one in space, "
                         f"got kernel {k}, pads {pads}, strides {conv.strides}")


def matmul_conv(conv: "Conv", x: jax.Array) -> jax.Array:
    """`conv(x)` for a stride-1 conv with at most FEW_CHANNELS input or output channels."""
    k = conv.kernel[...]
    *taps, cin, cout = k.shape
    n = len(taps)
    xp = pad_input(x, conv.pads).astype(conv.dtype)
    out = tuple(s - t + 1 for s, t in zip(xp.shape[-n - 1:-1], taps))
    offsets = list(itertools.product(*(range(t) for t in taps)))

    def window(a, off):
        return a[(...,) + tuple(slice(o, o + s) for o, s in zip(off, out)) + (slice(None),)]

    if cout <= FEW_CHANNELS:
        # Every input pixel's contribution to every tap at once, then each output sums its taps.
        y = jnp.dot(xp, k.reshape(-1, cin, cout).transpose(1, 0, 2).reshape(cin, -1).astype(conv.dtype),
                    precision=conv.precision)
        y = y.reshape(*y.shape[:-1], len(offsets), cout)
        acc = sum(window(y[..., i, :], off) for i, off in enumerate(offsets))
    else:
        cols = jnp.concatenate([window(xp, off) for off in offsets], axis=-1)
        acc = jnp.dot(cols, k.reshape(-1, cout).astype(conv.dtype), precision=conv.precision)
    return _add_bias(conv, acc)


def time_split_conv(conv: "Conv", x: jax.Array) -> jax.Array:
    """`conv(x)` for a stride-1 3D conv, as a sum over its time taps of 2D convs on shifted frames."""
    y = _conv(conv, pad_input(x, conv.pads, (EDGE,)), conv.kernel[...], zero_pads(conv.pads), split_time=True)
    return _add_bias(conv, y)


def time_fold_conv(conv: "Conv", x: jax.Array) -> jax.Array:
    """`conv(x)` for a stride-1 3D conv, as one 2D conv of the time taps' shifted frames stacked
    on the channel axis (time taps x input channels inputs)."""
    k = conv.kernel[...]  # (kt, kh, kw, I, O)
    kt, kh, kw, cin, cout = k.shape
    padding = zero_pads(conv.pads)
    stacked = jnp.concatenate(_time_taps(pad_input(x, conv.pads, (EDGE,)), padding[0], kt), axis=-1)
    kernel = jnp.moveaxis(k, 0, 2).reshape(kh, kw, kt * cin, cout)
    return _add_bias(conv, _conv(conv, stacked, kernel, padding[1:]))


def use_time_fold(conv: "Conv") -> bool:
    """Whether a 3D conv should run as `time_fold_conv`: on CPU, stride 1, RGB-sized input
    and wide output (the encoder's `conv_in`), where it ran 2.2x faster than `matmul_conv`."""
    return (len(conv.kernel_size) == 3 and conv.kernel_size[0] > 1 and unit_strides(conv)
            and conv.in_features <= FEW_CHANNELS < conv.out_features
            and jax.default_backend() == "cpu")


def use_time_split(conv: "Conv", x: jax.Array, out_features: int | None = None) -> bool:
    """Whether a stride-1 3D conv of x with `out_features` outputs (the conv's by default) should
    run as 2D convs per time tap: on CPU, with the workspace under the cap."""
    if len(conv.kernel_size) != 3 or conv.kernel_size[0] == 1 or not unit_strides(conv):
        return False
    if jax.default_backend() != "cpu":
        return False
    out_elems = math.prod(x.shape[:-1]) * (out_features or conv.out_features)  # same-size output
    return 2 * out_elems * jnp.dtype(conv.dtype).itemsize <= TIME_SPLIT_MAX_EXTRA_BYTES
