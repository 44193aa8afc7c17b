"""This machine's XLA matmul rate per dtype: the ceiling of bf16's speed-up over fp32.

    python benchmarks/matmul_ceiling.py [--dtype fp32,bf16] [--shape 2048x2048x2048 ...] [--runs 5] [--torch]

Each case is one jitted computation with `cvvae_jax.compiler_options()`: `bands` matmuls
(M x K) @ (K x N) of row bands of one operand, each product written into its own rows of
the output, as `shifted_matmul.frame_conv` runs a band loop; operands in the dtype,
products summed in f32 (bf16 x bf16 -> f32 is the form XLA:CPU gives to YNNPACK's bf16
dot products). The default shapes: square matmuls, and the bands of the model's bf16
convolutions at 17x256x256 (a 128-channel 3x3x3 conv's time taps stacked: K = 384,
N = 128; 256 channels in: K = 768; the 256-channel time-doubling upsampler's phases:
K = 768, N = 2048). bf16's GFLOP/s over fp32's is the most bf16 compute can gain where the
model's work is these matmuls; the fp32 model's convolutions are XLA's own, not these.
With --torch the same bands run in PyTorch too (`torch.matmul` into the band's rows, oneDNN,
on all usable cores, bf16 products summed in f32 and rounded to bf16), beside XLA's in the
same process: another library's rate on the same CPU. `cpu_peak.py` gives the CPU's peak.
"""

from __future__ import annotations

import argparse
import sys

import common

import jax
import jax.numpy as jnp
from jax import lax

from cvvae_jax import conv_forms, frame_loop

# M x K x N and the number of bands, 20-70 GFLOP per call.
SHAPES = ("2048x2048x2048x4", "4096x4096x4096x1", "2004x384x128x200", "1019x768x128x200", "988x768x2048x12")
# Distinct bands in memory: their operand and output, at most a few tens of MB.
HELD_BANDS = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="fp32,bf16", help="operand dtypes, comma-separated")
    p.add_argument("--shape", action="append", default=None,
                   help=f"MxKxNxBANDS (repeat); default: {', '.join(SHAPES)}")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--torch", action="store_true", help="also time PyTorch's matmuls on the same bands")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.dtype = common.dtype_list(p, args.dtype)
    try:
        args.shape = [tuple(int(n) for n in s.split("x")) for s in args.shape or SHAPES]
    except ValueError:
        p.error("--shape takes MxKxNxBANDS, e.g. 2004x384x128x96")
    if any(len(s) != 4 or min(s) < 1 for s in args.shape):
        p.error("--shape takes four positive sizes, MxKxNxBANDS")
    return args


def banded_matmul(m: int, bands: int, held: int, dtype):
    """`bands` matmuls (m, K) x (K, N) -> f32 in a loop, band i read from and written to rows
    (i % held) * m of a (held * m, K) operand and its (held * m, N) output, so that the work is
    the matmuls rather than writing a large output. The operand comes in as its bits (bf16 as
    uint16), which the loop reads as the model's do (`frame_loop.as_bits`: XLA:CPU converts a
    bf16 array to f32 on its way into a loop)."""
    def run(bits, b):
        def band(i, out):
            rows = lax.dynamic_slice_in_dim(bits, (i % held) * m, m)
            y = jnp.dot(lax.bitcast_convert_type(rows, dtype), b, preferred_element_type=jnp.float32)
            return lax.dynamic_update_slice_in_dim(out, y, (i % held) * m, 0)
        return lax.fori_loop(0, bands, band, jnp.zeros((held * m, b.shape[1]), jnp.float32))
    return run


def measure(shape, dtype: str, runs: int, warmup: int) -> dict:
    m, k, n, bands = shape
    held = min(bands, HELD_BANDS)
    keys = jax.random.split(jax.random.key(0))
    a = frame_loop.as_bits(jax.random.normal(keys[0], (held * m, k)).astype(dtype))
    b = jax.random.normal(keys[1], (k, n)).astype(dtype)
    fn = jax.jit(banded_matmul(m, bands, held, jnp.dtype(dtype)), compiler_options=conv_forms.compiler_options())
    compiled = fn.lower(a, b).compile()
    return result("xla", shape, dtype, common.time_runs(lambda: compiled(a, b), warmup=warmup, runs=runs))


def result(library: str, shape, dtype: str, times: list[float]) -> dict:
    m, k, n, bands = shape
    stats = common.summary(times)
    flop = 2 * bands * m * k * n
    return {"library": library, "shape": list(shape), "dtype": dtype, "gflop": flop / 1e9, **stats,
            "gflops_median": flop / stats["median_s"] / 1e9, "gflops_best": flop / stats["min_s"] / 1e9}


def measure_torch(shape, dtype: str, runs: int, warmup: int) -> dict:
    """The same bands as `measure` in PyTorch: `torch.matmul(rows, b, out=...)` into the band's
    rows of a held output, in the operand dtype (oneDNN sums bf16 products in f32)."""
    try:
        import torch
    except ImportError:
        sys.exit("error: --torch needs PyTorch, a test dependency: pip install -e '.[test]'")
    torch.set_num_threads(common.usable_cpus())
    m, k, n, bands = shape
    held = min(bands, HELD_BANDS)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(held * m, k, generator=gen).to(tdtype)
    b = torch.randn(k, n, generator=gen).to(tdtype)
    out = torch.empty(held * m, n, dtype=tdtype)

    def run():
        for i in range(bands):
            j = (i % held) * m
            torch.matmul(a[j:j + m], b, out=out[j:j + m])

    # One more untimed call than XLA's, which compiled before its warm-up.
    return result("torch", shape, dtype, common.time_runs(run, warmup=warmup + 1, runs=runs))


def main(argv=None) -> None:
    args = parse_args(argv)
    mach = common.machine()
    print(common.machine_line(mach))
    results = {}
    for shape in args.shape:
        for dtype in args.dtype:
            results[shape, dtype] = measure(shape, dtype, args.runs, args.warmup)
    # PyTorch's after all of XLA's: its OpenMP threads, spinning after a matmul, slowed
    # the XLA runs that followed them (the 128-channel bands to 61-69% of their rate).
    for shape in args.shape if args.torch else ():
        for dtype in args.dtype:
            results[shape, dtype, "torch"] = measure_torch(shape, dtype, args.runs, args.warmup)
    print(f"median (best) of {args.runs} run(s) after {args.warmup} warm-up; products summed in f32")
    headers = ["M x K x N", "bands"] + [f"{d} GFLOP/s" for d in args.dtype]
    if len(args.dtype) == 2:
        headers.append(f"{args.dtype[1]} / {args.dtype[0]} rate")
    if args.torch:
        headers += [f"torch {d} GFLOP/s" for d in args.dtype] + [f"XLA / torch, {d}" for d in args.dtype]
    rows = []
    for shape in args.shape:
        r = [results[shape, d] for d in args.dtype]
        row = ["x".join(map(str, shape[:3])), str(shape[3])]
        row += [common.rate_cell(x) for x in r]
        if len(r) == 2:
            row.append(f"{r[1]['gflops_median'] / r[0]['gflops_median']:.2f}x")
        if args.torch:
            t = [results[shape, d, "torch"] for d in args.dtype]
            row += [common.rate_cell(x) for x in t]
            row += [f"{x['gflops_median'] / y['gflops_median']:.2f}" for x, y in zip(r, t)]
        rows.append(row)
    print(common.table(headers, rows))
    common.write_json(args.json, {"benchmark": "matmul_ceiling", "machine": mach, "results": list(results.values())})


if __name__ == "__main__":
    main()
