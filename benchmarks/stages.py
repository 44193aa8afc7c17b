"""Where encode and decode spend their time: each block of the network timed on its own.

    python benchmarks/stages.py [--shape 17x256x256] [--directions encode,decode] \
        [--dtype fp32[,bf16]] [--official-code /path/to/CV-VAE] [--json PATH]

Walks the v1 CV-VAE (default config, random weights) block by block: conv_in, every resnet
block, attention, down/upsampler, mid, and norm_out + conv_out. Each block is jitted on its
own (compile excluded: one untimed call first), fed the previous block's output, and timed
--runs times (median), once per compute --dtype (parameters stay fp32; with two dtypes the
table adds their ratio per block). GFLOP/s divides a block's convolutions and matmuls
(`cvvae_jax.flops`, as `codec.py` counts them: the work of the dtype's forms, so bf16's
matmul forms count their padded columns too) by its time: the blocks that fall short of the
rate the others reach are where time is left. With --official-code, the official PyTorch
model runs the same walk in its own process (same block names: ours mirror the official
state-dict keys) and the table gets its column and the ratio per block. The blocks are the
profile `codec.py`'s whole-network figure hides: the sum here is close to, not equal to, a
whole call (one jit lets XLA overlap and free buffers across blocks).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
from pathlib import Path

from common import (csv_list, dtype_list, emit, fmt, machine, print_machine, run_child, table,
                    time_runs, write_json)
from codec import CONFIGS, parse_shape

DEFAULT_CONFIG = CONFIGS["default"]


def walk(net, direction: str, official: bool):
    """(name, block) in the order the network runs them; `out` stands for norm_out -> silu -> conv_out."""
    yield "conv_in", net.conv_in
    if direction == "encode":
        for i, level in enumerate(net.down):
            yield from _level(f"down.{i}", level)
            if hasattr(level, "downsample"):
                yield f"down.{i}.downsample", level.downsample
        yield from (("mid." + n, getattr(net.mid, n)) for n in ("block_1", "attn_1", "block_2"))
    else:
        yield from (("mid." + n, getattr(net.mid, n)) for n in ("block_1", "attn_1", "block_2"))
        for i in reversed(range(len(net.up))):
            yield from _level(f"up.{i}", net.up[i])
            if hasattr(net.up[i], "upsample") and (not official or i != 0):
                yield f"up.{i}.upsample", net.up[i].upsample
    yield "out", (net.norm_out, net.conv_out)


def _level(prefix, level):
    for j, block in enumerate(level.block):
        yield f"{prefix}.block.{j}", block
        if len(level.attn):
            yield f"{prefix}.attn.{j}", level.attn[j]


def input_shape(direction: str, shape) -> tuple[int, ...]:
    t, h, w = shape
    if direction == "encode":
        return (1, t, h, w, 3)
    return (1, 1 + (t - 1) // 4, h // 8, w // 8, 4)


def run_ours(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cvvae_jax import conv_forms
    from cvvae_jax.flops import jaxpr_flops
    from cvvae_jax.model_config import CVVAEConfig
    from cvvae_jax.vae import CVVAE

    cfg = CVVAEConfig.from_dict(json.loads(Path(DEFAULT_CONFIG).read_text()))
    vae = CVVAE.from_config(cfg, dtype=jnp.dtype(args.dtype), seed=0)
    net = vae.encoder if args.direction == "encode" else vae.decoder
    x = jax.random.normal(jax.random.key(0), input_shape(args.direction, args.shape)).astype(args.dtype)
    # With the options every jit of the package passes (conv_forms.compiler_options).
    jit = functools.partial(jax.jit, compiler_options=conv_forms.compiler_options())

    def call(graphdef, state, x):
        return nnx.merge(graphdef, state)(x)

    def out(graphdef, state, x):
        norm, conv = nnx.merge(graphdef, state)
        return conv(norm(x, jax.nn.silu))

    rows = []
    for name, block in walk(net, args.direction, official=False):
        graphdef, state = nnx.split(block)
        f = jit(functools.partial(out if name == "out" else call, graphdef))
        fn = functools.partial(f, state)
        y = jax.block_until_ready(fn(x))
        rows.append({"stage": name, "input": list(x.shape), "s": _median(lambda: fn(x), args.runs),
                     "flops": jaxpr_flops(f.trace(state, x).jaxpr)})
        x = y
    return rows


def run_official(args) -> list[dict]:
    import torch

    from official_cvvae import _model

    torch.set_num_threads(os.cpu_count())
    model = _model(argparse.Namespace(official_code=args.official_code, weights=None), torch)
    net = model.encoder if args.direction == "encode" else model.decoder
    shape = input_shape(args.direction, args.shape)
    x = torch.randn(*shape).permute(0, 4, 1, 2, 3).contiguous()
    rows = []
    with torch.no_grad():
        for name, block in walk(net, args.direction, official=True):
            if name == "out":
                norm, conv = block
                fn = lambda x, n=norm, c=conv: c(torch.nn.functional.silu(n(x)))  # noqa: E731
            else:
                fn = block
            y = fn(x)
            rows.append({"stage": name, "input": [shape[0], *x.shape[2:], x.shape[1]],
                         "s": _median(lambda: fn(x), args.runs)})
            x = y
    return rows


def _median(fn, runs: int) -> float:
    # The caller's first call (which makes the next block's input) was the warm-up.
    return statistics.median(time_runs(fn, warmup=0, runs=runs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=parse_shape, default=(17, 256, 256), help="T x H x W")
    p.add_argument("--directions", type=csv_list, default=["encode", "decode"])
    p.add_argument("--dtype", default="fp32", help="compute dtypes, comma-separated (fp32, bf16)")
    p.add_argument("--official-code", help="a checkout of AILab-CVC/CV-VAE: add its column")
    p.add_argument("--runs", type=int, default=1, help="timed calls per block (after one untimed)")
    p.add_argument("--json")
    p.add_argument("--case", choices=["ours", "official"], help=argparse.SUPPRESS)
    p.add_argument("--direction", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        args.dtype = dtype_list(p, args.dtype)[0]
        rows = run_ours(args) if args.case == "ours" else run_official(args)
        return emit({"rows": rows, "machine": machine()})
    dtypes = dtype_list(p, args.dtype)
    results = {}
    for direction in args.directions:
        base = ["--direction", direction, "--shape", "x".join(map(str, args.shape)),
                "--runs", str(args.runs)]
        results[direction] = {"ours": {d: run_child(Path(__file__), ["--case", "ours", "--dtype", d, *base])
                                       for d in dtypes}}
        if args.official_code:
            results[direction]["official"] = run_child(
                Path(__file__), ["--case", "official", "--official-code", args.official_code, *base])
    print_machine([r for d in results.values() for r in [*d["ours"].values(), d.get("official", {})]])
    for direction, res in results.items():
        print(f"\n{direction} {'x'.join(map(str, args.shape))}, median of {args.runs}; the official code is fp32")
        print(report(res))
    write_json(args.json, {"shape": list(args.shape), "runs": args.runs, "results": results})


def report(res) -> str:
    """Per block: our time and GFLOP/s per dtype, the first dtype's time over the second's, the
    official time and ours (first dtype) over it."""
    ours, official = res["ours"], res.get("official")
    errors = [f"ours {d}: {r['error']}" for d, r in ours.items() if "error" in r]
    if errors:
        return "; ".join(errors)
    dtypes = list(ours)
    first = ours[dtypes[0]]["rows"]
    times = {d: {r["stage"]: r["s"] for r in ours[d]["rows"]} for d in dtypes}
    work = {d: {r["stage"]: r["flops"] for r in ours[d]["rows"]} for d in dtypes}
    theirs = {r["stage"]: r["s"] for r in official.get("rows", [])} if official else {}
    headers = ["stage", "input (B, T, H, W, C)", *(f"ours {d} s" for d in dtypes),
               *(f"ours {d} GFLOP/s" for d in dtypes)]
    if len(dtypes) == 2:
        headers.append(f"{dtypes[0]} / {dtypes[1]}")
    if official:
        headers += ["official s", f"ours {dtypes[0]} / official"]

    def cells(stage, mine, o, flops):
        row = [fmt(t, ".2f") for t in mine]
        row += [fmt(f / t / 1e9 if t else None, ".0f") for f, t in zip(flops, mine)]
        if len(mine) == 2:
            row.append(fmt(mine[0] / mine[1] if mine[1] else None, ".2f"))
        if official:
            row += [fmt(o, ".2f"), fmt(mine[0] / o if o else None, ".2f")]
        return row

    rows = [[r["stage"], "x".join(map(str, r["input"])),
             *cells(r["stage"], [times[d][r["stage"]] for d in dtypes], theirs.get(r["stage"]),
                    [work[d][r["stage"]] for d in dtypes])]
            for r in first]
    totals = [sum(times[d].values()) for d in dtypes]
    last = ["total", "", *cells("total", totals, sum(theirs.values()) if theirs else None,
                                [sum(work[d].values()) for d in dtypes])]
    if official and "error" in official:
        last[-2] = official["error"]
    return table(headers, rows + [last])


if __name__ == "__main__":
    main()
