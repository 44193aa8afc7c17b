"""Convolutions computed in a form XLA runs faster than the literal one, same numbers.

Each function takes a `layers.Conv` (its kernel, bias, padding, dtype) and returns
what calling it on the stated input returns, up to float rounding:

- `strided_conv(conv, x)` runs a strided conv (the downsamplers, the discriminator's first
  conv) on CPU: forward, a 3D one as a loop over output frames of 2D strided convs per
  time tap (1.2-3x faster than XLA:CPU's 3D strided conv), a 2D one as XLA's conv; the
  backward of the same conv split by stride phase into stride-1 convs, as XLA:CPU's
  gradients of the strided conv ran 5-120x slower than its forward; the phases' input
  gradients are interleaved into one buffer (`phase_conv`).
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
- `time_loop_conv(conv, x)` runs a 3D conv as a loop over its output frames (`frame_loop`):
  per frame, one 2D conv per time tap, summed and written into the output in place. XLA:CPU's 2D
  convolution runs them 1.3-2x faster than its 3D one (benchmarks/conv_forms.py on the
  full-size model's widths), and one frame at a time keeps one frame's tap outputs
  alive, not three whole outputs. Other backends have fast 3D convolutions, so `Conv`
  uses it on CPU only. Its backward pass is that of whole-clip 2D convs per time tap,
  as the loop's own ran 20x slower. The 3D phase convs of `upsample.nearest2x_conv` (the
  time-doubling upsamplers) loop the same way (`padded_conv`).
- With bf16 compute on a CPU with bf16 dot products (`conv_core.use_shifted_matmul`), every conv of
  stride 1 or 2 (`shifted_matmul.takes_strides`) with more than FEW_CHANNELS on both sides
  runs as bf16 matmuls with f32 sums (`shifted_matmul.frame_conv`), frame by frame: in
  the time loop, and for 2D and 1x1x1 convs in a loop of their own (`shifted_matmul_conv`).
  XLA:CPU runs its convolutions in f32 whatever the dtype; its bf16 matmuls run on AMX or
  AVX512_BF16. The gradients keep the forms above.

What the forms share lives beside this module: `conv_core` (the pads, XLA's conv, which
backend the forms are for), `frame_loop` (the loop over output frames) and `phase_conv`
(strided convs and the gradients XLA:CPU runs fast).

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
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from . import conv_core, remat
from .conv_core import EDGE, FEW_CHANNELS, Numerics, pad_input, unit_strides, xla_conv, zero_pads
from .frame_loop import conv_frames
from .phase_conv import edge_padded_conv, edge_padded_grads, kernel_grad, split_grad_conv

if TYPE_CHECKING:
    from .layers import Conv

# XLA:CPU options: YNNPACK keeps the dots and reductions, convolutions go back to XLA.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options() -> dict[str, str] | None:
    """The `jax.jit(..., compiler_options=...)` for this package's models on the default backend."""
    return dict(CPU_COMPILER_OPTIONS) if conv_core.on_cpu() else None


def _time_loop(conv: "Conv", x: jax.Array, kernel: jax.Array, pads) -> jax.Array:
    """The stride-1 3D conv of unpadded x by `kernel` with the (lo, hi, mode) `pads`, no bias,
    as a loop over output frames: per frame, one 2D conv per time tap, summed and written
    into the output in place."""
    return _time_loop_fn(x, kernel, tuple(pads), Numerics(conv.dtype, conv.precision))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _time_loop_fn(x, kernel, pads, numerics):
    return conv_frames(x, kernel, pads, numerics)


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
    return sum(xla_conv(numerics, f, kernel[d], zero_pads(pads)[1:]) for d, f in enumerate(frames))


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
    gk = jnp.stack([kernel_grad(numerics, f, kernel[d], space, g) for d, f in enumerate(frames)])
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
    (2D); the backward of the same conv split into stride phases (`phase_conv`), stride-1
    convs whose gradients XLA:CPU runs on its fast path. The gradients of the strided conv
    itself are dilated convs: 9.8 s against a 0.53 s forward for the encoder's 128-channel
    time-and-space downsampler at 17x128x128 (input gradient), 9.3 s against 0.08 s for the
    discriminator's first conv."""
    return _add_bias(conv, edge_padded_conv(conv, x, tuple(conv.strides)))


def shifted_matmul_conv(conv: "Conv", x: jax.Array) -> jax.Array:
    """`conv(x)` for a stride-1 2D conv, or a 3D one with one time tap, as `shifted_matmul.conv`
    frame by frame, with the gradients of `split_grad_conv`."""
    return _add_bias(conv, edge_padded_conv(conv, x, None))


def padded_conv(x: jax.Array, kernel: jax.Array, pads, numerics: Numerics) -> jax.Array:
    """The stride-1 conv of unpadded x by `kernel` with the (lo, hi, mode) `pads`, no bias, in the
    form this backend runs fastest: on CPU the time loop for 3D kernels with time taps, else
    the conv with `split_grad_conv`'s gradients."""
    if kernel.ndim == 5 and kernel.shape[0] > 1 and conv_core.on_cpu():
        return _time_loop_fn(x, kernel, tuple(pads), numerics)
    xe = pad_input(x, pads, (EDGE,))
    if conv_core.on_cpu():
        return split_grad_conv(xe, kernel, tuple(zero_pads(pads)), None, numerics)
    return xla_conv(numerics, xe, kernel, zero_pads(pads))


def padded_conv_grads(x: jax.Array, kernel: jax.Array, pads, numerics: Numerics,
                      g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The (x, kernel) cotangents of `padded_conv` on CPU for its output cotangent g: its custom
    VJPs' rules, so no forward pass is traced for `cvvae_jax.flops` to count."""
    if kernel.ndim == 5 and kernel.shape[0] > 1:
        return _time_loop_bwd(tuple(pads), numerics, (x, kernel), g)
    return edge_padded_grads(x, kernel, pads, None, numerics, g)


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
    return _add_bias(conv, xla_conv(conv, stacked, kernel, zero_pads(conv.pads)[1:]))


def use_time_fold(conv: "Conv") -> bool:
    """Whether a 3D conv should run as `time_fold_conv`: on CPU, stride 1, RGB-sized input
    and wide output (the encoder's `conv_in`), where it ran 2.2x faster than `matmul_conv`."""
    return use_time_loop(conv) and conv.in_features <= FEW_CHANNELS < conv.out_features


def use_strided_conv(conv: "Conv") -> bool:
    """Whether a conv should run as `strided_conv`: strided, on CPU."""
    return not unit_strides(conv) and conv_core.on_cpu()


def use_time_loop(conv: "Conv") -> bool:
    """Whether a 3D conv should run as `time_loop_conv`: stride 1, more than one time tap, on CPU."""
    return (len(conv.kernel_size) == 3 and conv.kernel_size[0] > 1 and unit_strides(conv)
            and conv_core.on_cpu())
