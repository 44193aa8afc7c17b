"""Reconstruct a video with a pretrained CV-VAE, or export its latents.

    python -m cvvae_jax.reconstruct IN.mp4 --weights DIR [--subfolder vae3d] [--out OUT.mp4]
        [--size HxW] [--fit crop|resize] [--frames pad|trim] [--max-frames N]
        [--side-by-side] [--latents OUT.safetensors] [--encode-only]
        [--chunk-frames N|none] [--tile PX|none] [--dtype float32|bfloat16]
    python -m cvvae_jax.reconstruct LATENTS.safetensors --decode-only --weights DIR --out OUT.mp4

Any video works: its frame count is padded (the last frame repeated) or trimmed
to 1 + 4k, and its frames cropped or resized to multiples of 8; every change
is printed. Long or large inputs run in the frame chunks and spatial tiles of
config.json (or of --chunk-frames / --tile), with a progress bar per chunk.
The latents file holds the posterior mode, unscaled, and the metadata needed to
decode it back to the same video (docs/inference.md). A failure prints one
`error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from . import cli, dtypes, media, metrics, weights
from .model_config import CVVAEConfig, CVVAESD3Config, load_config
from .pretrained import resolve_dir
from .vae import CVVAE
from .weights import CONFIG_NAME

LATENTS_FORMAT = "cvvae-jax latents"
LATENTS_VERSION = "1"
LATENTS_KEY = "latents"
# The metadata that --decode-only reads back.
_DECODE_KEYS = ("fps", "output_frames", "model", "source")
# The sentinel for "as config.json says" in load_vae's chunk/tile overrides.
FROM_CONFIG = "config"


# -- fitting any video to what the encoder takes -------------------------------------------


def fit_frames(frames: np.ndarray, mode: str, time_factor: int = 4) -> tuple[np.ndarray, str]:
    """Pads (repeating the last frame) or trims a (T, H, W, 3) video to 1 + f*k frames.

    Returns the frames and a line saying what changed.
    """
    t = len(frames)
    if (t - 1) % time_factor == 0:
        return frames, f"{t} (already 1 + {time_factor}k)"
    need = f"the encoder needs 1 + {time_factor}k"
    if mode == "trim":
        n = 1 + (t - 1) // time_factor * time_factor
        return frames[:n], f"{t} -> {n} (trimmed {t - n} from the end; {need})"
    if mode == "pad":
        n = 1 + math.ceil((t - 1) / time_factor) * time_factor
        padded = np.concatenate([frames, np.repeat(frames[-1:], n - t, axis=0)])
        return padded, (f"{t} -> {n} (padded {n - t} by repeating the last frame; {need}); "
                        f"the output is trimmed back to {t}")
    raise ValueError(f"frames mode {mode!r}: use pad or trim")


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or min(int(m[1]), int(m[2])) < 1:
        raise ValueError(f"--size {text!r}: expected HxW with positive integers, e.g. 256x448")
    return int(m[1]), int(m[2])


def fit_size(frames: np.ndarray, size: tuple[int, int] | None, mode: str,
             factor: int = 8) -> tuple[np.ndarray, str]:
    """Crops or resizes (T, H, W, 3) frames to multiples of `factor` (and to `size`, HxW).

    crop: scales to cover `size` (if given, keeping the aspect), then centre-crops
    to it rounded down to multiples of `factor`. resize: resizes to `size` (or the
    frame size) rounded to the nearest multiples, aspect not kept.
    Returns the frames and a line saying what changed.
    """
    h, w = frames.shape[1:3]
    want = size or (h, w)
    if mode == "crop":
        th, tw = (s // factor * factor for s in want)
    elif mode == "resize":
        th, tw = (max(1, int(s / factor + 0.5)) * factor for s in want)  # halves round up
    else:
        raise ValueError(f"fit mode {mode!r}: use crop or resize")
    if min(th, tw) < factor:
        what = f"--size {size[0]}x{size[1]}" if size else f"frames of {h}x{w}"
        raise ValueError(f"{what}: cropping leaves less than {factor} px; the model needs at "
                         f"least {factor}x{factor} (use a larger --size or --fit resize)")
    if (th, tw) == (h, w):
        return frames, f"{h}x{w} (H x W, already multiples of {factor})"

    if mode == "crop" and size:
        frames = media.cover_and_crop(frames, (th, tw))
    elif mode == "crop":
        frames = media.centre_crop(frames, (th, tw))
    else:
        frames = media.resize_frames(frames, (th, tw))

    if size:
        how = f"--size {size[0]}x{size[1]}"
        if (th, tw) != size:
            how += f" rounded{' down' if mode == 'crop' else ''} to multiples of {factor}"
        how += ("; scaled to cover it, then centre-cropped" if mode == "crop"
                else "; resized, aspect not kept")
    elif mode == "crop":
        how = f"centre-cropped to multiples of {factor}; --fit resize resizes instead"
    else:
        how = f"resized to the nearest multiples of {factor}, aspect not kept"
    return frames, f"{h}x{w} -> {th}x{tw} (H x W; {how})"


# -- the model, run chunk by chunk ------------------------------------------------------


def _override(text: str | int | None, flag: str) -> int | None:
    if text is None or isinstance(text, int):
        return text
    if text.lower() == "none":
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{flag} {text!r}: expected a positive integer or none")
    return int(text)


def load_vae(weights: str | Path, subfolder: str | None = None, *, dtype: str = "float32",
             chunk_frames: str | int | None = FROM_CONFIG,
             tile: str | int | None = FROM_CONFIG) -> CVVAE:
    """The model, with config.json's chunking and tiling or the given ones.

    `chunk_frames` and `tile` replace config.json's `en_de_n_frames_a_time` and
    `tile_spatial_size` (None turns them off).
    """
    vae = CVVAE.from_pretrained(weights, subfolder, dtype=dtypes.resolve(dtype, what="--dtype"))
    cfg = vae.config
    if chunk_frames != FROM_CONFIG:
        chunk_frames = _override(chunk_frames, "--chunk-frames")
        try:
            cfg = cfg.replace(en_de_n_frames_a_time=chunk_frames)
        except ValueError as e:
            raise ValueError(f"--chunk-frames {chunk_frames}: {e}") from None
    if tile != FROM_CONFIG:
        tile = _override(tile, "--tile")
        # The official ratio (0.2222) gives strides off the 8 px grid for most tile sizes
        # (256 -> 199 px), which the tiler cannot use: round the overlap to the grid instead.
        f, ratio = cfg.space_factor, cfg.tile_overlap_ratio or 0.0
        overlap = 0 if tile is None else round(tile * ratio / f) * f
        try:
            cfg = cfg.replace(tile_spatial_size=tile,
                              tile_overlap_ratio=overlap / tile if tile else ratio)
        except ValueError as e:
            raise ValueError(f"--tile {tile}: {e}") from None
    # The config is static model structure: a changed one gets its own compilations.
    vae.config = cfg
    return vae


def _bar(desc: str, progress: bool):
    """A tqdm bar driven by the model's per-chunk progress callback."""
    bar = tqdm(desc=desc, unit="chunk", disable=not progress, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return bar, update


def encode(vae: CVVAE, x, *, progress: bool = True) -> jax.Array:
    """(B, 1 + 4k, H, W, 3) in [-1, 1] -> the posterior mode (B, 1 + k, H/8, W/8, C), float32."""
    bar, update = _bar("encode", progress)
    with bar:
        return vae.encode(jnp.asarray(x), update).mode()


def decode(vae: CVVAE, z, *, progress: bool = True) -> jax.Array:
    """Latents (B, 1 + k, h, w, C) -> pixels (B, 1 + 4k, 8h, 8w, 3), in the compute dtype."""
    bar, update = _bar("decode", progress)
    with bar:
        return vae.decode(jnp.asarray(z), update)


# -- the latents file -------------------------------------------------------------------


def save_latents(path: str | Path, z, metadata: dict[str, str | int | float]) -> None:
    """Writes (1, 1 + k, h, w, C) float32 latents and str metadata to a safetensors file."""
    meta = {"format": LATENTS_FORMAT, "version": LATENTS_VERSION, **metadata}
    weights.write_safetensors(Path(path), {LATENTS_KEY: np.asarray(z, np.float32)},
                              metadata={k: str(v) for k, v in meta.items()})


def load_latents(path: str | Path) -> tuple[np.ndarray, dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latents file not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            z = f.get_tensor(LATENTS_KEY) if LATENTS_KEY in f.keys() else None
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} as a safetensors file: {e}") from None
    if meta.get("format") != LATENTS_FORMAT or z is None:
        raise ValueError(f"{path} is not a latents file written by --latents "
                         f"(format={meta.get('format')!r})")
    missing = sorted(k for k in _DECODE_KEYS if k not in meta)
    if missing:
        raise ValueError(f"{path}: latents metadata lacks {', '.join(missing)}")
    return z, meta


# -- the command line -------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cvvae_jax.reconstruct", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="video file (or a latents file with --decode-only)")
    p.add_argument("--weights", required=True, type=Path, metavar="DIR",
                   help="model directory: official safetensors layout or Orbax")
    p.add_argument("--subfolder", help="model folder inside --weights, e.g. vae3d, vae3d_sd3")
    p.add_argument("--out", type=Path, metavar="OUT.mp4",
                   help="output video (default: <input name>_recon.mp4)")
    p.add_argument("--size", metavar="HxW",
                   help="frame size to crop or resize to (rounded to multiples of the model's "
                        "spatial factor, 8 for the official models)")
    p.add_argument("--fit", choices=("crop", "resize"), default="crop",
                   help="how to reach those multiples / --size (default: %(default)s)")
    p.add_argument("--frames", choices=("pad", "trim"), default="pad",
                   help="reach 1 + 4k frames by repeating the last frame (output trimmed back) "
                        "or by dropping frames from the end (default: %(default)s)")
    p.add_argument("--max-frames", type=int, metavar="N",
                   help="read at most the first N frames")
    p.add_argument("--side-by-side", action="store_true",
                   help="write input | reconstruction side by side")
    p.add_argument("--latents", type=Path, metavar="OUT.safetensors",
                   help="also save the latents (default with --encode-only: "
                        "<input name>_latents.safetensors)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--encode-only", action="store_true", help="write the latents only")
    mode.add_argument("--decode-only", action="store_true",
                      help="the input is a latents file; write its video")
    p.add_argument("--chunk-frames", default=FROM_CONFIG, metavar="N|none",
                   help="frames per encoder chunk, a multiple of 4 (default: config.json's "
                        "en_de_n_frames_a_time); lower it to save memory")
    p.add_argument("--tile", default=FROM_CONFIG, metavar="PX|none",
                   help="spatial tile size in pixels (default: config.json's tile_spatial_size)")
    p.add_argument("--dtype", type=dtypes.arg(),
                   help="compute dtype: float32 or bfloat16 (fp32, bf16 also accepted); default "
                        "float32, or with --decode-only the one that encoded the latents")
    return p.parse_args(argv)


class _Clock:
    """Wall time per named stage, printed on one line at the end."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str, fn, *args, **kw):
        start = time.perf_counter()
        out = fn(*args, **kw)
        self.times[name] = time.perf_counter() - start
        return out

    def line(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.times.items())


def _describe(vae: CVVAE, dtype: str) -> str:
    per_chunk = vae.config.encode_frames_per_chunk
    tile, ratio = vae.config.tile_spatial_size, vae.config.tile_overlap_ratio
    chunks = f"chunks of {per_chunk} frames" if per_chunk else "whole clip at once"
    tiles = f"{tile} px tiles overlapping {round(tile * ratio)} px" if tile else "tiling off"
    return f"{vae.config.CLASS_NAME}, {dtype}, {chunks}, {tiles}"


def _read_config(args) -> CVVAEConfig | CVVAESD3Config:
    """config.json alone: a wrong --weights fails fast, and the video is fitted to its factors."""
    path = resolve_dir(args.weights, args.subfolder) / CONFIG_NAME
    config = load_config(path)
    if not isinstance(config, CVVAE.CONFIG_CLASSES):
        raise ValueError(f"{path} is a {config.CLASS_NAME}, not a CV-VAE")
    return config


def _read_video(args, config) -> tuple[np.ndarray, float, int, dict[str, str]]:
    """Reads and fits the input video, printing each change.

    Returns the frames for the encoder, fps, how many output frames to keep and
    what was done (for the latents metadata).
    """
    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames {args.max_frames}: must be >= 1")
    size = parse_size(args.size) if args.size else None  # checked before the slow reads
    frames, fps = media.read_video(args.input, max_frames=args.max_frames)
    n_source = len(frames)
    print(f"input:   {args.input}: {n_source} frames of {frames.shape[1]}x{frames.shape[2]} "
          f"(H x W) at {fps:g} fps")
    frames, size_note = fit_size(frames, size, args.fit, config.space_factor)
    print(f"size:    {size_note}")
    frames, frames_note = fit_frames(frames, args.frames, config.time_factor)
    print(f"frames:  {frames_note}")
    n_out = n_source if args.frames == "pad" else len(frames)
    return frames, fps, n_out, {
        "source": str(args.input), "fps": repr(fps), "source_frames": str(n_source),
        "encoded_frames": str(len(frames)), "output_frames": str(n_out),
        "frames_mode": args.frames, "frames_note": frames_note,
        "size": f"{frames.shape[1]}x{frames.shape[2]}", "size_note": size_note}


def _layout(config) -> str:
    s = config.space_factor
    return f"(B, T, H/{s}, W/{s}, C)"


def _read_latents(path: Path, config) -> tuple[np.ndarray, float, int, dict[str, str]]:
    z, meta = load_latents(path)
    fps, n_out = float(meta["fps"]), int(meta["output_frames"])
    print(f"input:   {path}: latents {z.shape} {_layout(config)} of {meta['source']}; "
          f"{n_out} frames at {fps:g} fps")
    return z, fps, n_out, meta


def _check_flags(args: argparse.Namespace) -> None:
    """Flag combinations that cannot work, and the default output paths."""
    if args.decode_only and (args.side_by_side or args.latents):
        raise ValueError("--decode-only has no input video: drop --side-by-side and --latents")
    if args.encode_only and (args.out or args.side_by_side):
        raise ValueError("--encode-only writes no video: drop --out and --side-by-side")
    if args.encode_only and args.latents is None:
        args.latents = Path(f"{args.input.stem}_latents.safetensors")
    if args.out is None and not args.encode_only:
        args.out = Path(f"{args.input.stem}_recon.mp4")
    for out in (args.out, args.latents):
        if out is not None and out.resolve() == args.input.resolve():
            raise ValueError(f"{out} is the input file; write the output elsewhere")
    if args.out is not None:
        media.check_video_out(args.out)
    if args.latents is not None:
        if args.latents.is_dir():
            raise ValueError(f"--latents {args.latents} is a directory; give a file name, "
                             f"e.g. {args.latents / 'latents.safetensors'}")
        if args.out is not None and args.latents.resolve() == args.out.resolve():
            raise ValueError(f"--latents and --out are both {args.out}; give them different names")


def _run(args: argparse.Namespace) -> None:
    _check_flags(args)
    clock = _Clock()
    config = _read_config(args)
    if args.decode_only:
        z, fps, n_out, meta = clock("read", _read_latents, args.input, config)
        if meta["model"] != config.CLASS_NAME:
            raise ValueError(f"{args.input} holds latents of a {meta['model']}; "
                             f"--weights is a {config.CLASS_NAME}")
        if args.dtype is None:  # the decode of the full run
            args.dtype = meta.get("dtype", "float32")
        elif args.dtype != meta.get("dtype", args.dtype):
            print(f"note:    the latents were encoded in {meta['dtype']}; decoding in {args.dtype}")
    else:
        frames, fps, n_out, meta = clock("read", _read_video, args, config)
    args.dtype = args.dtype or "float32"

    vae = clock("load", load_vae, args.weights, args.subfolder, dtype=args.dtype,
                           chunk_frames=args.chunk_frames, tile=args.tile)
    print(f"model:   {_describe(vae, args.dtype)}")

    if not args.decode_only:
        x = media.to_float(frames)[None]  # a batch of one
        z = clock("encode", encode, vae, x)
        print(f"latents: {tuple(z.shape)} {_layout(vae.config)}, posterior mode")
        if args.latents is not None:
            args.latents.parent.mkdir(parents=True, exist_ok=True)
            save_latents(args.latents, z, {
                **meta, "layout": f"{_layout(vae.config)} channels-last float32",
                "latent": "posterior mode (mean), unscaled: multiply by scaling_factor before "
                          "a diffusion model, divide its output by it before decoding",
                "scaling_factor": getattr(vae.config, "scaling_factor", "none"),
                "model": vae.config.CLASS_NAME, "dtype": args.dtype})
            print(f"wrote:   {args.latents} (latents)")
    if not args.encode_only:
        recon = np.asarray(clock("decode", decode, vae, z)[0, :n_out], np.float32)
        if not args.decode_only:
            db = metrics.psnr(x[0, :n_out], recon)
            print(f"PSNR:    {float(jnp.mean(db)):.2f} dB (mean over {n_out} frames)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        video = media.side_by_side(frames[:n_out], recon) if args.side_by_side else recon
        clock("write", media.write_video, args.out, video, fps)
        what = "input | reconstruction" if args.side_by_side else "reconstruction"
        print(f"wrote:   {args.out} ({what}, {n_out} frames, {fps:g} fps)")
    print(f"time:    {clock.line()} (first calls include compilation)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
