"""Reconstruct a video with a pretrained CV-VAE, or export its latents.

    python -m cvvae_jax.reconstruct IN.mp4 --weights DIR [--subfolder vae3d] [--out OUT.mp4]
        [--size HxW] [--fit crop|resize] [--frames pad|trim] [--max-frames N]
        [--side-by-side] [--latents OUT.safetensors] [--encode-only]
        [--chunk-frames N|none] [--tile PX|none] [--dtype float32|bfloat16]
    python -m cvvae_jax.reconstruct LATENTS.safetensors --decode-only --weights DIR --out OUT.mp4

Any video works: its frame count is padded (the last frame repeated) or trimmed
to 1 + 4k, and its frames cropped or resized to multiples of 8; every change
is printed. Long or large inputs run in the frame chunks and spatial tiles of
config.json (or of --chunk-frames / --tile), one chunk read, encoded, decoded and
written at a time (`FrameChunks`), with a progress bar over the frames.
The latents file holds the posterior mode, unscaled, and the metadata needed to
decode it back to the same video (docs/inference.md). A failure prints one
`error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from . import cli, dtypes, media, metrics, tiling, weights
from .model_config import CVVAEConfig, CVVAESD3Config, load_config
from .pretrained import resolve_dir
from .vae import CVVAE
from .weights import CONFIG_NAME

LATENTS_FORMAT = "cvvae-jax latents"
LATENTS_VERSION = "1"
LATENTS_KEY = "latents"
# The metadata that --decode-only reads back.
_DECODE_KEYS = ("fps", "output_frames", "model", "source")
# --out names that get the single frame of a still image, not a video.
IMAGE_OUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# The sentinel for "as config.json says" in load_vae's chunk/tile overrides.
FROM_CONFIG = "config"


# -- fitting any video to what the encoder takes -------------------------------------------


def fitted_count(t: int, mode: str, time_factor: int = 4) -> tuple[int, str]:
    """The frame count the encoder gets for a t-frame video, and a line saying what changed."""
    if (t - 1) % time_factor == 0:
        return t, f"{t} (already 1 + {time_factor}k)"
    need = f"the encoder needs 1 + {time_factor}k"
    if mode == "trim":
        n = 1 + (t - 1) // time_factor * time_factor
        return n, f"{t} -> {n} (trimmed {t - n} from the end; {need})"
    if mode == "pad":
        n = 1 + math.ceil((t - 1) / time_factor) * time_factor
        return n, (f"{t} -> {n} (padded {n - t} by repeating the last frame; {need}); "
                   f"the output is trimmed back to {t}")
    raise ValueError(f"frames mode {mode!r}: use pad or trim")


def fit_frames(frames: np.ndarray, mode: str, time_factor: int = 4) -> tuple[np.ndarray, str]:
    """Pads (repeating the last frame) or trims a (T, H, W, 3) video to 1 + f*k frames.

    Returns the frames and a line saying what changed.
    """
    n, note = fitted_count(len(frames), mode, time_factor)
    return _to_count(frames, n), note


def _to_count(frames: np.ndarray, n: int) -> np.ndarray:
    """The first n frames, the last one repeated if there are fewer."""
    if n <= len(frames):
        return frames[:n]
    return np.concatenate([frames, np.repeat(frames[-1:], n - len(frames), axis=0)])


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or min(int(m[1]), int(m[2])) < 1:
        raise ValueError(f"--size {text!r}: expected HxW with positive integers, e.g. 256x448")
    return int(m[1]), int(m[2])


def fitted_size(frame: tuple[int, int], size: tuple[int, int] | None, mode: str,
                factor: int = 8) -> tuple[int, int]:
    """The (H, W) that `fit_size` gives frames of size `frame`."""
    want = size or frame
    if mode == "crop":
        th, tw = (s // factor * factor for s in want)
    elif mode == "resize":
        th, tw = (max(1, int(s / factor + 0.5)) * factor for s in want)  # halves round up
    else:
        raise ValueError(f"fit mode {mode!r}: use crop or resize")
    if min(th, tw) < factor:
        what = f"--size {size[0]}x{size[1]}" if size else f"frames of {frame[0]}x{frame[1]}"
        raise ValueError(f"{what}: cropping leaves less than {factor} px; the model needs at "
                         f"least {factor}x{factor} (use a larger --size or --fit resize)")
    return th, tw


def fit_size(frames: np.ndarray, size: tuple[int, int] | None, mode: str,
             factor: int = 8) -> tuple[np.ndarray, str]:
    """Crops or resizes (T, H, W, 3) frames to multiples of `factor` (and to `size`, HxW).

    crop: scales to cover `size` (if given, keeping the aspect), then centre-crops
    to it rounded down to multiples of `factor`. resize: resizes to `size` (or the
    frame size) rounded to the nearest multiples, aspect not kept.
    Returns the frames and a line saying what changed.
    """
    h, w = frames.shape[1:3]
    th, tw = fitted_size((h, w), size, mode, factor)
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


def configure(config: CVVAEConfig | CVVAESD3Config, chunk_frames: str | int | None = FROM_CONFIG,
              tile: str | int | None = FROM_CONFIG) -> CVVAEConfig | CVVAESD3Config:
    """config with `en_de_n_frames_a_time` / `tile_spatial_size` replaced (None: off)."""
    if chunk_frames != FROM_CONFIG:
        chunk_frames = _override(chunk_frames, "--chunk-frames")
        try:
            config = config.replace(en_de_n_frames_a_time=chunk_frames)
        except ValueError as e:
            raise ValueError(f"--chunk-frames {chunk_frames}: {e}") from None
    if tile != FROM_CONFIG:
        tile = _override(tile, "--tile")
        f = config.space_factor
        if tile is not None and tile % f:
            raise ValueError(f"--tile {tile}: must be a multiple of {f}, the model's spatial factor")
        # The official ratio (0.2222) gives strides off the 8 px grid for most tile sizes
        # (256 -> 199 px), which the tiler cannot use: round the overlap to the grid instead.
        ratio = config.tile_overlap_ratio or 0.0
        overlap = 0 if tile is None else round(tile * ratio / f) * f
        try:
            config = config.replace(tile_spatial_size=tile,
                                    tile_overlap_ratio=overlap / tile if tile else ratio)
        except ValueError as e:
            raise ValueError(f"--tile {tile}: {e}") from None
    return config


def load_vae(weights: str | Path, subfolder: str | None = None, *, dtype: str = "float32",
             chunk_frames: str | int | None = FROM_CONFIG,
             tile: str | int | None = FROM_CONFIG) -> CVVAE:
    """The model, with config.json's chunking and tiling or the given ones (`configure`)."""
    vae = CVVAE.from_pretrained(weights, subfolder, dtype=dtypes.resolve(dtype, what="--dtype"))
    # The config is static model structure: a changed one gets its own compilations.
    vae.config = configure(vae.config, chunk_frames, tile)
    return vae


def _bar(desc: str, progress: bool):
    """A tqdm bar driven by the model's progress callback (per tile of each frame chunk)."""
    bar = tqdm(desc=desc, unit="piece", disable=not progress, leave=False)

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


# -- a video file streamed through the chunks ---------------------------------------------


class FrameChunks:
    """A video's frames in the official encoder chunks, read as they are needed.

    Chunk n holds frames n*s .. (n+1)*s (1 + s frames, the first shared with chunk n-1,
    s = `per_chunk`); the video's frame count is fitted (`fitted_count`) in the last
    one. Encoding the chunks one by one therefore gives the latents of encoding the
    fitted video whole with the same chunking, while only one chunk of frames is in
    memory. `per_chunk=None` is one chunk: the whole video.
    """

    def __init__(self, frames, per_chunk: int | None, mode: str, time_factor: int):
        self._frames, self._per_chunk = frames, per_chunk
        self._mode, self._f = mode, time_factor
        self.source_frames = 0  # read so far
        self.encoded_frames = 0  # after fitting, once the last chunk is out
        self.note = ""

    def __iter__(self):
        buf, done = [], 0  # done: frames before buf[0] in chunks already given out
        for frame in self._frames:
            self.source_frames += 1
            buf.append(frame)
            if self._per_chunk and len(buf) == self._per_chunk + 1:
                yield np.stack(buf)
                done += self._per_chunk
                buf = buf[-1:]
        self.encoded_frames, self.note = fitted_count(self.source_frames, self._mode, self._f)
        rest = self.encoded_frames - done  # the last chunk's length, its shared frame included
        if rest > 1 or not done:
            yield _to_count(np.stack(buf), rest)


def _joined(chunks: list[np.ndarray]) -> np.ndarray:
    """The official join of chunk outputs: each chunk after the first loses its first frame."""
    return np.concatenate([chunks[0]] + [c[:, 1:] for c in chunks[1:]], axis=1)


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
    p.add_argument("--fit", choices=("crop", "resize"),
                   help="how to reach those multiples / --size (default: crop)")
    p.add_argument("--frames", choices=("pad", "trim"),
                   help="reach 1 + 4k frames by repeating the last frame (output trimmed back) "
                        "or by dropping frames from the end (default: pad)")
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
                        "en_de_n_frames_a_time, or with --decode-only the encoding's); lower it "
                        "to save memory; none reads and runs the whole clip at once")
    p.add_argument("--tile", default=FROM_CONFIG, metavar="PX|none",
                   help="spatial tile size in pixels (default: config.json's tile_spatial_size, "
                        "or with --decode-only the encoding's)")
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
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
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
    path = resolve_dir(args.weights, args.subfolder, [c.CLASS_NAME for c in CVVAE.CONFIG_CLASSES]) / CONFIG_NAME
    config = load_config(path)
    if not isinstance(config, CVVAE.CONFIG_CLASSES):
        raise ValueError(f"{path} is a {config.CLASS_NAME}, not a CV-VAE")
    return config


def _layout(config) -> str:
    s = config.space_factor
    return f"(B, T, H/{s}, W/{s}, C)"


def _read_latents(path: Path, config) -> tuple[np.ndarray, float, int, dict[str, str]]:
    z, meta = load_latents(path)
    fps, n_out = float(meta["fps"]), int(meta["output_frames"])
    print(f"input:   {path}: latents {z.shape} {_layout(config)} of {meta['source']}; "
          f"{n_out} frames at {fps:g} fps")
    return z, fps, n_out, meta


# config.json fields that decide how latents decode; the latents file records them.
_CHUNKING_FIELDS = ("en_de_n_frames_a_time", "tile_spatial_size", "tile_overlap_ratio")


def _chunking_meta(config) -> dict[str, str]:
    return {k: "none" if getattr(config, k) is None else repr(getattr(config, k))
            for k in _CHUNKING_FIELDS}


def _chunking_of(meta: dict[str, str], config):
    """config with the chunking the latents were encoded with, where the file records it."""
    recorded = {k: None if meta[k] == "none" else (float if k == "tile_overlap_ratio" else int)(meta[k])
                for k in _CHUNKING_FIELDS if k in meta}
    return config.replace(**recorded)


def _check_flags(args: argparse.Namespace) -> None:
    """Flag combinations that cannot work, and the defaults; before anything is read."""
    if args.decode_only:
        ignored = [flag for flag, value in (
            ("--size", args.size), ("--fit", args.fit), ("--frames", args.frames),
            ("--max-frames", args.max_frames), ("--side-by-side", args.side_by_side or None),
            ("--latents", args.latents)) if value is not None]
        if ignored:
            raise ValueError(f"--decode-only has no input video: drop {', '.join(ignored)}")
        if args.input.suffix.lower() != ".safetensors":
            raise ValueError(f"{args.input}: --decode-only takes a latents file (.safetensors) "
                             "written by --latents or --encode-only")
    elif args.input.suffix.lower() == ".safetensors":
        raise ValueError(f"{args.input} is a safetensors file: add --decode-only to decode latents")
    args.fit, args.frames = args.fit or "crop", args.frames or "pad"
    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames {args.max_frames}: must be >= 1")
    args.size = parse_size(args.size) if args.size else None
    if args.encode_only and (args.out or args.side_by_side):
        raise ValueError("--encode-only writes no video: drop --out and --side-by-side")
    if args.encode_only and args.latents is None:
        args.latents = Path(f"{args.input.stem}_latents.safetensors")
    if args.out is None and not args.encode_only:
        args.out = Path(f"{args.input.stem}_recon.mp4")
    for out in (args.out, args.latents):
        if out is not None and out.resolve() == args.input.resolve():
            raise ValueError(f"{out} is the input file; write the output elsewhere")
    if args.out is not None and not _is_image(args.out):
        media.check_video_out(args.out)
    if args.latents is not None:
        if args.latents.is_dir():
            raise ValueError(f"--latents {args.latents} is a directory; give a file name, "
                             f"e.g. {args.latents / 'latents.safetensors'}")
        if args.latents.suffix.lower() != ".safetensors":
            raise ValueError(f"--latents {args.latents}: latents are written as safetensors; "
                             "end the name with .safetensors")


def _load(args, config, clock) -> CVVAE:
    vae = clock("load", CVVAE.from_pretrained, args.weights, args.subfolder,
                dtype=dtypes.resolve(args.dtype, what="--dtype"))
    vae.config = config  # static model structure: a changed one gets its own compilations
    print(f"model:   {_describe(vae, args.dtype)}")
    return vae


class _Output:
    """The output video, written as chunks are decoded, or with an image name the one
    frame of a still; removed if the run fails."""

    def __init__(self, path: Path, fps: float):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.still = path, None
        self.video = None if _is_image(path) else media.VideoOut(path, fps)

    def __enter__(self) -> "_Output":
        return self

    def write(self, frames) -> None:
        if self.video is not None:
            self.video.write(frames)
        elif self.still is not None or len(frames) > 1:
            raise ValueError(f"--out {self.path} is an image, and the output has more than one "
                             "frame: give a video name, or --max-frames 1")
        else:
            self.still = media.to_uint8(frames[0]) if frames.dtype != np.uint8 else frames[0]

    def __exit__(self, exc_type, *_) -> None:
        if self.video is not None:
            self.video.close()
        elif exc_type is None:
            Image.fromarray(self.still).save(self.path)
        if exc_type is not None:
            self.path.unlink(missing_ok=True)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_OUT_SUFFIXES


def _length(path: Path, frames: int, fps: float) -> str:
    return "an image" if _is_image(path) else f"{frames} frames, {fps:g} fps"


def _tiles(bar: tqdm, stage: str):
    """The model's progress callback within one chunk: its tiles, on the frame bar."""

    def report(done: int, total: int) -> None:
        if total > 1:
            bar.set_postfix_str(f"{stage} tile {done}/{total}")

    return report


def _reconstruct(args, vae: CVVAE, clock: _Clock) -> None:
    """Reads, encodes, decodes and writes one chunk at a time (`FrameChunks`)."""
    cfg = vae.config
    with media.VideoIn(args.input) as video:
        frames = video.frames(max_frames=args.max_frames)
        first = clock("read", next, frames)
        print(f"input:   {args.input}: {first.shape[0]}x{first.shape[1]} (H x W) at {video.fps:g} fps")
        # Frames to come, where the header or --max-frames says (None: unknown).
        total = min(video.frame_count_hint or sys.maxsize, args.max_frames or sys.maxsize)
        total = None if total == sys.maxsize else total
        if args.out is not None and _is_image(args.out) and (total or 1) > 1:
            raise ValueError(f"--out {args.out} is an image, and {args.input} has {total} frames: "
                             "give a video name, or --max-frames 1")
        size_note = fit_size(first[None], args.size, args.fit, cfg.space_factor)[1]
        print(f"size:    {size_note}")

        def fitted():
            for frame in itertools.chain([first], frames):
                yield fit_size(frame[None], args.size, args.fit, cfg.space_factor)[0][0]

        chunks = FrameChunks(fitted(), cfg.encode_frames_per_chunk, args.frames, cfg.time_factor)
        z_chunks, psnr, written = [], [], 0
        output = contextlib.nullcontext() if args.encode_only else _Output(args.out, video.fps)
        desc = "encode" if args.encode_only else "reconstruct"
        with output as out, tqdm(total=total, unit="frame", desc=desc, leave=False) as bar:
            chunk_iter = iter(chunks)
            while (chunk := clock("read", next, chunk_iter, None)) is not None:
                x = media.to_float(chunk)[None]
                z = clock("encode", lambda: np.asarray(vae.encode(x, _tiles(bar, "encode")).mode()))
                if out is not None:
                    # The joined latents' slice that the official decode chunking gives this
                    # chunk: the previous chunk's last latent, then this chunk's own.
                    zin = z if not z_chunks else np.concatenate([z_chunks[-1][:, -1:], z[:, 1:]], 1)
                    y = clock("decode", lambda: np.asarray(vae.decode(zin, _tiles(bar, "decode"))[0],
                                                           np.float32))
                    new = slice(1 if z_chunks else 0, None)
                    keep = min(len(y[new]), chunks.source_frames - written)  # not the padding
                    y, x, chunk = y[new][:keep], x[0, new][:keep], chunk[new][:keep]
                    psnr.append(np.asarray(metrics.psnr(x, y)))
                    clock("write", out.write, media.side_by_side(chunk, y) if args.side_by_side else y)
                    written += keep
                z_chunks.append(z)
                bar.update(chunks.source_frames - bar.n)
    print(f"frames:  {chunks.note}")
    z = _joined(z_chunks)
    print(f"latents: {tuple(z.shape)} {_layout(cfg)}, posterior mode")
    if args.latents is not None:
        n_out = chunks.source_frames if args.frames == "pad" else chunks.encoded_frames
        args.latents.parent.mkdir(parents=True, exist_ok=True)
        save_latents(args.latents, z, {
            "source": str(args.input), "fps": repr(video.fps),
            "source_frames": str(chunks.source_frames), "encoded_frames": str(chunks.encoded_frames),
            "output_frames": str(n_out), "frames_mode": args.frames, "frames_note": chunks.note,
            "size": "x".join(map(str, fitted_size(first.shape[:2], args.size, args.fit, cfg.space_factor))),
            "size_note": size_note, "layout": f"{_layout(cfg)} channels-last float32",
            "latent": "posterior mode (mean), unscaled: multiply by scaling_factor before "
                      "a diffusion model, divide its output by it before decoding",
            "scaling_factor": getattr(cfg, "scaling_factor", "none"),
            "model": cfg.CLASS_NAME, "dtype": args.dtype, **_chunking_meta(cfg)})
        print(f"wrote:   {args.latents} (latents)")
    if not args.encode_only:
        over = f"mean over {written} frames" if written > 1 else "one frame"
        print(f"PSNR:    {float(np.concatenate(psnr).mean()):.2f} dB ({over})")
        what = "input | reconstruction" if args.side_by_side else "reconstruction"
        print(f"wrote:   {args.out} ({what}, {_length(args.out, written, video.fps)})")


def _decode_file(args, vae: CVVAE, z: np.ndarray, fps: float, n_out: int, clock: _Clock) -> None:
    """Decodes latents in the official decode chunks, writing each as it comes."""
    bounds = tiling.chunk_bounds(z.shape[1], vae.config.decode_frames_per_chunk)
    written = 0
    with _Output(args.out, fps) as out, tqdm(total=n_out, unit="frame", desc="decode", leave=False) as bar:
        for n, (a, b) in enumerate(bounds):
            y = clock("decode", lambda: np.asarray(vae.decode(z[:, a:b], _tiles(bar, "decode"))[0],
                                                   np.float32))
            y = y[1 if n else 0:][:n_out - written]
            clock("write", out.write, y)
            written += len(y)
            bar.update(len(y))
    print(f"wrote:   {args.out} (reconstruction, {_length(args.out, written, fps)})")


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
        config = _chunking_of(meta, config)
    # Flags are checked against the model before the video is read.
    config = configure(config, args.chunk_frames, args.tile)
    if args.size:
        fitted_size(args.size, args.size, args.fit, config.space_factor)
    args.dtype = args.dtype or "float32"
    vae = _load(args, config, clock)
    if args.decode_only:
        _decode_file(args, vae, z, fps, n_out, clock)
    else:
        _reconstruct(args, vae, clock)
    print(f"time:    {clock.line()} (first calls include compilation)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
