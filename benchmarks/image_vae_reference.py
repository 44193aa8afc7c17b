"""Our ImageVAE against the diffusers AutoencoderKL (PyTorch, CPU, float32), same weights.

    python benchmarks/image_vae_reference.py [--config sd21|tiny|PATH] [--frames 17] [--size 256]
        [--runs 3] [--warmup 1] [--json out.json]

The PyTorch model is diffusers' `AutoencoderKL` built from the config (default: the
full-size Stable Diffusion 2.1 VAE, 83.7 M parameters) with random weights
(torch.manual_seed(0)); ours is `ImageVAE` filled from its state_dict through the same
loading path as `ImageVAE.from_pretrained` (`weights.fill_state`). Both run in float32
in this one process, PyTorch with torch.set_num_threads(os.cpu_count()), one after the
other. The input is --frames frames of the bundled clip_a.mp4, --size x --size, as one
batch of images; decode's input is PyTorch's posterior mean, for both.

Encode is `encode(x).latent_dist.mean` vs `vae.encode(x).mean`, decode is
`decode(z).sample` vs `vae.decode(z)` (the public API; ours jits on the first call,
which is reported apart). Reported: median and min of --runs timed calls after
--warmup, the ratio ours / PyTorch of the medians (below 1: ours is faster), and the
largest absolute difference between the two outputs. PyTorch runs under
torch.inference_mode (no autograd bookkeeping).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import common  # noqa: F401 - puts the repository root on sys.path

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from cvvae_jax import weights  # noqa: E402
from cvvae_jax.image_vae import ImageVAE  # noqa: E402
from cvvae_jax.model_config import ImageVAEConfig  # noqa: E402

# The full-size SD 2.1 VAE (stabilityai/stable-diffusion-2-1, subfolder vae).
SD21 = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}
CONFIGS = {"tiny": common.ROOT / "tests" / "fixtures" / "sd_vae_tiny" / "config.json"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="sd21",
                   help="'sd21' (full-size SD 2.1 VAE), 'tiny' (the test fixture's), or a config.json")
    p.add_argument("--frames", type=int, default=17, help="clip frames, taken as a batch of images")
    p.add_argument("--size", type=int, default=256, help="image height and width")
    p.add_argument("--runs", type=int, default=3, help="timed runs (median and min reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs after the first call")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    return args


def import_torch():
    try:
        import diffusers
        import torch
    except ImportError as e:
        sys.exit(f"error: this benchmark needs PyTorch and diffusers ({e.name} is missing); they are "
                 "test dependencies: pip install -e '.[test]'")
    return torch, diffusers


def load_config_dict(name: str) -> dict:
    if name == "sd21":
        return dict(SD21)
    return json.loads(Path(CONFIGS.get(name, name)).read_text())


def ours_from_torch(config: dict, state_dict: dict[str, np.ndarray]) -> ImageVAE:
    """ImageVAE with the given PyTorch weights, as from_pretrained fills them."""
    cfg = ImageVAEConfig.from_dict({k: v for k, v in config.items()
                                    if k.startswith("_") or k in ImageVAEConfig.field_names()})
    graphdef, abstract = nnx.split(ImageVAE.abstract(cfg))
    state = weights.fill_state(abstract, state_dict, source="diffusers AutoencoderKL state_dict",
                               param_dtype=np.float32)
    return nnx.merge(graphdef, state)


def measure(fn, args) -> dict:
    first_s, out = common.timed(fn)
    times = common.time_runs(fn, warmup=args.warmup, runs=args.runs)
    return {"first_call_s": first_s, **common.summary(times), "out": out}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch, diffusers = import_torch()
    torch.set_num_threads(os.cpu_count())
    config = load_config_dict(args.config)

    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL.from_config(
        {k: v for k, v in config.items() if not k.startswith("_")}).eval()
    state_dict = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    ours = ours_from_torch(config, state_dict)
    n_params = sum(p.numel() for p in ref.parameters())
    assert ours.num_params() == n_params

    frames = common.clip_frames(args.frames, args.size, args.size)  # (N, H, W, 3)
    x_torch = torch.from_numpy(np.ascontiguousarray(np.moveaxis(frames, -1, 1)))
    x_ours = jax.device_put(frames)

    with torch.inference_mode():
        enc_t = measure(lambda: ref.encode(x_torch).latent_dist.mean, args)
        z_torch = enc_t.pop("out")
        z_nhwc = np.ascontiguousarray(np.moveaxis(z_torch.numpy(), 1, -1))
        z_ours = jax.device_put(z_nhwc)
        dec_t = measure(lambda: ref.decode(z_torch).sample, args)
        dec_torch = np.moveaxis(dec_t.pop("out").numpy(), 1, -1)
    enc_o = measure(lambda: ours.encode(x_ours).mean, args)
    enc_o["max_abs_diff"] = float(np.max(np.abs(np.asarray(enc_o.pop("out")) - z_nhwc)))
    dec_o = measure(lambda: ours.decode(z_ours), args)
    dec_o["max_abs_diff"] = float(np.max(np.abs(np.asarray(dec_o.pop("out")) - dec_torch)))
    results = {"encode": {"torch": enc_t, "ours": enc_o}, "decode": {"torch": dec_t, "ours": dec_o}}

    mach = common.machine()
    if mach["backend"] != "cpu":
        print(f"note: ours ran on {mach['backend']} and PyTorch on the CPU; for a like-for-like "
              "ratio run with JAX_PLATFORMS=cpu", file=sys.stderr)
    print(common.machine_line(mach) + f"; torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), diffusers {diffusers.__version__}")
    print(f"model: AutoencoderKL {args.config} (block_out_channels={config['block_out_channels']}, "
          f"layers_per_block={config['layers_per_block']}), {n_params / 1e6:.1f} M parameters, "
          f"random weights (seed 0), float32; input: {args.frames} frames of clip_a.mp4 at "
          f"{args.size}x{args.size} as one batch; median and min of {args.runs} run(s) after the "
          f"first call and {args.warmup} warm-up")
    headers = ["direction", "PyTorch median (s)", "ours median (s)", "ours / PyTorch",
               "PyTorch min (s)", "ours min (s)", "ours first call (s)", "PyTorch images/s",
               "ours images/s", "max abs diff"]
    rows = []
    for direction, r in results.items():
        t, o = r["torch"], r["ours"]
        rows.append([direction, common.fmt(t["median_s"]), common.fmt(o["median_s"]),
                     common.fmt(o["median_s"] / t["median_s"], ".2f"), common.fmt(t["min_s"]),
                     common.fmt(o["min_s"]), common.fmt(o["first_call_s"]),
                     common.fmt(args.frames / t["median_s"]), common.fmt(args.frames / o["median_s"]),
                     common.fmt(o["max_abs_diff"], ".2e")])
    print(common.table(headers, rows))
    common.write_json(args.json, {"benchmark": "image_vae_reference", "machine": mach,
                                  "torch": torch.__version__, "diffusers": diffusers.__version__,
                                  "torch_threads": torch.get_num_threads(), "params": n_params,
                                  "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
