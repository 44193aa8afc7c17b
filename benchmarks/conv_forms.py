"""One causal 3x3x3 conv of the model, in the forms `layers.Conv` can take, with and
without `cvvae_jax.compiler_options()`: the measurements behind conv_forms.py's choices.

    python benchmarks/conv_forms.py [--shape 5x128x128x128 ...] [--runs 3] [--json PATH]
    python benchmarks/conv_forms.py --shape 17x256x256x3x128 --options package  # conv_in
    python benchmarks/conv_forms.py --options package --dtype fp32,bf16  # bf16 compute

With bf16 on a CPU with bf16 dot products (AMX or AVX512_BF16), `time loop` runs each frame as bf16 matmuls
(`cvvae_jax.shifted_matmul`), as the model does there.

`--shape TxHxWxC[xO]` is the conv's input and its output channels (default O = C, as in
the resnet blocks); the defaults are the decoder's widths at 17x256x256 with fewer
frames. Forms: `3d` is XLA's 3D convolution, `time loop` is
`conv_forms.time_loop_conv` (a loop over output frames of 2D convs per time tap); with at most
`conv_core.FEW_CHANNELS` inputs also `time fold` (`conv_forms.time_fold_conv`, the
taps stacked on channels) and `matmul` (`conv_forms.matmul_conv`). Options: `default`
compiles with XLA's defaults, `package` with `compiler_options()` (on CPU: convolutions
kept out of YNNPACK). `--dtype` is the layer's compute dtype (parameters stay fp32).
All forms run in one process, so run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse

from common import csv_list, dtype_list, fmt, machine, machine_line, table, time_runs, write_json

DEFAULT_SHAPES = ["5x128x128x128", "5x64x64x256", "5x32x32x512"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append",
                   help="TxHxWxC[xO] (repeat); default: " + ", ".join(DEFAULT_SHAPES))
    p.add_argument("--options", default="default,package", type=csv_list)
    p.add_argument("--dtype", default="fp32", help="compute dtypes, comma-separated (fp32, bf16)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args(argv)
    args.dtype = dtype_list(p, args.dtype)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from cvvae_jax import compiler_options, conv_core, conv_forms, layers, shifted_matmul

    options = {"default": None, "package": compiler_options()}
    forms = {
        # What layers.Conv falls back to: XLA's 3D convolution, zero pads included.
        "3d": lambda conv, x: nnx.Conv.__call__(conv, conv_core.pad_input(x, conv.pads, (conv_core.EDGE,))),
        "time loop": conv_forms.time_loop_conv,
    }
    few_input_forms = {"time fold": conv_forms.time_fold_conv, "matmul": conv_forms.matmul_conv}
    mach = machine()
    print(machine_line(mach))
    if conv_core.use_shifted_matmul(jnp.bfloat16):
        print(f"bf16 on this CPU ({shifted_matmul.bf16_dot_flag()}): the time loop's frames run as bf16 matmuls"
              " (cvvae_jax.shifted_matmul)")
    rows, results = [], []
    for text in args.shape or DEFAULT_SHAPES:
        t, h, w, c, *out = (int(v) for v in text.lower().split("x"))
        o = out[0] if out else c
        x = jax.random.normal(jax.random.key(0), (1, t, h, w, c))
        flops = 2 * 27 * c * o * t * h * w
        reference = None
        shape_forms = forms | (few_input_forms if c <= conv_core.FEW_CHANNELS else {})
        for dtype in args.dtype:
            conv = layers.Conv(c, o, (3, 3, 3), layers.causal_pads(1, layers.ZEROS),
                               dtype=jnp.dtype(dtype),
                               rngs=nnx.Rngs(0))
            graphdef, state = nnx.split(conv)
            for option in args.options:
                for form, fn in shape_forms.items():
                    f = jax.jit(lambda s, x, fn=fn: fn(nnx.merge(graphdef, s), x),
                                compiler_options=options[option])
                    y = np.asarray(f(state, x), np.float32)
                    reference = y if reference is None else reference
                    times = time_runs(lambda: f(state, x), warmup=args.warmup, runs=args.runs)
                    best = min(times)
                    results.append({"shape": text, "dtype": dtype, "options": option, "form": form,
                                    "times_s": times, "gflop_s": flops / best / 1e9,
                                    "max_abs_diff": float(np.abs(y - reference).max())})
                    rows.append([text, dtype, option, form, fmt(best, ".3f"),
                                 fmt(flops / best / 1e9, ".1f"), fmt(results[-1]["max_abs_diff"], ".1e")])
                print(f"{text} {dtype} {option}: done", flush=True)
    print(f"min of {args.runs} run(s) after {args.warmup} warm-up; "
          "GFLOP/s = 2 x 27 x C x O x T x H x W / time")
    print(table(["input TxHxWxC[xO]", "dtype", "options", "form", "min s", "GFLOP/s",
                 "max |diff| vs first"], rows))
    write_json(args.json, {"machine": mach, "results": results})


if __name__ == "__main__":
    main()
