"""FLOPs of a traced function: its convolutions' and matmuls' multiply-adds, times two.

XLA's cost analysis counts a while loop's body once, so it undercounts the CPU time
loops of `conv_forms` (and any `lax.scan`) by their trip counts. This count walks the
jaxpr instead: a scan's body counts `length` times, a cond its costliest branch,
calls, `jax.checkpoint` and custom-derivative functions their inner jaxprs. Taken on a
step traced with `jax.value_and_grad` it includes the backward pass and what a remat
policy recomputes. A convolution counts every kernel tap at every output position,
padding included (XLA counts only the taps inside the input). Elementwise work,
reductions and other primitives are not counted. A `while` loop of unknown trip count
counts its body once.

`peak_tflops(device_kind)` is the other half of an MFU: the device's dense bf16 peak.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
from jax.extend import core

# Dense (no sparsity) bf16 peaks in TFLOP/s per device, the denominator MaxText's MFU uses
# for every compute dtype. GPUs are matched by a part of their device kind, most specific
# first ("NVIDIA H100 80GB HBM3" is the SXM part); TPUs by the whole kind, as "TPU v4 lite"
# is another chip than "TPU v4" and "TPU v5" is the v5p.
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                   ("A100", 312.0))
TPU_PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5": 459.0,
                   "TPU v5p": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0}


def flops(fn: Callable, *args, **kwargs) -> int:
    """2 x the multiply-adds of the convolutions and matmuls `fn(*args, **kwargs)` runs.

    Arguments may be arrays or `jax.ShapeDtypeStruct`s; `fn` is traced, not run. For a
    jitted function traced anyway, `jaxpr_flops(fn.trace(*args).jaxpr)` saves a trace."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))


def peak_tflops(device_kind: str) -> float | None:
    """The dense bf16 peak of a `jax.Device.device_kind` in TFLOP/s; None where it is not
    known (CPUs, other accelerators): pass the peak yourself there."""
    if device_kind in TPU_PEAK_TFLOPS:
        return TPU_PEAK_TFLOPS[device_kind]
    for part, peak in GPU_PEAK_TFLOPS:
        if part.lower() in device_kind.lower():
            return peak
    return None


def jaxpr_flops(jaxpr: core.Jaxpr | core.ClosedJaxpr) -> int:
    if isinstance(jaxpr, core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    return sum(_eqn_flops(eqn) for eqn in jaxpr.eqns)


def _eqn_flops(eqn) -> int:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
        taps = math.prod(rhs[d] for d in spec[2:])
        return 2 * math.prod(eqn.outvars[0].aval.shape) * rhs[spec[1]] * taps
    if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    if name == "scan":
        return eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
    if name == "cond":
        return max(jaxpr_flops(b) for b in eqn.params["branches"])
    return sum(jaxpr_flops(j) for j in _inner_jaxprs(eqn.params.values()))


def _inner_jaxprs(values) -> list[core.Jaxpr | core.ClosedJaxpr]:
    found = []
    for v in values:
        if isinstance(v, (core.Jaxpr, core.ClosedJaxpr)):
            found.append(v)
        elif isinstance(v, (tuple, list)):
            found.extend(_inner_jaxprs(v))
    return found
