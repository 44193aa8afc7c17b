"""A TFDS builder for a folder of videos: prepare a corpus once, stream ArrayRecord shards.

    python -m cvvae_jax.data.tfds_videos prepare SRC_DIR OUT_DIR [--short_side 256]
        [--max_frames 300] [--metadata captions.csv] [--val_fraction 0.01] [--workers 8]

Each record keeps the video encoded ("video": the container's bytes as a 1-D
uint8 tensor), so a corpus costs about what its files cost, plus "filename",
"caption", "num_frames", "fps", "height", "width". `tfds.features.Video` would
store decoded frames and needs TensorFlow; this builder needs neither.
`--short_side` / `--max_frames` re-encode (H.264, CRF `--crf`) to the training
resolution on the way in, which makes the corpus smaller and its decoding
cheaper; otherwise the files are stored as they are. Unreadable files are
skipped, counted and listed. Read it back with a source entry
    dict(kind="tfds", tfds_name="cvvae_videos", data_dir=OUT_DIR, split="train",
         video_key="video", caption_key="caption", name_key="filename", ...)
The builder is not registered with TFDS (importing this module changes no global
registry); TFDS reads the prepared dataset from its files.
"""

from __future__ import annotations

import argparse
import collections
import fractions
import io
import json
import logging
import multiprocessing
import pathlib
import zlib
from typing import Any, ClassVar

import av
import numpy as np
import tensorflow_datasets as tfds

from .bad_data import DECODE_ERROR, UNREADABLE, MediaError
from .decode import VIDEO_EXTENSIONS, VideoReader
from .sources import caption_for, load_captions

NAME = "cvvae_videos"
# Hash buckets for the train/validation split: stable across runs and machines.
_SPLIT_BUCKETS = 10_000

logger = logging.getLogger(__name__)


def _even(x: float) -> int:
    """yuv420p needs even sizes."""
    return max(2, round(x / 2) * 2)


def _reencode(path: pathlib.Path, short_side: int | None, max_frames: int | None,
              crf: int) -> bytes:
    """H.264 mp4 bytes of the first max_frames frames, shorter side scaled to short_side."""
    out = io.BytesIO()
    try:
        with av.open(str(path)) as src, av.open(out, mode="w", format="mp4") as dst:
            stream = src.streams.video[0]
            stream.thread_type = "AUTO"
            h, w = stream.height, stream.width
            scale = 1.0 if short_side is None else short_side / min(h, w)
            rate = fractions.Fraction(stream.average_rate or stream.guessed_rate)
            rate = rate.limit_denominator(1001)  # keeps NTSC rates such as 30000/1001 exact
            enc = dst.add_stream("libx264", rate=rate)
            enc.width, enc.height = _even(w * scale), _even(h * scale)
            enc.pix_fmt = "yuv420p"
            enc.options = {"crf": str(crf)}
            for i, frame in enumerate(src.decode(stream)):
                if max_frames is not None and i >= max_frames:
                    break
                if i == 0 and frame.rotation:  # kept: readers turn the frames upright
                    enc.set_display_rotation(frame.rotation)
                frame = frame.reformat(width=enc.width, height=enc.height, format="yuv420p",
                                       interpolation="BICUBIC")
                # Renumbered at the output rate: source timestamps may be variable or offset.
                frame.pts, frame.time_base = i, 1 / rate
                dst.mux(enc.encode(frame))
            dst.mux(enc.encode(None))
    except av.error.FFmpegError as e:
        raise MediaError(DECODE_ERROR, f"re-encoding {path} failed: {e}") from e
    return out.getvalue()


def encode_example(path: pathlib.Path, *, short_side: int | None = None,
                   max_frames: int | None = None, crf: int = 23) -> dict[str, Any]:
    """The record fields of one video file (raises MediaError for a bad file)."""
    if short_side is None and max_frames is None:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise MediaError(UNREADABLE, f"cannot read {path}: {e}") from e
    else:
        with VideoReader(path):  # a bad file fails here with its bad-data reason
            pass
        data = _reencode(path, short_side, max_frames, crf)
    with VideoReader(data) as reader:
        info = {"num_frames": reader.num_frames, "fps": reader.fps,
                **dict(zip(("height", "width"), reader.upright_size()))}
    return {"video": np.frombuffer(data, np.uint8), **info}


def _encode_or_error(job: tuple[pathlib.Path, dict[str, Any]]):
    path, options = job
    try:
        return encode_example(path, **options), None
    except MediaError as e:
        return None, e


class CvvaeVideos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Encoded videos from a folder (recursive: mp4, webm, mov, avi) with captions."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Encoded video bytes, caption, frame count, fps and size."}

    def __init__(self, *, src_dir=None, short_side: int | None = None,
                 max_frames: int | None = None, crf: int = 23, metadata=None,
                 file_key: str = "file", caption_key: str = "caption",
                 val_fraction: float = 0.0, workers: int = 1, **kwargs):
        self._src_dir = None if src_dir is None else pathlib.Path(src_dir).resolve()
        self._options = {"short_side": short_side, "max_frames": max_frames, "crf": crf}
        self._captions = ({} if metadata is None else
                          load_captions(metadata, file_key=file_key, caption_key=caption_key))
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self._val_fraction = val_fraction
        self._workers = workers
        # reason -> relative paths of the files left out, for the caller's report.
        self.skipped: dict[str, list[str]] = collections.defaultdict(list)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features
        return tfds.core.DatasetInfo(
            builder=self,
            description="Videos stored encoded (container bytes), for cvvae_jax.data.",
            features=features.FeaturesDict({
                "video": features.Tensor(shape=(None,), dtype=np.uint8),
                "filename": features.Text(),
                "caption": features.Text(),
                "num_frames": features.Scalar(dtype=np.int32),
                "fps": features.Scalar(dtype=np.float32),
                "height": features.Scalar(dtype=np.int32),
                "width": features.Scalar(dtype=np.int32),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the videos are local
        if self._src_dir is None:
            raise ValueError(f"preparing {NAME} needs src_dir")
        files = sorted(p.relative_to(self._src_dir).as_posix()
                       for p in self._src_dir.rglob("*")
                       if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
        if not files:
            raise FileNotFoundError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) "
                                    f"under {self._src_dir}")
        val = [f for f in files if self._in_validation(f)]
        train = [f for f in files if not self._in_validation(f)]
        splits = {"train": self._generate_examples(train)}
        if self._val_fraction:
            splits["validation"] = self._generate_examples(val)
        return splits

    def _in_validation(self, rel: str) -> bool:
        bucket = zlib.crc32(rel.encode("utf-8")) % _SPLIT_BUCKETS
        return bucket < self._val_fraction * _SPLIT_BUCKETS

    def _generate_examples(self, files):
        jobs = [(self._src_dir / f, self._options) for f in files]
        if self._workers > 1:
            with multiprocessing.get_context("spawn").Pool(self._workers) as pool:
                yield from self._examples(files, pool.imap(_encode_or_error, jobs, chunksize=4))
        else:
            yield from self._examples(files, map(_encode_or_error, jobs))

    def _examples(self, files, results):
        for rel, (example, error) in zip(files, results):
            if error is not None:
                self.skipped[error.reason].append(rel)
                logger.warning("skipping %s: %s: %s", rel, error.reason, error)
                continue
            caption = caption_for(self._captions, pathlib.PurePosixPath(rel)) or ""
            yield rel, {**example, "filename": rel, "caption": caption}


def prepare(src_dir, out_dir, **options) -> CvvaeVideos:
    """Prepares `cvvae_videos` from src_dir into out_dir (ArrayRecord shards).

    options: short_side, max_frames, crf, metadata, file_key, caption_key,
    val_fraction, workers (see CvvaeVideos). Returns the builder; its `skipped`
    lists the files left out by reason.
    """
    builder = CvvaeVideos(src_dir=src_dir, data_dir=str(out_dir), **options)
    # TFDS keeps a prepared version as it is: without this record, preparing another folder
    # into the same place printed the old dataset's counts as if they were the new one's.
    made_from = {"src_dir": str(pathlib.Path(src_dir).resolve()),
                 **{k: str(v) for k, v in sorted(options.items()) if k != "workers"}}
    record = pathlib.Path(builder.data_dir) / "cvvae_prepared_from.json"
    if (pathlib.Path(builder.data_dir) / "dataset_info.json").is_file():
        before = json.loads(record.read_text()) if record.is_file() else None
        if before != made_from:
            raise ValueError(f"{builder.data_dir} already holds {NAME}, prepared from "
                             f"{before or 'another source'}; prepare into a new OUT_DIR "
                             "(or delete that one)")
        logger.warning("%s is already prepared from these files and options: reading it back",
                       builder.data_dir)
        return builder
    builder.download_and_prepare(file_format="array_record")
    record.write_text(json.dumps(made_from, indent=1) + "\n")
    return builder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cvvae_jax.data.tfds_videos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("prepare", help="prepare a folder of videos as ArrayRecord shards")
    q.add_argument("src_dir", type=pathlib.Path)
    q.add_argument("out_dir", type=pathlib.Path, help="TFDS data_dir to write into")
    q.add_argument("--short_side", type=int, help="re-encode with this shorter side (px)")
    q.add_argument("--max_frames", type=int, help="re-encode keeping the first N frames")
    q.add_argument("--crf", type=int, default=23, help="H.264 quality when re-encoding")
    q.add_argument("--metadata", type=pathlib.Path, help="CSV/JSON/JSONL with captions")
    q.add_argument("--file_key", default="file")
    q.add_argument("--caption_key", default="caption")
    q.add_argument("--val_fraction", type=float, default=0.0,
                   help="fraction of files (by path hash) in a 'validation' split")
    q.add_argument("--workers", type=int, default=1, help="encoding processes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "src_dir", "out_dir")}
    builder = prepare(args.src_dir, args.out_dir, **options)
    for split, info in builder.info.splits.items():
        print(f"{NAME}/{split}: {info.num_examples} videos")
    for reason, names in builder.skipped.items():
        print(f"skipped ({reason}): {len(names)}: {', '.join(names[:10])}"
              + (" ..." if len(names) > 10 else ""))
    print(f"source entry: dict(kind='tfds', tfds_name='{NAME}', data_dir='{args.out_dir}', "
          "split='train', video_key='video', caption_key='caption', name_key='filename', ...)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
