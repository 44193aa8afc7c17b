"""One record -> one sample: decode, pick frames, resize, crop, flip, scale to [-1, 1].

Records come from the sources (`sources.py`) as dicts: "media" ("video",
"image" or "pad"), "data" (a file path, encoded bytes, or decoded uint8 pixels),
"name" and "caption". A sample is a dict with "video" float32 (T, H, W, 3) in
[-1, 1], "name", "caption" and the bad-data tally ("bad", "bad_names"); a record
that gives no sample comes out without "video" (train) or masked (eval).

Spatially, the shorter side is scaled so the frame covers the target (H, W),
then a random (train) or centre (eval) crop cuts it; train flips the whole clip
left-right with probability 1/2.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from .. import media
from ..media import centre_crop, cover_size, resize_frames
from . import clips
from .bad_data import (
    DECODE_ERROR,
    SHORT_CLIP_PADDED,
    SHORT_CLIP_SKIPPED,
    UPSCALED,
    MediaError,
    Tally,
)
from .decode import VideoReader, load_image, repair_pixels

SHORT_CLIP_POLICIES = ("pad", "skip")


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """What a source's samples look like and how they are drawn.

    `stride` is the (min, max) range for train and (s, s) for eval. `train`
    selects random window/crop/flip over first-frames/centre/no-flip.
    """

    frames: int
    size: tuple[int, int]
    stride: tuple[int, int]
    train: bool
    flip: bool = False
    short_clip: str = "pad"

    def __post_init__(self):
        clips.check_frames(self.frames)
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height, width) > 0, got {self.size}")
        lo, hi = self.stride
        if not 1 <= lo <= hi:
            raise ValueError(f"stride range must satisfy 1 <= min <= max, got {self.stride}")
        if self.short_clip not in SHORT_CLIP_POLICIES:
            raise ValueError(f"short_clip must be one of {SHORT_CLIP_POLICIES}, "
                             f"got {self.short_clip!r}")
        if self.flip and not self.train:
            raise ValueError("flip is a train augmentation; eval samples are never flipped")


def _crop(frames: np.ndarray, size: tuple[int, int], rng) -> np.ndarray:
    h, w = frames.shape[1:3]
    if rng is None:
        return centre_crop(frames, size)
    y, x = int(rng.integers(h - size[0] + 1)), int(rng.integers(w - size[1] + 1))
    return frames[:, y:y + size[0], x:x + size[1]]


def _window(num_frames: int, spec: SampleSpec, rng) -> tuple[int, int]:
    if spec.train:
        return clips.train_window(num_frames, spec.frames, spec.stride, rng)
    return 0, spec.stride[0]


def _cover(height: int, width: int, spec: SampleSpec, tally: Tally) -> tuple[int, int]:
    """The size to resize to before the crop, counting media smaller than the sample."""
    shape = cover_size(height, width, spec.size)
    if shape[0] > height or shape[1] > width:
        tally.add(UPSCALED)
    return shape


def _too_short(spec: SampleSpec, got: int, tally: Tally) -> None:
    """Applies the short-clip policy to a clip with only `got` of spec.frames frames."""
    if spec.short_clip == "skip":
        raise MediaError(SHORT_CLIP_SKIPPED, f"{tally.name}: {got} frame(s) at this stride, "
                                             f"the clip needs {spec.frames}")
    tally.add(SHORT_CLIP_PADDED)


def _video_frames(data, spec: SampleSpec, rng, tally: Tally) -> np.ndarray:
    """A clip of covering size (before the crop), short clips padded or skipped."""
    if isinstance(data, np.ndarray) and data.ndim == 4:  # decoded (T, H, W, C) pixels
        if not data.size:
            raise MediaError(DECODE_ERROR, f"{tally.name}: the record holds no frame")
        start, stride = _window(data.shape[0], spec, rng)
        repaired = [repair_pixels(f) for f in data[start::stride][:spec.frames]]
        frames = np.stack([pixels for pixels, _ in repaired])
        for reason in repaired[0][1]:
            tally.add(reason)
        frames = resize_frames(frames, _cover(*frames.shape[1:3], spec, tally))
    else:
        with VideoReader(data) as reader:
            start, stride = _window(reader.num_frames, spec, rng)
            if spec.short_clip == "skip" and clips.span(spec.frames, stride) > reader.num_frames:
                # Known from the header: no need to decode what will be dropped.
                _too_short(spec, len(range(0, reader.num_frames, stride)), tally)
            shape = _cover(*reader.upright_size(), spec, tally)
            frames = reader.read(start, stride, spec.frames, size=shape)
    if frames.shape[0] < spec.frames:
        _too_short(spec, frames.shape[0], tally)
        frames = clips.pad_frames(frames, spec.frames)
    return frames


def _image_frames(data, spec: SampleSpec, tally: Tally) -> np.ndarray:
    if isinstance(data, np.ndarray) and data.ndim >= 2:  # decoded (H, W[, C]) pixels
        pixels, repairs = repair_pixels(data)
    else:
        pixels, repairs = load_image(data)
    for reason in repairs:
        tally.add(reason)
    return resize_frames(pixels[None], _cover(*pixels.shape[:2], spec, tally))


def load_sample(record: dict[str, Any], spec: SampleSpec,
                rng: np.random.Generator | None) -> dict[str, Any]:
    """The sample for one record; `rng` is None for eval (deterministic)."""
    tally = Tally(record["name"])
    try:
        if record["media"] == "image":
            if spec.frames != 1:
                raise ValueError(f"image samples have 1 frame, the spec asks {spec.frames}")
            frames = _image_frames(record["data"], spec, tally)
        else:
            frames = _video_frames(record["data"], spec, rng, tally)
    except MediaError as e:
        tally.add(e.reason)
        return {"name": record["name"], "caption": record["caption"], **tally.fields()}
    frames = _crop(frames, spec.size, rng if spec.train else None)
    if spec.flip and rng.random() < 0.5:
        frames = frames[:, :, ::-1]
    return {"video": media.to_float(frames), "name": record["name"],
            "caption": record["caption"], **tally.fields()}


class TrainSample(grain.transforms.RandomMap):
    """Grain transform: record -> train sample (random window, crop and flip)."""

    def __init__(self, spec: SampleSpec):
        if not spec.train:
            raise ValueError("TrainSample needs a train spec")
        self.spec = spec

    def random_map(self, record, rng: np.random.Generator):
        return load_sample(record, self.spec, rng)


class EvalSample(grain.transforms.Map):
    """Grain transform: record -> eval sample with "mask"; a bad or padding record
    becomes zeros with mask False, so every process yields the same batch count."""

    def __init__(self, spec: SampleSpec):
        if spec.train:
            raise ValueError("EvalSample needs an eval spec")
        self.spec = spec

    def map(self, record):
        if record["media"] == "pad":
            sample = {"name": "", "caption": "", **Tally("").fields()}
        else:
            sample = load_sample(record, self.spec, None)
        if "video" in sample:
            return {**sample, "mask": np.True_}
        shape = (self.spec.frames, *self.spec.size, 3)
        return {**sample, "video": np.zeros(shape, np.float32), "mask": np.False_}
