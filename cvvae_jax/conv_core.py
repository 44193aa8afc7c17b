"""What every conv form shares: padding modes, the pads, the XLA conv itself, and which
backend the forms are chosen for.

torch pads explicitly before its convolutions (replicate in time, zeros or replicate in
space); the layers replicate explicitly too (`pad_input`) and let the convolution pad the
zeros (`zero_pads`), so the numbers match.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import shifted_matmul

if TYPE_CHECKING:
    from .layers import Conv

# One spatial axis of padding: (before, after, mode) with mode "zeros" or "edge".
# "edge" is torch's "replicate".
AxisPad = tuple[int, int, str]

ZEROS = "zeros"
EDGE = "edge"

# At most this many channels on either side and `conv_forms.matmul_conv` beats XLA:CPU's convolution.
FEW_CHANNELS = 8


def on_cpu() -> bool:
    """Whether the CPU forms apply: the default backend is a CPU. Every CPU-only choice of
    the conv forms asks here, so a test can run the accelerators' forms on a CPU."""
    return jax.default_backend() == "cpu"


def use_shifted_matmul(dtype) -> bool:
    """Whether convs computed in `dtype` run as bf16 matmuls (`shifted_matmul`): bf16
    compute on a CPU with bf16 dot products (`shifted_matmul.bf16_dot_flag`), where XLA:CPU's
    convolutions run in f32 but its bf16 matmuls do not. Their gradients keep `conv_forms`'s forms."""
    return jnp.dtype(dtype) == jnp.bfloat16 and on_cpu() and shifted_matmul.bf16_dot_flag() is not None


def pad_input(x: jax.Array, pads, modes=(ZEROS, EDGE)) -> jax.Array:
    """Apply the (lo, hi, mode) pads whose mode is in `modes` to the trailing spatial axes of x."""
    first = x.ndim - len(pads) - 1
    if ZEROS in modes:
        widths = zero_pads(pads)
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


def xla_conv(conv, x: jax.Array, kernel: jax.Array, padding, strides=None) -> jax.Array:
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


class Numerics(NamedTuple):
    """What `xla_conv` reads of a Conv, hashable: a static argument of the custom VJPs."""
    dtype: Any
    precision: Any
