"""CV-VAE encode and decode: compile time, step time, throughput, FLOP/s, peak memory, PSNR.

    python benchmarks/codec.py [--config default|tiny|PATH] [--weights DIR [--subfolder S]]
        [--shape 17x256x256 ...] [--dtype fp32,bf16] [--direction encode,decode]
        [--tile PX|none] [--chunk N|none] [--decode-input clip|random] [--runs 3] [--warmup 1]
        [--json out.json]

The model is the official v1 network (default: the official default config.json,
tests/fixtures/reference/cvvae_v1_default_config.json) with random weights (seed 0),
or real weights from --weights. Parameters stay float32; --dtype is the compute dtype.
The input is the bundled clip_a.mp4 (first T frames, looped if T > 81, scaled to cover
H x W and centre-cropped); decode's input is the posterior mean of encoding that clip
in the same dtype, so decode's PSNR is the round trip's (when encode is not among the
directions run, that encoding runs first in a process of its own; --decode-input random
decodes standard normal latents instead, with no encode and no PSNR).

Each (shape, dtype, direction) runs in a fresh process, so the peak host RSS (and
the device's peak bytes in use, on GPU) is that case's alone; on CPU the arrays live
in host memory, so the RSS is the figure. Timing goes through
the public `vae.encode` / `vae.decode`, which run the official frame chunking and
spatial tiling of the config around one jitted network call per piece:
- compile: lowering + compiling the network for every distinct piece shape,
  ahead of time (the later calls reuse these executables);
- first call: the first public call after that; it reuses those executables, but
  the small eager ops around them (input checks, slicing, tile blending) compile here;
- median / min: of --runs timed calls after --warmup untimed ones (--runs 0 --warmup 0:
  the first call is the only one, and frames/s and GFLOP/s come from it);
- GFLOP: the network's convolutions and matmuls (`cvvae_jax.flops`: 2 x multiply-adds,
  loops counted per trip, which XLA's cost analysis does not), summed over the pieces;
  elementwise work, tile blending and chunk concatenation are not counted (a tiny part).
Frames/s counts pixel frames (T per call) for both directions. MFU = GFLOP/s / the
device's peak (--peak-tflops, or its dense bf16 peak on the GPUs and TPUs that
`cvvae_jax.flops.peak_tflops` knows, whatever --dtype is; n/a on CPU); the FLOPs are those the
network runs, so the decoder's upsamplers count their 2x2 phase convs
(`upsample.nearest2x_conv`), not the 3x3 convs of the literal network.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import common  # noqa: F401 - puts the repository root on sys.path

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from cvvae_jax import metrics, tiling  # noqa: E402
from cvvae_jax.flops import jaxpr_flops  # noqa: E402
from cvvae_jax.model_config import CVVAEConfig, load_config  # noqa: E402
from cvvae_jax.pretrained import jitted_part, resolve_dir  # noqa: E402
from cvvae_jax.vae import CVVAE  # noqa: E402

CONFIGS = {
    "default": common.ROOT / "tests" / "fixtures" / "reference" / "cvvae_v1_default_config.json",
    "tiny": common.ROOT / "tests" / "fixtures" / "cvvae_v1_tiny" / "config.json",
}
DEFAULT_SHAPES = ("17x256x256", "17x576x1024")
DIRECTIONS = ("encode", "decode")


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        t, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected TxHxW, e.g. 17x256x256") from None
    return t, h, w


def parse_optional_int(text: str) -> int | str | None:
    if text.lower() == "none":
        return "none"
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="default",
                   help="'default' (official v1 default config), 'tiny' (the test fixture's), "
                        "or a config.json path; ignored with --weights")
    p.add_argument("--weights", default=None, help="a model directory (official or Orbax layout)")
    p.add_argument("--subfolder", default=None, help="with --weights, e.g. vae3d")
    p.add_argument("--shape", action="append", type=parse_shape, default=None,
                   help="T x H x W, repeatable (default: 17x256x256 and 17x576x1024)")
    p.add_argument("--dtype", default="fp32,bf16", help="compute dtypes, comma-separated")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak for the MFU (default: known GPUs' and TPUs' dense bf16 peak)")
    p.add_argument("--direction", default="encode,decode", help="encode, decode or both")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tile", type=parse_optional_int, default=None,
                   help="override tile_spatial_size (pixels), or 'none' for no tiling")
    p.add_argument("--chunk", type=parse_optional_int, default=None,
                   help="override en_de_n_frames_a_time, or 'none' to run whole clips")
    p.add_argument("--runs", type=int, default=3,
                   help="timed runs (median and min reported); 0 times the first call only, for "
                        "cases that take hours")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs after the first call")
    p.add_argument("--decode-input", choices=("clip", "random"), default="clip",
                   help="decode the clip's latents (encoded first, in a separate process) or "
                        "standard normal latents (skips the encode; no PSNR)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per case (default: none)")
    p.add_argument("--json", default=None, help="also write the results here")
    # Internal: run one case in this process and print its RESULT line.
    p.add_argument("--case", choices=("encode", "decode", "prepare"), help=argparse.SUPPRESS)
    p.add_argument("--latents", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = args.shape or [parse_shape(s) for s in DEFAULT_SHAPES]
    args.dtypes = common.dtype_list(p, args.dtype)
    args.directions = common.csv_list(args.direction)
    for d in args.directions:
        if d not in DIRECTIONS:
            p.error(f"--direction {d!r}: choose from {', '.join(DIRECTIONS)}")
    if args.runs < 0 or args.warmup < 0:
        p.error("--runs and --warmup must be >= 0")
    return args


# -- the model -----------------------------------------------------------------------------


def base_config(args) -> CVVAEConfig:
    if args.weights:
        return load_config(resolve_dir(args.weights, args.subfolder) / "config.json")
    path = CONFIGS.get(args.config, Path(args.config))
    # The reference default config.json was dumped without `_class_name`.
    d = json.loads(Path(path).read_text())
    return load_config(path) if "_class_name" in d else CVVAEConfig.from_dict(d)


def model_config(args):
    cfg = base_config(args)
    over = {}
    if args.tile is not None:
        over["tile_spatial_size"] = None if args.tile == "none" else args.tile
    if args.chunk is not None:
        over["en_de_n_frames_a_time"] = None if args.chunk == "none" else args.chunk
    return cfg.replace(**over) if over else cfg


def build(args, dtype) -> CVVAE:
    cfg = model_config(args)
    if args.weights:
        vae = CVVAE.from_pretrained(args.weights, args.subfolder, dtype=dtype)
        vae.config = cfg  # only chunking/tiling may differ: read by encode/decode, not the net
        return vae
    return CVVAE.from_config(cfg, dtype=dtype, seed=0)


def piece_shapes(cfg, shape: tuple[int, ...], *, encode: bool) -> list[tuple[int, ...]]:
    """The input shape of every network call `vae.encode`/`decode` makes (tiling.py's plan)."""
    b, t, h, w, c = shape
    per_chunk = cfg.encode_frames_per_chunk if encode else cfg.decode_frames_per_chunk
    plan = None
    if cfg.tile_spatial_size is not None:
        make = tiling.TilePlan.for_encode if encode else tiling.TilePlan.for_decode
        plan = make(cfg.tile_spatial_size, cfg.space_factor, cfg.tile_overlap_ratio)
    out = []
    for a, z in tiling.chunk_bounds(t, per_chunk):
        if plan is None:
            out.append((b, z - a, h, w, c))
            continue
        for i in tiling.tile_starts(h, plan.stride_in, plan.tile_in):
            for j in tiling.tile_starts(w, plan.stride_in, plan.tile_in):
                out.append((b, z - a, min(plan.tile_in, h - i), min(plan.tile_in, w - j), c))
    return out


# -- one case, in a child process ----------------------------------------------------------


def clip_batch(args) -> np.ndarray:
    (t, h, w), = args.shape
    x = common.clip_frames(t, h, w)
    return np.broadcast_to(x, (args.batch, *x.shape)).copy()


def run_case(args) -> dict:
    (t, h, w), = args.shape
    dtype_name, = args.dtypes
    vae = build(args, jnp.dtype(dtype_name))
    cfg = vae.config
    encode = args.case in ("encode", "prepare")
    if encode:
        net_in = jnp.asarray(clip_batch(args))
        method = "encode_moments"

        def call():
            return vae.encode(net_in).mean
    else:
        net_in = jnp.asarray(np.load(args.latents))
        method = "decode_latents"

        def call():
            return vae.decode(net_in)

    result = {"shape": f"{t}x{h}x{w}", "dtype": dtype_name, "direction": args.case,
              "batch": args.batch, "params": vae.num_params(), "machine": common.machine()}
    pieces = piece_shapes(cfg, tuple(net_in.shape), encode=encode)
    if args.case == "prepare":
        z = call()
        np.save(args.latents, np.asarray(z, np.float32))
        return result

    graphdef, state = nnx.split(vae)
    fn = jitted_part(graphdef, method)
    flops_per_shape, compile_s = {}, 0.0
    for shape in Counter(pieces):
        start = time.perf_counter()
        piece = jax.ShapeDtypeStruct(shape, net_in.dtype)
        traced = fn.trace(state, piece)
        traced.lower().compile()
        compile_s += time.perf_counter() - start
        flops_per_shape[shape] = jaxpr_flops(traced.jaxpr)
    flops = sum(flops_per_shape[s] for s in pieces)

    first_s, out = common.timed(call)
    times = common.time_runs(call, warmup=args.warmup, runs=args.runs)
    result.update(common.summary(times))
    result.update({"pieces": len(pieces), "piece_shapes": sorted(set(map(str, pieces))),
                   "compile_s": compile_s, "first_call_s": first_s, "flops": flops,
                   "out_shape": list(out.shape)})
    # Before the PSNR's temporaries: the peaks of encoding or decoding alone.
    result["peak_rss_mib"] = common.peak_rss_mib()
    result["device_peak_mib"] = common.device_peak_mib()
    if encode:
        np.save(args.latents, np.asarray(out, np.float32))
    else:
        if args.decode_input == "clip":
            result["psnr_db"] = float(jnp.mean(metrics.psnr(out, jnp.asarray(clip_batch(args)))))
    return result


# -- the parent: one child per case, then the table ----------------------------------------


def child_argv(args, shape, dtype: str, case: str, latents: Path) -> list[str]:
    argv = ["--shape", "x".join(map(str, shape)), "--dtype", dtype, "--case", case,
            "--latents", str(latents), "--batch", str(args.batch),
            "--runs", str(args.runs), "--warmup", str(args.warmup), "--config", args.config,
            "--decode-input", args.decode_input]
    if args.weights:
        argv += ["--weights", args.weights] + (["--subfolder", args.subfolder] if args.subfolder else [])
    for flag, value in (("--tile", args.tile), ("--chunk", args.chunk)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def random_latents(args, shape) -> np.ndarray:
    cfg = model_config(args)
    t, h, w = shape
    z_shape = (args.batch, 1 + (t - 1) // cfg.time_factor, h // cfg.space_factor,
               w // cfg.space_factor, cfg.latent_channels)
    return np.random.default_rng(0).standard_normal(z_shape, dtype=np.float32)


def describe_model(args) -> str:
    cfg = model_config(args)
    src = (f"weights from {args.weights}" + (f"/{args.subfolder}" if args.subfolder else "")
           if args.weights else
           "RANDOM weights (seed 0): absolute PSNR is meaningless, the bf16 - fp32 difference "
           "shows numeric drift")
    name = args.weights or (args.config if args.config in CONFIGS else Path(args.config).name)
    return (f"model: {cfg.CLASS_NAME} {name} (ch={getattr(cfg, 'ch', None)}, "
            f"ch_mult={getattr(cfg, 'ch_mult', None)}), {src}; chunk en_de_n_frames_a_time="
            f"{cfg.en_de_n_frames_a_time}, tile_spatial_size={cfg.tile_spatial_size}, "
            f"overlap {cfg.tile_overlap_ratio}; params float32")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.case:
        common.emit(run_case(args))
        return
    script = Path(__file__).resolve()
    results = []
    with tempfile.TemporaryDirectory(prefix="cvvae_codec_") as tmp:
        cases = [(s, d, c) for s in args.shape for d in args.dtypes for c in args.directions]
        for n, (shape, dtype, case) in enumerate(cases, 1):
            latents = Path(tmp) / f"latents_{'x'.join(map(str, shape))}_{dtype}.npy"
            label = f"{'x'.join(map(str, shape))} {dtype} {case}"
            done = common.announce(n, len(cases), label)
            if case == "decode" and not latents.exists() and args.decode_input == "random":
                np.save(latents, random_latents(args, shape))
            elif case == "decode" and not latents.exists():
                prep = common.run_child(script, child_argv(args, shape, dtype, "prepare", latents),
                                        timeout=args.timeout)
                if "error" in prep:
                    results.append({"shape": "x".join(map(str, shape)), "dtype": dtype,
                                    "direction": case, "error": "encoding its input: " + prep["error"]})
                    continue
            r = common.run_child(script, child_argv(args, shape, dtype, case, latents),
                                 timeout=args.timeout)
            r.setdefault("shape", "x".join(map(str, shape)))
            r.setdefault("dtype", dtype)
            r.setdefault("direction", case)
            results.append(r)
            done(r)

    report(args, results)


def call_seconds(r: dict) -> float:
    """The case's time per call: the median, or with --runs 0 the first call, whose eager
    blending ops compile inside it (seconds against the hours such a case runs)."""
    return r["median_s"] if r["median_s"] is not None else r["first_call_s"]


def report(args, results: list[dict]) -> None:
    mach = common.print_machine(results)
    peak, peak_src = common.peak_tflops(args.peak_tflops, mach)
    print(describe_model(args))
    params = next((r["params"] for r in results if "params" in r), None)
    print(f"{params / 1e6:.1f} M parameters; " if params else "", end="")
    decode_in = ("the posterior mean of the clip, encoded in the same dtype"
                 if args.decode_input == "clip" else "standard normal latents")
    print(f"batch {args.batch}; input: frames of clip_a.mp4; decode input: {decode_in}; median and "
          f"min of {args.runs} run(s) after the first call and {args.warmup} warm-up; each case in "
          "its own process")
    print(common.mfu_line(peak, peak_src, 1))
    headers = ["shape TxHxW", "dtype", "direction", "pieces", "compile (s)", "first call (s)",
               "median (s)", "min (s)", "frames/s", "GFLOP", "GFLOP/s", "MFU", "peak RSS (MiB)",
               "peak device (MiB)", "PSNR (dB)"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["shape"], r["dtype"], r["direction"], f"error: {r['error']}"]
                        + [""] * (len(headers) - 4))
            continue
        t = int(r["shape"].split("x")[0])
        gflop = None if r["flops"] is None else r["flops"] / 1e9
        secs = call_seconds(r)
        rows.append([
            r["shape"], r["dtype"], r["direction"], r["pieces"], common.fmt(r["compile_s"], ".1f"),
            common.fmt(r["first_call_s"], ".3g"), common.fmt(r["median_s"], ".3g"),
            common.fmt(r["min_s"], ".3g"), common.fmt(r["batch"] * t / secs, ".3g"),
            common.fmt(gflop, ".4g"),
            common.fmt(None if gflop is None else gflop / secs, ".4g"),
            common.fmt(None if gflop is None or not peak else gflop / secs / (peak * 1e3), ".1%"),
            common.fmt(r["peak_rss_mib"], ".0f"), common.fmt(r["device_peak_mib"], ".0f"),
            common.fmt(r.get("psnr_db"), ".2f", none=""),
        ])
    print(common.table(headers, rows))
    ok = {(r["shape"], r["direction"], r["dtype"]): r for r in results if "error" not in r}
    for shape in dict.fromkeys(r["shape"] for r in results):
        both = {d: (ok.get((shape, d, "float32")), ok.get((shape, d, "bfloat16"))) for d in DIRECTIONS}
        parts = [f"{d} fp32 / bf16 time = {call_seconds(a) / call_seconds(b):.2f}x"
                 for d, (a, b) in both.items() if a and b]
        a, b = both["decode"]
        if a and b and a.get("psnr_db") is not None and b.get("psnr_db") is not None:
            parts.append(f"PSNR bf16 - fp32 = {b['psnr_db'] - a['psnr_db']:+.3f} dB (round trip in "
                         "each dtype)")
        if parts:
            print(f"{shape}: " + "; ".join(parts))
    common.write_json(args.json, {"benchmark": "codec", "machine": mach, "peak_tflops": peak,
                                  "model": describe_model(args),
                                  "args": {k: v for k, v in vars(args).items()
                                           if k not in ("case", "latents")},
                                  "results": results})


if __name__ == "__main__":
    main()
