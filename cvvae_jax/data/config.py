"""The data config: defaults that configs/*.py extend, and checked per-source entries.

`default_config()` is the official SD3 recipe's input side (320 px images, batch
8; 17x256x256 clips at stride 1..8, batch 1; half the steps each) on the bundled
media, so it runs as-is; point `path` (or the TFDS fields) at real data. Field
reference: docs/data.md.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

import ml_collections

from .. import assets

KINDS = ("video_folder", "image_folder", "tfds")
_REQUIRED = ("name", "kind", "frames", "size", "batch_size")


def default_config() -> ml_collections.ConfigDict:
    bundled = str(assets.path(assets.CLIPS[0]).parent)
    c = ml_collections.ConfigDict()
    c.sources = [
        {"name": "videos", "kind": "video_folder", "path": bundled, "weight": 0.5,
         "frames": 17, "size": (256, 256), "stride": (1, 8), "batch_size": 1},
        {"name": "images", "kind": "image_folder", "path": bundled, "weight": 0.5,
         "frames": 1, "size": (320, 320), "batch_size": 8},
    ]
    # Paper protocol: 33 frames at stride 3, 256x256 centre crop. The bundled
    # clips (81 frames) are shorter than the 97 frames that spans: they are padded.
    c.eval_sources = [
        {"name": "videos", "kind": "video_folder", "path": bundled,
         "frames": 33, "size": (256, 256), "stride": 3, "batch_size": 1},
    ]
    c.num_workers = 0  # worker processes per source (0: decode in the trainer's process)
    c.read_threads = 2  # decoding threads per process and source
    c.prefetch = 2  # batches buffered ahead per worker
    c.seed = 0
    c.short_clip = "pad"  # or "skip": a video shorter than 1 + (frames - 1) x stride
    c.flip = True
    return c


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One entry of `sources` / `eval_sources`, with defaults filled and types checked."""

    name: str
    kind: str
    frames: int
    size: tuple[int, int]
    batch_size: int
    weight: float = 1.0
    stride: tuple[int, int] = (1, 1)
    # video_folder / image_folder
    path: str | None = None
    extensions: tuple[str, ...] | None = None
    metadata: str | None = None  # CSV / JSON / JSONL captions
    file_key: str = "file"
    caption_key: str | None = None  # folders: "caption" when None
    # tfds
    tfds_name: str | None = None
    data_dir: str | None = None
    split: str = "train"
    video_key: str | None = None
    image_key: str | None = None
    name_key: str | None = None

    def __post_init__(self):
        for key in ("frames", "batch_size", "size", "stride"):
            value = getattr(self, key)
            pair = key in ("size", "stride")
            if not (len(value) == 2 and all(map(_is_int, value)) if pair else _is_int(value)):
                raise ValueError(f"source {self.name!r}: {key} must be "
                                 f"{'two integers' if pair else 'an integer'}, got {value!r}")
        if self.kind not in KINDS:
            raise ValueError(f"source {self.name!r}: kind must be one of {KINDS}, "
                             f"got {self.kind!r}")
        if self.kind in ("video_folder", "image_folder") and not self.path:
            raise ValueError(f"source {self.name!r}: kind {self.kind!r} needs `path`")
        if self.kind == "tfds" and not self.tfds_name:
            raise ValueError(f"source {self.name!r}: kind 'tfds' needs `tfds_name`")
        if self.video_key and self.image_key:
            raise ValueError(f"source {self.name!r}: set one of video_key / image_key, not both")
        if self.batch_size < 1:
            raise ValueError(f"source {self.name!r}: batch_size must be >= 1")
        if self.media == "image" and self.frames != 1:
            raise ValueError(f"source {self.name!r} holds images: frames must be 1, "
                             f"got {self.frames}")

    @property
    def media(self) -> str:
        if self.kind == "tfds":
            return "image" if self.image_key else "video"
        return "image" if self.kind == "image_folder" else "video"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def parse_source(entry: Mapping[str, Any]) -> SourceConfig:
    """A SourceConfig from a dict or ConfigDict entry; unknown keys are an error."""
    entry = dict(entry.to_dict() if isinstance(entry, ml_collections.ConfigDict) else entry)
    known = {f.name for f in dataclasses.fields(SourceConfig)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(f"source {entry.get('name')!r}: unknown field(s) {unknown}; "
                         f"known: {sorted(known)}")
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise ValueError(f"source {entry.get('name')!r}: missing field(s) {missing}")
    stride = entry.get("stride", 1)
    entry["stride"] = (stride, stride) if _is_int(stride) else stride
    for key in ("size", "stride", "extensions"):
        value = entry.get(key)
        if isinstance(value, (list, tuple)):
            entry[key] = tuple(value)
        elif key == "extensions" and isinstance(value, str):
            entry[key] = (value,)
        elif value is not None:  # a scalar where a pair belongs: SourceConfig names it
            entry[key] = (value,)
    return SourceConfig(**entry)


def parse_sources(entries) -> list[SourceConfig]:
    sources = [parse_source(e) for e in entries]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    return sources
