"""The official PyTorch CV-VAE on this machine: the figures our codec.py table is judged by.

    git clone https://github.com/AILab-CVC/CV-VAE /path/to/CV-VAE   # not bundled (its license)
    python benchmarks/official_cvvae.py --official-code /path/to/CV-VAE [--shape 17x256x256] \
        [--device cpu|cuda] [--dtype fp32|bf16]

Builds the official `CVVAEModel` (v1) from the default config with torch's random
init (timing does not depend on the weights; `--weights DIR` loads real ones), and
times `encode` and `decode` of the bundled clip, each in a fresh process so its
peak RSS is its own, torch threads = all cores, under `torch.no_grad()`. The model
and clip are fp32 unless `--dtype bf16` casts both (the official code has no mixed
precision of its own). With `--device cuda` each timed call waits for the GPU, cuDNN
picks its convolution algorithms by timing them (`cudnn.benchmark`, as XLA autotunes
ours; the first call pays for it) and the table adds the peak GPU memory torch allocated.
The official code imports xformers for attention; where xformers is missing (every
CPU machine) a stand-in module routes `memory_efficient_attention` to torch's
`scaled_dot_product_attention`, which computes the same single-head attention.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path

from common import (ROOT, clip_frames, emit, fmt, machine, machine_line, peak_rss_mib,
                    run_child, summary, table, time_runs, timed, write_json)

DEFAULT_CONFIG = ROOT / "tests/fixtures/reference/cvvae_v1_default_config.json"


def _xformers_stand_in(torch) -> None:
    if "xformers" in sys.modules:
        return
    try:
        import xformers.ops  # noqa: F401
        return
    except ImportError:
        pass
    ops = types.ModuleType("xformers.ops")
    # The official blocks call it on (B, N, C) tensors, one head: SDPA takes the same.
    ops.memory_efficient_attention = (
        lambda q, k, v, attn_bias=None, op=None: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    pkg = types.ModuleType("xformers")
    pkg.ops = ops
    # diffusers probes importlib.util.find_spec("xformers"), which needs a spec.
    pkg.__spec__ = importlib.machinery.ModuleSpec("xformers", None, is_package=True)
    ops.__spec__ = importlib.machinery.ModuleSpec("xformers.ops", None)
    sys.modules.update({"xformers": pkg, "xformers.ops": ops})


def _model(args, torch):
    sys.path.insert(0, str(Path(args.official_code).resolve()))
    _xformers_stand_in(torch)
    from models.modeling_vae import CVVAEModel  # the official code

    if args.weights:
        return CVVAEModel.from_pretrained(args.weights).eval()
    config = {k: v for k, v in json.loads(DEFAULT_CONFIG.read_text()).items()
              if not k.startswith("_")}
    torch.manual_seed(0)
    return CVVAEModel(**config).eval()


def run_case(args) -> None:
    import torch

    torch.set_num_threads(os.cpu_count())
    cuda = args.device == "cuda"
    torch.backends.cudnn.benchmark = cuda
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    t, h, w = args.shape
    model = _model(args, torch).to(args.device, dtype)
    x = torch.from_numpy(clip_frames(t, h, w)).permute(3, 0, 1, 2)[None].contiguous().to(args.device, dtype)

    def waited(fn):
        def call():
            out = fn()
            if cuda:
                torch.cuda.synchronize()
            return out
        return call

    with torch.no_grad():
        encode_s, post = timed(waited(lambda: model.encode(x).latent_dist))
        z = post.mode()
        first_s = encode_s
        if args.direction == "encode":
            fn = waited(lambda: model.encode(x).latent_dist.mode())
        else:
            first_s, _ = timed(waited(lambda: model.decode(z).sample))
            fn = waited(lambda: model.decode(z).sample)
        times = time_runs(fn, warmup=args.warmup, runs=args.runs)
    device_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    # The decode case encodes its input first: that call's time is kept too, so that
    # a large shape can be measured with `--directions decode` alone.
    emit({"direction": args.direction, "shape": list(args.shape), "first_s": first_s, "encode_s": encode_s,
          **summary(times), "frames_per_s": t / min(times or [first_s]), "peak_rss_mib": peak_rss_mib(),
          "device_peak_mib": device_peak, "device": args.device, "dtype": args.dtype,
          "torch": torch.__version__, "threads": torch.get_num_threads()})


def parse_shape(text: str) -> tuple[int, int, int]:
    t, h, w = (int(v) for v in text.lower().split("x"))
    return t, h, w


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-code", required=True, help="a checkout of AILab-CVC/CV-VAE")
    p.add_argument("--weights", help="an official model directory (default: random init)")
    p.add_argument("--shape", type=parse_shape, default=(17, 256, 256), help="T x H x W")
    p.add_argument("--directions", default="encode,decode")
    p.add_argument("--runs", type=int, default=3,
                   help="timed calls after the first; 0 times the first call only (large shapes)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed calls after the first (which is reported on its own)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="of the model and the clip")
    p.add_argument("--json")
    p.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--direction", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        return run_case(args)
    m = machine()
    print(machine_line(m))
    rows, results = [], []
    for direction in args.directions.split(","):
        argv = ["--case", "--direction", direction, "--official-code", args.official_code,
                "--shape", "x".join(map(str, args.shape)), "--runs", str(args.runs),
                "--warmup", str(args.warmup), "--device", args.device, "--dtype", args.dtype]
        argv += ["--weights", args.weights] if args.weights else []
        r = run_child(Path(__file__), argv)
        results.append(r)
        rows.append([direction, "x".join(map(str, args.shape)), fmt(r.get("first_s"), ".1f"),
                     fmt(r.get("median_s"), ".1f"), fmt(r.get("min_s"), ".1f"),
                     fmt(r.get("frames_per_s"), ".2f"), fmt(r.get("peak_rss_mib"), ".0f"),
                     fmt(r.get("device_peak_mib"), ".0f"), r.get("error", "")])
    print(f"official PyTorch CV-VAE ({args.dtype} on {args.device}, "
          f"{'weights ' + args.weights if args.weights else 'random init'}, median of {args.runs})")
    print(table(["direction", "T x H x W", "first call s", "median s", "min s", "frames/s",
                 "peak RSS MiB", "peak GPU MiB", "error"], rows))
    for r in results:
        if r.get("direction") == "decode" and r.get("encode_s") is not None:
            print(f"decode's input was encoded in the same process in {r['encode_s']:.1f} s (one call)")
    write_json(args.json, {"machine": m, "results": results})


if __name__ == "__main__":
    main()
