"""Reconstruct a bundled clip with a tiny, randomly initialised CV-VAE.

    python -m cvvae_jax.demo [--clip clip_a.mp4] [--frames 17] [--out outputs/demo] [--seed 0]

A smoke run of the whole video path (read -> encode -> decode -> write) that needs
no weights and no accelerator: well under a minute on a 2-core CPU, compiles included.
The model is untrained, so the reconstruction is coloured noise: this checks
the plumbing, not the quality. For real reconstructions load official weights with
`CVVAE.from_pretrained` (see README.md).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import numpy as np

from . import assets, media
from .model_config import CVVAEConfig, frame_count_problem
from .vae import CVVAE

# The official v1 architecture at the widths of tests/fixtures/cvvae_v1_tiny: the
# same 4x time / 8x space compression with 1/80 of the parameters (2.3 M). Width 32 (not
# 64) at the second level matters most on CPU: the decoder's time upsampling conv
# runs there at full resolution. The clips are small enough to run whole, so the
# official chunking and tiling are off.
TINY_CONFIG = dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
                   en_de_n_frames_a_time=None, tile_spatial_size=None)

# Frames per row of frames.png, evenly spaced over the clip.
GRID_FRAMES = 4


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 videos (of what is written, after rounding)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


class _Stages:
    """Prints numbered stage lines with the wall time each stage took."""

    def __init__(self, total: int):
        self.total, self.n = total, 0

    def __call__(self, name: str):
        self.n += 1
        print(f"[{self.n}/{self.total}] {name} ...", end="", flush=True)
        self.start = time.perf_counter()
        return self

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        # Ends the open line either way, so that an error message starts on its own.
        print(" failed" if exc_type else f" {time.perf_counter() - self.start:.1f} s", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cvvae_jax.demo", description=__doc__.split("\n")[0])
    p.add_argument("--clip", default="clip_a.mp4", choices=assets.CLIPS,
                   help="bundled clip to reconstruct (default: %(default)s)")
    p.add_argument("--frames", type=int, default=17,
                   help="first N frames of the clip; N = 1 + 4k (default: %(default)s)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("outputs/demo"),
                   help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="model init seed (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    config = CVVAEConfig().replace(**TINY_CONFIG)
    f = config.time_factor
    # Checked before any work rather than by encode() later.
    problem = frame_count_problem(args.frames, f)
    if problem:
        print(f"error: --frames {args.frames}: {problem}", file=sys.stderr)
        raise SystemExit(2)  # the exit status of the package's other CLIs for bad input

    stage = _Stages(total=5)
    with stage(f"load clip {args.clip}, {args.frames} frames"):
        frames, fps = media.read_video(assets.path(args.clip), max_frames=args.frames)
    if len(frames) < args.frames:
        print(f"error: --frames {args.frames}: {args.clip} has only {len(frames)} frames; the "
              f"largest valid count is {1 + (len(frames) - 1) // f * f}", file=sys.stderr)
        raise SystemExit(2)

    with stage("build tiny random CV-VAE"):
        vae = CVVAE.from_config(config, seed=args.seed)

    x = media.to_float(frames)[None]  # a batch of one: (1, T, H, W, 3)
    with stage("encode (includes JIT compile)"):
        z = vae.encode(x).mode().block_until_ready()
    with stage("decode (includes JIT compile)"):
        recon = media.to_uint8(vae.decode(z)[0])

    args.out.mkdir(parents=True, exist_ok=True)
    video_path, grid_path = args.out / "side_by_side.mp4", args.out / "frames.png"
    with stage(f"write {args.out}"):
        media.write_video(video_path, media.side_by_side(frames, recon), fps)
        diff = np.abs(frames.astype(np.int16) - recon.astype(np.int16)).astype(np.uint8)
        media.frame_grid_png(grid_path, [frames, recon, diff], n_frames=GRID_FRAMES,
                             labels=["input", "reconstruction", "|difference|"])

    print(f"device:      {jax.devices()[0].platform}")
    print(f"parameters:  {vae.num_params():,}")
    print(f"input:       {tuple(x.shape)} (B, T, H, W, C)")
    print(f"latent:      {tuple(z.shape)} (B, 1 + (T-1)/{f}, H/{config.space_factor}, "
          f"W/{config.space_factor}, C)")
    print(f"PSNR:        {psnr(frames, recon):.2f} dB")
    print("             (low as expected: the model is randomly initialised, not trained)")
    print(f"wrote:       {video_path}  (input | reconstruction, {fps:g} fps)")
    print(f"             {grid_path}  (rows: input, reconstruction, |difference|)")


if __name__ == "__main__":
    main()
