"""Convolutions computed in a form XLA runs faster than the literal one, same numbers.

Each function takes a `layers.Conv` (its kernel, bias, padding, dtype) and returns
what calling it on the stated input returns, up to float rounding:

- `strided_conv(conv, x)` runs a strided conv (the downsamplers, the discriminator's first
  conv) on CPU: forward, a 3D one as a loop over output frames of 2D strided convs per
  time tap (1.2-3x faster than XLA:CPU's 3D strided conv), a 2D one as XLA's conv; the
  backward of the same conv split by stride phase into stride-1 convs, as XLA:CPU's
  gradients of the strided conv ran 5-120x slower than its forward; the phases' input
  gradients are interleaved into one buffer.
- `matmul_conv(conv, x)` handles convs with few input or output channels (the RGB
  `conv_out`s, and the `conv_in`s but the 3D ones on CPU), which XLA:CPU's convolution
  ran at a few GFLOP/s: the
  taps become one matmul, then a sum of shifted slices (few outputs) or the
  shifted slices are stacked first (few inputs). The few-output form has its own
  backward pass, which writes the taps' cotangents into one buffer.
- `time_fold_conv(conv, x)` runs a 3D conv with RGB-sized input (the encoder's `conv_in`)
  as one 2D conv of the time-shifted frames stacked on channels, on CPU: 0.56 s against
  1.22 s for `matmul_conv` and 1.05 s for 2D convs per time tap, at 17x256x256 with 128
  outputs (benchmarks/conv_forms.py).
- `time_loop_conv(conv, x)` runs a 3D conv as a loop over its output frames: per frame,
  one 2D conv per time tap, summed and written into the output in place. XLA:CPU's 2D
  convolution runs them 1.3-2x faster than its 3D one (benchmarks/conv_forms.py on the
  full-size model's widths), and one frame at a time keeps one frame's tap outputs
  alive, not three whole outputs. Other backends have fast 3D convolutions, so `Conv`
  uses it on CPU only. Its backward pass is that of whole-clip 2D convs per time tap,
  as the loop's own ran 20x slower. The 3D phase convs of `upsample.nearest2x_conv` (the
  time-doubling upsamplers) loop the same way (`padded_conv`).
- With bf16 compute on a CPU with bf16 dot products (`use_shifted_matmul`), every conv of
  stride 1 or 2 (`shifted_matmul.takes_strides`) with more than FEW_CHANNELS on both sides
  runs as bf16 matmuls with f32 sums (`shifted_matmul.frame_conv`), frame by frame: in
  the time loop, and for 2D and 1x1x1 convs in a loop of their own (`shifted_matmul_conv`).
  XLA:CPU runs its convolutions in f32 whatever the dtype; its bf16 matmuls run on AMX or
  AVX512_BF16. The gradients keep the forms above.

`compiler_options()` goes with these forms: jaxlib 0.10's XLA:CPU hands 2D
convolutions to YNNPACK, whose f32 convolution ran the model's 3x3 convs at 81-122
GFLOP/s on an AVX2 CPU where XLA's own (Eigen) convolution reached 133-143. YNNPACK
keeps the dots and the reductions: without its reduce fusions XLA writes GroupNorm's
squared deviations out in full before summing them, a whole activation more at the
peak (2.7 GiB of a 17x576x576 decode piece). Every jit of this package passes it; pass
it to your own `jax.jit` around the models on CPU.
"""

from __future__ import annotations

import functools
import itertools
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import remat, shifted_matmul

if TYPE_CHECKING:
    from .layers import Conv

# One spatial axis of padding: (before, after, mode) with mode "zeros" or "edge".
# "edge" is torch's "replicate".
AxisPad = tuple[int, int, str]

ZEROS = "zeros"
EDGE = "edge"

# At most this many channels on either side and `matmul_conv` beats XLA:CPU's convolution.
FEW_CHANNELS = 8
# XLA:CPU options: YNNPACK keeps the dots and reductions, convolutions go back to XLA.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def on_cpu() -> bool:
    """Whether the CPU forms apply: the default backend is a CPU. Every CPU-only choice of
    this module asks here, so a test can run the accelerators' forms on a CPU."""
    return jax.default_backend() == "cpu"


def use_shifted_matmul(dtype) -> bool:
    """Whether convs computed in `dtype` run as bf16 matmuls (`shifted_matmul`): bf16
    compute on a CPU with bf16 dot products (`shifted_matmul.bf16_dot_flag`), where XLA:CPU's
    convolutions run in f32 but its bf16 matmuls do not. Their gradients keep this module's forms."""
    return jnp.dtype(dtype) == jnp.bfloat16 and on_cpu() and shifted_matmul.bf16_dot_flag() is not None


def compiler_options() -> dict[str, str] | None:
    """The `jax.jit(..., compiler_options=...)` for this package's models on the default backend."""
    return dict(CPU_COMPILER_OPTIONS) if on_cpu() else None


def pad_input(x: jax.Array, pads, modes=(ZEROS, EDGE)) -> jax.Array:
    """Apply the (lo, hi, mode) pads whose mode is in `modes` to the trailing spatial axes of x."""
    first = x.ndim - len(pads) - 1
    if ZEROS in modes:
        widths = [(lo, hi) if m == ZEROS else (0, 0) for lo, hi, m in pads]
        if any(widths):
            x = jnp.pad(x, [(0, 0)] * first + widths + [(0, 0)])
    if EDGE in modes:
        for axis, (lo, hi, m) in enumerate(pads, first):
            if m == EDGE and (lo or hi):
                x = _edge_pad(x, axis, lo, hi)
    return x


def _edge_pad(x: jax.Array, axis: int, lo: int, hi: int) -> jax.Array:
    # Not jnp.pad(mode="edge"): it slices the edges of every axis, padded or not, and
    # the gradients of the unpadded axes' slices are full-size arrays of zeros that XLA
    # computes at the start of the step and holds until the backward pass adds them in
    # (six of 637 MB at the peak of the paper-width train step on 17x256x256 clips).
    n = x.shape[axis]
    parts = [jnp.repeat(lax.slice_in_dim(x, 0, 1, axis=axis), lo, axis=axis)] if lo else []
    parts.append(x)
    if hi:
        parts.append(jnp.repeat(lax.slice_in_dim(x, n - 1, n, axis=axis), hi, axis=axis))
    return lax.concatenate(parts, axis)


def zero_pads(pads) -> list[tuple[int, int]]:
    """The zero pads as lax padding: the convolution pads them itself, which XLA:CPU runs
    up to 3x faster than a VALID convolution of a zero-padded copy."""
    return [(lo, hi) if m == ZEROS else (0, 0) for lo, hi, m in pads]


def unit_strides(conv: "Conv") -> bool:
    return conv.strides in (1, None) or set(conv.strides) == {1}


def _conv(conv, x: jax.Array, kernel: jax.Array, padding, strides=None) -> jax.Array:
    """A conv (stride 1 unless `strides`) of channels-last x (any leading batch axes) in the
    dtype and precision of `conv` (a Conv or `Numerics`), no bias."""
    n = kernel.ndim - 2
    batch = x.shape[: x.ndim - n - 1]
    spatial = "DHW"[-n:]
    y = lax.conv_general_dilated(
        x.reshape(-1, *x.shape[-n - 1:]).astype(conv.dtype), kernel.astype(conv.dtype),
        strides or (1,) * n, padding,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        precision=conv.precision)
    return y.reshape(*batch, *y.shape[1:])


def _grows(kernel: jax.Array, padding) -> bool:
    """Whether zero `padding` makes the conv's output larger than its input: the 2x2-tap
    phase convs of `nearest2x_conv`, padded by one."""
    return any(lo + hi > k - 1 for (lo, hi), k in zip(padding, kernel.shape[:kernel.ndim - 2]))


def _kernel_grad(numerics, x: jax.Array, kernel: jax.Array, padding, g: jax.Array,
                 strides=None) -> jax.Array:
    """The gradient of `_conv(numerics, x, kernel, padding, strides)` with respect to `kernel`,
    for the output cotangent `g`. A strided conv, or one whose padding grows its output, gets
    it from `_phase_split` (VALID stride-1 convs of a zero-padded copy of x): XLA:CPU's
    kernel gradient of the padded form ran 200-300x slower (a 2x2-tap 256 -> 2048-channel
    conv of 9x32x32: 77.8 s against 0.25 s)."""
    if strides is not None or _grows(kernel, padding):
        strides = strides or (1,) * (kernel.ndim - 2)
        form = lambda k: _phase_split(x, k, padding, strides, numerics)  # noqa: E731
    else:
        form = lambda k: _conv(numerics, x, k, padding)  # noqa: E731
    gk, = jax.linear_transpose(form, kernel)(g)
    return gk


class Numerics(NamedTuple):
    """What `_conv` reads of a Conv, hashable: a static argument of the custom VJPs."""
    dtype: Any
    precision: Any


def _time_loop(conv: "Conv", x: jax.Array, kernel: jax.Array, pads) -> jax.Array:
    """The stride-1 3D conv of unpadded x by `kernel` with the (lo, hi, mode) `pads`, no bias,
    as a loop over output frames: per frame, one 2D conv per time tap, summed and written
    into the output in place."""
    return _time_loop_fn(x, kernel, tuple(pads), Numerics(conv.dtype, conv.precision))


def frame_reader(x: jax.Array, pads) -> Callable[[jax.Array], jax.Array]:
    """`read(i)`: frame i of x (time axis x.ndim - 4) padded in time by pads[0] = (lo, hi, mode),
    so frame 0 is the first of the lo padding, with its edge pads in space applied (zero pads
    are left to the conv). The time padding is read from x (a clamped frame index reads the
    edge frame, a masked one zeros), so no padded copy of x is made. Frames keep their time
    axis (length 1)."""
    (lo, _, mode), space = pads[0], pads[1:]
    axis = x.ndim - 4
    length = x.shape[axis]
    bits = _bits(x)

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
    out = jnp.pad(_bits(first), [(0, 0)] * axis + [(0, (frames - 1) * step)] + [(0, 0)] * (first.ndim - axis - 1))
    out = lax.fori_loop(1, frames, lambda t, o: lax.dynamic_update_slice_in_dim(
        o, _bits(produce(t)), start + (t - 1) * step, axis), out)
    return lax.bitcast_convert_type(out, first.dtype)


def _bits(x: jax.Array) -> jax.Array:
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
    return sum(_conv(numerics, f, kernel[d], space, strides) for d, f in enumerate(frames)).astype(out_dtype)


def _conv_frames(x: jax.Array, kernel: jax.Array, pads, numerics: Numerics, strides=None) -> jax.Array:
    """The conv of unpadded x by `kernel` with the (lo, hi, mode) `pads`, no bias, as a loop over
    output frames: per frame, `frame_taps_conv` of the frames its time taps read. A 2D kernel
    takes every leading index of x as a frame."""
    if kernel.ndim == 4:
        *lead, h, w, c = x.shape
        y = _conv_frames(x.reshape(-1, h, w, c), kernel[None], ((0, 0, ZEROS), *pads), numerics,
                         strides and (1, *strides))
        return y.reshape(*lead, *y.shape[1:])
    stride = strides[0] if strides else 1
    read = frame_reader(x, pads)
    taps = kernel.shape[0]
    return frame_loop(time_frames(x.shape[-4], pads, taps, stride),
                      lambda t: frame_taps_conv([read(stride * t + d) for d in range(taps)], kernel, pads,
                                                numerics, strides=strides and tuple(strides[1:])),
                      x.ndim - 4)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _time_loop_fn(x, kernel, pads, numerics):
    return _conv_frames(x, kernel, pads, numerics)


def _time_taps(x: jax.Array, pads, taps: int) -> list[jax.Array]:
    """The frames each time tap of a stride-1 3D conv with the (lo, hi, mode) `pads` reads:
    x padded (edge pads here, zero pads in time too; zero pads in space are left to the
    conv), shifted by 0 .. taps - 1."""
    x = pad_input(x, pads, (EDGE,))
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 4) + [zero_pads(pads)[0]] + [(0, 0)] * 3)
    t = x.shape[-4] - taps + 1
    return [x[..., d:d + t, :, :, :] for d in range(taps)]


def _time_split(x, kernel, pads, numerics):
    """The same conv as a sum over time taps of whole-clip 2D convs of shifted frames."""
    frames = _time_taps(x, pads, kernel.shape[0])
    return sum(_conv(numerics, f, kernel[d], zero_pads(pads)[1:]) for d, f in enumerate(frames))


def _time_loop_fwd(x, kernel, pads, numerics):
    return _time_loop_fn(x, kernel, pads, numerics), (x, kernel)


def _time_loop_bwd(pads, numerics, residuals, g):
    # The gradients of the whole-clip form: jax.grad through the loop itself took 513 ms
    # where the whole-clip form took 26 ms (a 32-channel conv of 9x32x32, forward and
    # backward). Transposed per argument (the conv is linear in each), not by jax.vjp,
    # which would trace a forward that XLA drops but `cvvae_jax.flops` would count.
    x, kernel = residuals
    gx, = jax.linear_transpose(lambda x: _time_split(x, kernel, pads, numerics), x)(g)
    frames = _time_taps(x, pads, kernel.shape[0])
    space = zero_pads(pads)[1:]
    gk = jnp.stack([_kernel_grad(numerics, f, kernel[d], space, g) for d, f in enumerate(frames)])
    return gx, gk


_time_loop_fn.defvjp(_time_loop_fwd, _time_loop_bwd)


def _add_bias(conv: "Conv", y: jax.Array, repeat: int = 1) -> jax.Array:
    if conv.bias is None:
        return y
    return y + jnp.tile(conv.bias[...], repeat).astype(conv.dtype)


def matmul_conv(conv: "Conv", x: jax.Array) -> jax.Array:
    """`conv(x)` for a stride-1 conv with at most FEW_CHANNELS input or output channels."""
    k = conv.kernel[...]
    *taps, _, cout = k.shape
    if cout <= FEW_CHANNELS:
        return _add_bias(conv, _tap_sum_conv(x, k, tuple(conv.pads), Numerics(conv.dtype, conv.precision)))
    xp = pad_input(x, conv.pads).astype(conv.dtype)
    out = _valid_size(xp, taps)
    cols = jnp.concatenate([_window(xp, off, out) for off in _offsets(taps)], axis=-1)
    y = jnp.dot(cols, k.reshape(-1, cout).astype(conv.dtype), precision=conv.precision,
                preferred_element_type=jnp.float32)
    return _add_bias(conv, y.astype(conv.dtype))


def _offsets(taps) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(t) for t in taps)))


def _valid_size(xp: jax.Array, taps) -> tuple[int, ...]:
    n = len(taps)
    return tuple(s - t + 1 for s, t in zip(xp.shape[-n - 1:-1], taps))


def _window(a: jax.Array, off, out) -> jax.Array:
    return a[(...,) + tuple(slice(o, o + s) for o, s in zip(off, out)) + (slice(None),)]


def _tap_matrix(k: jax.Array) -> jax.Array:
    """(taps..., I, O) -> (I, taps * O): every tap's outputs side by side."""
    cin, cout = k.shape[-2:]
    return k.reshape(-1, cin, cout).transpose(1, 0, 2).reshape(cin, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _tap_sum_conv(x, k, pads, numerics):
    # Every input pixel's contribution to every tap at once (one matmul), then each output
    # sums its taps' shifted slices. Summed in f32 (the accumulation of every matmul form
    # here): XLA:CPU runs a bf16 matmul with a bf16 result as an f32 one, with an f32 result
    # on the CPU's bf16 units (YNNPACK).
    taps = k.shape[:-2]
    xp = pad_input(x, pads).astype(numerics.dtype)
    y = jnp.dot(xp, _tap_matrix(k).astype(numerics.dtype), precision=numerics.precision,
                preferred_element_type=jnp.float32)
    y = y.reshape(*y.shape[:-1], -1, k.shape[-1])
    out = _valid_size(xp, taps)
    return sum(_window(y[..., i, :], off, out) for i, off in enumerate(_offsets(taps))).astype(numerics.dtype)


def _tap_sum_conv_fwd(x, k, pads, numerics):
    return _tap_sum_conv(x, k, pads, numerics), (x, k)


def _tap_sum_conv_bwd(pads, numerics, residuals, g):
    """The taps' cotangents written into one (..., taps, O) buffer, then two matmuls. Autodiff
    of the forward summed one zero-padded full-size cotangent per tap instead, XLA keeping a
    dozen alive at once (391 MiB each for the decoder's `conv_out` at 17x256x256: the top of
    the paper-width train step's memory plan). Saves the unpadded input, not its padded copy.
    A non-finite g[0] makes the gradient non-finite, which the train step's guard skips."""
    x, k = residuals
    taps = k.shape[:-2]
    n = len(taps)
    # Tied to g, or CSE merges this pad with the forward's and the padded copy stays alive
    # from the forward pass to here.
    xp, pad_vjp = jax.vjp(lambda x: pad_input(x, pads).astype(numerics.dtype), remat.tie(x, g))
    out = _valid_size(xp, taps)
    lead = [(0, 0)] * (g.ndim - n - 1)
    dy = jnp.stack([jnp.pad(g, lead + [(o, p - o - s) for o, s, p in zip(off, out, xp.shape[-n - 1:-1])]
                            + [(0, 0)]) for off in _offsets(taps)], axis=-2)
    dy = dy.reshape(*dy.shape[:-2], -1).astype(numerics.dtype)
    kmat = _tap_matrix(k).astype(numerics.dtype)
    dxp = jnp.dot(dy, kmat.T, precision=numerics.precision, preferred_element_type=jnp.float32)
    dkmat = jnp.dot(xp.reshape(-1, xp.shape[-1]).T, dy.reshape(-1, dy.shape[-1]),
                    precision=numerics.precision, preferred_element_type=jnp.float32)
    dk = dkmat.reshape(k.shape[-2], -1, k.shape[-1]).transpose(1, 0, 2).reshape(k.shape)
    dx, = pad_vjp(dxp.astype(xp.dtype))
    return dx, dk.astype(k.dtype)


_tap_sum_conv.defvjp(_tap_sum_conv_fwd, _tap_sum_conv_bwd)


def strided_conv(conv: "Conv", x: jax.Array) -> jax.Array:
    """`conv(x)` for a strided conv, on CPU: forward frame by frame (3D) or as XLA's own conv
    (2D); the backward of the same conv split into stride phases (`_phase_split`), stride-1
    convs whose gradients XLA:CPU runs on its fast path. The gradients of the strided conv
    itself are dilated convs: 9.8 s against a 0.53 s forward for the encoder's 128-channel
    time-and-space downsampler at 17x128x128 (input gradient), 9.3 s against 0.08 s for the
    discriminator's first conv."""
    return _add_bias(conv, _edge_padded_conv(conv, x, tuple(conv.strides)))


def _edge_padded_conv(conv: "Conv", x: jax.Array, strides) -> jax.Array:
    """`_split_grad_conv` of x edge-padded by the conv's pads, no bias; where it runs frame by
    frame, the frames read their edge pads from x itself (`_frames_read_pads`)."""
    numerics = Numerics(conv.dtype, conv.precision)
    kernel = conv.kernel[...]
    if _by_frames(kernel, strides, numerics):
        return _frames_read_pads(x, kernel, tuple(map(tuple, conv.pads)), strides, numerics)
    return _split_grad_conv(pad_input(x, conv.pads, (EDGE,)), kernel, tuple(zero_pads(conv.pads)), strides,
                            numerics)


def _by_frames(kernel: jax.Array, strides, numerics: Numerics) -> bool:
    """Whether `_split_grad_conv` runs its forward frame by frame (`_conv_frames`)."""
    return _shifted_applies(kernel, strides, numerics) or (
        strides is not None and kernel.ndim == 5 and kernel.shape[0] > 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _frames_read_pads(x, kernel, pads, strides, numerics):
    # `_split_grad_conv` of x edge-padded, where it runs frame by frame: the frames read
    # their edge pads (in time, and in space frame by frame) from x itself (`frame_reader`),
    # with no padded copy of x. The encoder's first downsampler at 17x256x256 (`stages.py`'s
    # block, alternating in one process): 0.39 -> 0.35 s in bf16, 0.58 -> 0.50 s in fp32.
    return _conv_frames(x, kernel, pads, numerics, strides)


def _frames_read_pads_fwd(x, kernel, pads, strides, numerics):
    return _frames_read_pads(x, kernel, pads, strides, numerics), (x, kernel)


def _frames_read_pads_bwd(pads, strides, numerics, residuals, g):
    return _edge_padded_grads(*residuals, pads, strides, numerics, g)


def _edge_padded_grads(x, kernel, pads, strides, numerics, g):
    """The (x, kernel) cotangents of `_split_grad_conv` of x edge-padded by `pads`, whose zero
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
        part = _crop(_conv(numerics, x[(...,) + picks + (slice(None),)], kernel[picks], [(0, 0)] * n), out)
        y = part if y is None else y + part
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _split_grad_conv(x, kernel, padding, strides, numerics):
    # `_conv` (strides None: stride 1) with the gradients XLA:CPU runs fast: a strided
    # conv's from `_phase_split`, and the kernel gradient from `_kernel_grad`. Frame by frame
    # (`_conv_frames`) where bf16 matmuls apply, and for every strided 3D conv with time taps:
    # XLA:CPU ran its 2D convs per frame and tap 1.2-3x faster than its 3D strided conv (f32,
    # the encoder's downsamplers at 17x256x256: 0.64 / 0.55 / 0.32 s against 1.36 / 0.90 /
    # 0.40 s; the discriminator's RGB input conv 0.034 s against 0.10 s, and 0.045 s against
    # 0.11 s in bf16 on AMX, where its frames run as matmuls).
    if _by_frames(kernel, strides, numerics):
        return _conv_frames(x, kernel, tuple((lo, hi, ZEROS) for lo, hi in padding), numerics, strides)
    return _conv(numerics, x, kernel, padding, strides)


def _shifted_applies(kernel: jax.Array, strides, numerics: Numerics) -> bool:
    """Whether `_split_grad_conv` runs forward as bf16 matmuls: stride 1, or 2 in space (the
    downsamplers); more than FEW_CHANNELS on both sides (fewer are `matmul_conv`'s). Strided
    3D convs go frame by frame whatever this says."""
    return (use_shifted_matmul(numerics.dtype) and min(kernel.shape[-2:]) > FEW_CHANNELS
            and shifted_matmul.takes_strides(None if strides is None else strides[-2:]))


def _split_grad_conv_fwd(x, kernel, padding, strides, numerics):
    return _split_grad_conv(x, kernel, padding, strides, numerics), (x, kernel)


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
            return _crop(_conv(numerics, xp, kernel[picks], [(0, 0)] * n), out)

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
        gx, = jax.linear_transpose(lambda x: _conv(numerics, x, kernel, padding), x)(g)
    else:
        gx = _phase_input_grad(x, kernel, padding, strides, numerics, g)
    return gx, _kernel_grad(numerics, x, kernel, padding, g, strides)


_split_grad_conv.defvjp(_split_grad_conv_fwd, _split_grad_conv_bwd)


def shifted_matmul_conv(conv: "Conv", x: jax.Array) -> jax.Array:
    """`conv(x)` for a stride-1 2D conv, or a 3D one with one time tap, as `shifted_matmul.conv`
    frame by frame, with the gradients of `_split_grad_conv`."""
    return _add_bias(conv, _edge_padded_conv(conv, x, None))


def padded_conv(x: jax.Array, kernel: jax.Array, pads, numerics: Numerics) -> jax.Array:
    """The stride-1 conv of unpadded x by `kernel` with the (lo, hi, mode) `pads`, no bias, in the
    form this backend runs fastest: on CPU the time loop for 3D kernels with time taps, else
    the conv with `_split_grad_conv`'s gradients."""
    if kernel.ndim == 5 and kernel.shape[0] > 1 and on_cpu():
        return _time_loop_fn(x, kernel, tuple(pads), numerics)
    xe = pad_input(x, pads, (EDGE,))
    if on_cpu():
        return _split_grad_conv(xe, kernel, tuple(zero_pads(pads)), None, numerics)
    return _conv(numerics, xe, kernel, zero_pads(pads))


def padded_conv_grads(x: jax.Array, kernel: jax.Array, pads, numerics: Numerics,
                      g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The (x, kernel) cotangents of `padded_conv` on CPU for its output cotangent g: its custom
    VJPs' rules, so no forward pass is traced for `cvvae_jax.flops` to count."""
    if kernel.ndim == 5 and kernel.shape[0] > 1:
        return _time_loop_bwd(tuple(pads), numerics, (x, kernel), g)
    return _edge_padded_grads(x, kernel, pads, None, numerics, g)


def time_loop_conv(conv: "Conv", x: jax.Array) -> jax.Array:
    """`conv(x)` for a stride-1 3D conv, as a loop over output frames of 2D convs per time tap."""
    return _add_bias(conv, _time_loop(conv, x, conv.kernel[...], conv.pads))


def time_fold_conv(conv: "Conv", x: jax.Array) -> jax.Array:
    """`conv(x)` for a stride-1 3D conv, as one 2D conv of the time taps' shifted frames stacked
    on the channel axis (time taps x input channels inputs)."""
    k = conv.kernel[...]  # (kt, kh, kw, I, O)
    kt, kh, kw, cin, cout = k.shape
    stacked = jnp.concatenate(_time_taps(x, conv.pads, kt), axis=-1)
    kernel = jnp.moveaxis(k, 0, 2).reshape(kh, kw, kt * cin, cout)
    return _add_bias(conv, _conv(conv, stacked, kernel, zero_pads(conv.pads)[1:]))


def use_time_fold(conv: "Conv") -> bool:
    """Whether a 3D conv should run as `time_fold_conv`: on CPU, stride 1, RGB-sized input
    and wide output (the encoder's `conv_in`), where it ran 2.2x faster than `matmul_conv`."""
    return use_time_loop(conv) and conv.in_features <= FEW_CHANNELS < conv.out_features


def use_strided_conv(conv: "Conv") -> bool:
    """Whether a conv should run as `strided_conv`: strided, on CPU."""
    return not unit_strides(conv) and on_cpu()


def use_time_loop(conv: "Conv") -> bool:
    """Whether a 3D conv should run as `time_loop_conv`: stride 1, more than one time tap, on CPU."""
    return (len(conv.kernel_size) == 3 and conv.kernel_size[0] > 1 and unit_strides(conv)
            and on_cpu())
