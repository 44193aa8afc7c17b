"""The CV-VAE train step of train.py: compile time, step time, FLOPs, MFU, peak memory.

    python benchmarks/train_step.py [--widths tiny|paper|smoke] [--frames 17] [--size 256]
        [--batch-per-device 1] [--dtype fp32,bf16] [--remat none,blocks,...] [--lpips random|off]
        [--peak-tflops T] [--runs 3] [--warmup 1] [--json out.json]

The step is the trainer's own (`cvvae_jax.trainer.Trainer`: the same models, sharded
state, jitted step with donation and cost analysis that train.py runs), built from
configs/cvvae.py with every weight random (seed 0):
- `paper`: the default config: the v1 CV-VAE inflated from a random full-size SD 2.1
  VAE (block_out_channels 128/256/512/512), which stays as the frozen regulariser, the
  3D discriminator (ndf 64, 4 layers), the decoder regulariser with `random` mapping;
- `tiny`: configs/cvvae.py:tiny (ch 32, ch_mult 1/1/1/1, one res block, discriminator
  ndf 32 with no inner layer) inflated from a random image VAE of
  configs/image_vae.py:tiny's widths;
- `smoke`: the two-level model of tests/train_config.py (from scratch, 2x time and
  space compression, no attention) on a two-level image VAE: a plumbing check that
  compiles in seconds, not a figure to report.
LPIPS: `random` writes a VGG16 trunk with random weights to a temporary file and
loads it through `config.loss.lpips_vgg_path` with the bundled v0.1 heads (so the
perceptual term costs what it would with real weights; the tiny config's weight 0 is
raised to the paper's 0.5); `off` leaves the path empty and the term out, as
`load_lpips(None)` does when no VGG16 weights are given.

The batch is --batch-per-device clips per device (17 x --size x --size by default)
of the bundled clip_a.mp4, the same every step. Per (dtype, remat) case, in a fresh
process: compile = lowering + compiling the step (`Trainer.compiled_step`), first
step, then the median and min of --runs steps after --warmup. FLOPs per step are the
step's convolutions and matmuls (`cvvae_jax.flops`, as `Trainer.compiled_step` counts
them: generator and discriminator forward and backward, the image VAE, LPIPS; with
remat the recomputed forward is counted too, so the MFU becomes a hardware-FLOPs
utilisation). MFU = FLOP/s / (peak x devices); the
peak defaults to the device's dense bf16 peak (`cvvae_jax.flops.peak_tflops`: 989 TFLOP/s
for H100 SXM and H200, 756 for H100 PCIe, TPUs v4 to v6e) whatever --dtype is, and is
n/a on CPU unless given.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401 - puts the repository root on sys.path

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import cvvae  # noqa: E402
from cvvae_jax import assets, remat, sharding, weights  # noqa: E402
from cvvae_jax.image_vae import ImageVAE  # noqa: E402
from cvvae_jax.lpips import LPIPS  # noqa: E402
from cvvae_jax.model_config import ImageVAEConfig  # noqa: E402

IMAGE_VAE = {
    "paper": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, sample_size=768),
    "tiny": dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4),
    "smoke": dict(block_out_channels=(32, 32), layers_per_block=1, mid_block_add_attention=False,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", choices=tuple(IMAGE_VAE), default="tiny")
    p.add_argument("--frames", type=int, default=17, help="clip frames (1 + 4k)")
    p.add_argument("--size", type=int, default=256, help="clip height and width")
    p.add_argument("--batch-per-device", type=int, default=1)
    p.add_argument("--dtype", default="fp32", help="compute dtypes, comma-separated: fp32, bf16")
    p.add_argument("--remat", default="none",
                   help="config.remat values, comma-separated (cvvae_jax.remat.resolve): "
                        "none, blocks, full, save_nothing, dots, dots_no_batch")
    p.add_argument("--lpips", choices=("random", "off"), default="random")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for the MFU (default: from the device kind on GPU)")
    p.add_argument("--runs", type=int, default=3,
                   help="timed steps (median and min reported); 0: the first step only, whose "
                        "time then stands in for the rates")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    p.add_argument("--timeout", type=float, default=None, help="seconds per case (default: none)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtypes = common.dtype_list(p, args.dtype)
    args.remats = common.csv_list(args.remat)
    for r in args.remats:
        try:
            remat.resolve(r)
        except ValueError as e:
            p.error(str(e))
    if args.runs < 0 or args.warmup < 0:
        p.error("--runs and --warmup must be >= 0")
    return args


# -- the config, as train.py would get it -------------------------------------------------


def smoke_config():
    c = cvvae.get_config("tiny")
    c.inflate = False
    c.model.config = {"ch": 32, "ch_mult": (1, 1), "num_res_blocks": 1,
                      "time_n_compress": 2, "spatial_n_compress": 2,
                      "encoder_attn_type": "none", "decoder_attn_type": "none"}
    return c


def train_config(args, tmp: Path):
    c = smoke_config() if args.widths == "smoke" else cvvae.get_config(
        "tiny" if args.widths == "tiny" else "")
    dtype, = args.dtypes
    c.remat, = args.remats
    c.model.dtype = dtype
    c.image_vae.path, c.image_vae.subfolder = str(random_image_vae(args.widths, tmp)), ""
    c.loss.lpips_vgg_path = ""
    if args.lpips == "random":
        c.loss.lpips_vgg_path = str(random_vgg16(tmp / "vgg16_random.safetensors"))
        c.loss.perceptual_weight = c.loss.perceptual_weight or cvvae.base().loss.perceptual_weight
    bundled = str(assets.path(common.CLIP).parent)
    source = {"name": "videos", "kind": "video_folder", "path": bundled, "weight": 1.0,
              "frames": args.frames, "size": (args.size, args.size), "stride": 1,
              "batch_size": args.batch_per_device}
    c.data.sources = [source]
    c.data.eval_sources = [dict(source, batch_size=1)]
    c.tensorboard = False
    return c


def random_image_vae(widths: str, tmp: Path) -> Path:
    cfg = ImageVAEConfig.from_dict(IMAGE_VAE[widths])
    return ImageVAE.from_config(cfg, seed=0).save_pretrained(tmp / "image_vae")


def random_vgg16(path: Path) -> Path:
    """A torchvision-layout VGG16 `features.*` file with random weights (LPIPS' own init)."""
    model = LPIPS(rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    sd = {k: v for k, v in weights.to_state_dict(nnx.state(model)).items() if k.startswith("features.")}
    weights.write_safetensors(path, sd)
    return path


# -- one case, in a child process ----------------------------------------------------------


def run_case(args) -> dict:
    from cvvae_jax.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="cvvae_train_step_") as tmp:
        config = train_config(args, Path(tmp))
        trainer = Trainer(config, Path(tmp) / "run")
        state, origin = trainer.fresh_state()
    clip = common.clip_frames(args.frames, args.size, args.size)
    local = np.broadcast_to(clip, (args.batch_per_device * jax.local_device_count(), *clip.shape))
    x = sharding.global_batch(np.ascontiguousarray(local), trainer.mesh)

    start = time.perf_counter()
    compiled, flops = trainer.compiled_step(state, x)
    compile_s = time.perf_counter() - start
    # A paper-width step compiles for minutes on a GPU (autotuning every conv's three passes).
    print(f"train_step: {args.widths} {args.dtypes[0]} compiled in {compile_s:.1f} s", file=sys.stderr,
          flush=True)

    def step():
        nonlocal state, metrics
        state, metrics = compiled(state, trainer.frozen, x, trainer.key)
        return state, metrics

    metrics = None
    first_s, _ = common.timed(step)
    times = common.time_runs(step, warmup=args.warmup, runs=args.runs)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    vae_params = sum(int(np.prod(v.shape)) for _, v in weights.params_of(state.gen["vae"]))
    return {"widths": args.widths, "dtype": args.dtypes[0], "remat": args.remats[0],
            "lpips": args.lpips, "perceptual_weight": config.loss.perceptual_weight,
            "origin": origin, "vae_params": vae_params, "global_batch": int(x.shape[0]),
            "clip": list(x.shape[1:4]), "compile_s": compile_s, "first_step_s": first_s,
            **common.summary(times), "flops": flops or None,
            "skipped_run": metrics["nonfinite_run"], "loss_total": metrics["loss/total"],
            "peak_rss_mib": common.peak_rss_mib(), "device_peak_mib": common.device_peak_mib(),
            "machine": common.machine()}


# -- the parent ----------------------------------------------------------------------------


def child_argv(args, dtype: str, remat_name: str) -> list[str]:
    return ["--case", "--widths", args.widths, "--frames", str(args.frames), "--size", str(args.size),
            "--batch-per-device", str(args.batch_per_device), "--dtype", dtype, "--remat", remat_name,
            "--lpips", args.lpips, "--runs", str(args.runs), "--warmup", str(args.warmup)]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.case:
        common.emit(run_case(args))
        return
    script = Path(__file__).resolve()
    cases = [(d, r) for d in args.dtypes for r in args.remats]
    results = []
    for n, (dtype, remat_name) in enumerate(cases, 1):
        done = common.announce(n, len(cases), f"{args.widths} {dtype} remat={remat_name}")
        r = common.run_child(script, child_argv(args, dtype, remat_name), timeout=args.timeout)
        r.setdefault("dtype", dtype)
        r.setdefault("remat", remat_name)
        results.append(r)
        done(r)
    report(args, results)


def report(args, results: list[dict]) -> None:
    mach = common.print_machine(results)
    peak, peak_src = common.peak_tflops(args.peak_tflops, mach)
    ok = next((r for r in results if "error" not in r), None)
    if ok:
        lp = (f"LPIPS with a random VGG16 trunk (weight {ok['perceptual_weight']})"
              if args.lpips == "random" else "LPIPS off (no VGG16 weights)")
        print(f"train step: {args.widths} widths, CV-VAE {ok['vae_params'] / 1e6:.1f} M parameters "
              f"({ok['origin'].split(' from ')[0]} from random weights), {lp}; global batch "
              f"{ok['global_batch']} ({args.batch_per_device} per device) of {args.frames}x{args.size}x"
              f"{args.size} clips; " + (f"median and min of {args.runs} step(s) after the first "
                                        f"and {args.warmup} warm-up" if args.runs else
                                        "rates from the first step (--runs 0)")
              + "; each case in its own process")
    n_dev = mach["device_count"] if mach else 1
    print(common.mfu_line(peak, peak_src, n_dev))
    headers = ["dtype", "remat", "compile (s)", "first step (s)", "median step (s)", "min step (s)",
               "examples/s", "frames/s", "TFLOP/step", "TFLOP/s", "MFU", "peak RSS (MiB)",
               "peak device (MiB)", "skipped steps"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["dtype"], r["remat"], f"error: {r['error']}"] + [""] * (len(headers) - 3))
            continue
        med = r["median_s"]
        step_s = med or r["first_step_s"]  # --runs 0: the first step stands in
        ex = r["global_batch"] / step_s
        tflop = None if r["flops"] is None else r["flops"] / 1e12
        rate = None if tflop is None else tflop / step_s
        mfu = None if rate is None or not peak else rate / (peak * n_dev)
        rows.append([r["dtype"], r["remat"], common.fmt(r["compile_s"], ".1f"),
                     common.fmt(r["first_step_s"]), common.fmt(med), common.fmt(r["min_s"]),
                     common.fmt(ex), common.fmt(ex * r["clip"][0]), common.fmt(tflop, ".4g"),
                     common.fmt(rate, ".4g"), common.fmt(mfu, ".1%"),
                     common.fmt(r["peak_rss_mib"], ".0f"), common.fmt(r["device_peak_mib"], ".0f"),
                     common.fmt(r["skipped_run"], ".0f")])
    print(common.table(headers, rows))
    common.write_json(args.json, {"benchmark": "train_step", "machine": mach, "peak_tflops": peak,
                                  "args": {k: v for k, v in vars(args).items() if k != "case"},
                                  "results": results})


if __name__ == "__main__":
    main()
