"""Video and image I/O for people and tests: channels-last uint8 frames, PyAV for mp4.

Frames are numpy arrays shaped (T, H, W, 3). The model side works in float32 in
[-1, 1]; `to_float` and `to_uint8` are the only conversions between the two.
PyAV wheels bundle FFmpeg with libx264, so no system ffmpeg is needed.
"""

from __future__ import annotations

import fractions
import pathlib
from typing import Sequence

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

# White gap between tiles: wide enough to see, narrow enough not to waste pixels.
_SEPARATOR_PX = 4
_LABEL_PAD_PX = 6


def to_float(frames: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError(f"to_float expects uint8 pixels, got dtype {frames.dtype}")
    return frames.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(x) -> np.ndarray:
    """Float pixels in [-1, 1] -> uint8, clipping out-of-range model outputs."""
    x = np.asarray(x, dtype=np.float32)  # also takes jax arrays, bf16 included
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def cover_size(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) after scaling (height, width) by one factor so it covers `size`."""
    scale = max(size[0] / height, size[1] / width)
    return max(size[0], round(height * scale)), max(size[1], round(width * scale))


def resize_frames(frames: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(T, H, W, 3) uint8 frames resized (bicubic) to shape = (h, w)."""
    if frames.shape[1:3] == tuple(shape):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize(shape[::-1], Image.BICUBIC))
                     for f in frames])


def centre_crop(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = frames.shape[1:3]
    y, x = (h - size[0]) // 2, (w - size[1]) // 2
    return frames[:, y:y + size[0], x:x + size[1]]


def cover_and_crop(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(T, H, W, 3) frames scaled to cover size = (h, w), then centre-cropped to it."""
    return centre_crop(resize_frames(frames, cover_size(*frames.shape[1:3], size)), size)


def _as_uint8_video(frames, what: str) -> np.ndarray:
    """Validates a (T, H, W, 3) video; float videos are taken to be in [-1, 1]."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{what}: expected frames shaped (T, H, W, 3), got {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError(f"{what}: video has no frames")
    if frames.dtype == np.uint8:
        return frames
    if np.issubdtype(frames.dtype, np.floating):
        return to_uint8(frames)
    raise TypeError(f"{what}: expected uint8 or float frames, got dtype {frames.dtype}")


def upright(frame: av.VideoFrame, pixels: np.ndarray) -> np.ndarray:
    """A decoded frame's (H, W, C) pixels turned the way players show them.

    Phones store portrait video as landscape frames with a display rotation in the
    container; FFmpeg reports it per frame, counter-clockwise. Mirroring is not applied.
    """
    k = round(frame.rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(pixels, k)) if k else pixels


class VideoIn:
    """An open video file: its frame rate, then its frames decoded one at a time (upright).

    `frames()` holds one frame at a time, so a long video can be processed in pieces;
    `read_video` collects them all.
    """

    def __init__(self, path):
        self.path = path = pathlib.Path(path)
        if path.is_dir():
            raise ValueError(f"{path} is a directory; give a video file")
        if not path.is_file():
            raise FileNotFoundError(f"video file not found: {path}")
        if path.stat().st_size == 0:
            raise ValueError(f"video file is empty (0 bytes): {path}")
        try:
            self._container = av.open(str(path))
        except av.error.FFmpegError as e:
            raise ValueError(f"cannot decode {path} as a video: {e}") from e
        if not self._container.streams.video:
            self._container.close()
            raise ValueError(f"{path} has no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        rate = self._stream.average_rate or self._stream.guessed_rate
        if not rate:
            self._container.close()
            raise ValueError(f"{path} does not declare a frame rate")
        self.fps = float(rate)
        # What the header says; the decoded count may differ (a truncated file, or none given).
        self.frame_count_hint = int(self._stream.frames) or None

    def __enter__(self) -> "VideoIn":
        return self

    def __exit__(self, *exc) -> None:
        self._container.close()

    def frames(self, *, max_frames: int | None = None, start: int = 0, stride: int = 1):
        """Yields uint8 (H, W, 3) frames start, start + stride, ... (at most max_frames)."""
        if start < 0 or stride < 1 or (max_frames is not None and max_frames < 1):
            raise ValueError(
                f"reading {self.path}: need start >= 0, stride >= 1, max_frames >= 1 or None; "
                f"got start={start}, stride={stride}, max_frames={max_frames}")
        n_decoded = n_kept = 0
        try:
            for frame in self._container.decode(self._stream):
                index = n_decoded
                n_decoded += 1
                if index < start or (index - start) % stride:
                    continue
                n_kept += 1
                yield upright(frame, frame.to_ndarray(format="rgb24"))
                if n_kept == max_frames:
                    break
        except av.error.FFmpegError as e:
            raise ValueError(f"cannot decode {self.path} as a video: {e}") from e
        if not n_kept:
            raise ValueError(
                f"no frames read from {self.path}: {n_decoded} decodable frame(s), start={start}")


def read_video(
    path, *, max_frames: int | None = None, start: int = 0, stride: int = 1
) -> tuple[np.ndarray, float]:
    """Decodes frames start, start + stride, ... (at most max_frames) of the first video stream.

    Returns (uint8 frames (T, H, W, 3), upright (`upright`), frames per second of the source).
    """
    with VideoIn(path) as video:
        frames = list(video.frames(max_frames=max_frames, start=start, stride=stride))
        return np.stack(frames), video.fps


# Containers that take H.264 (WebM and GIF do not).
VIDEO_OUT_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".avi")


def check_video_out(path) -> None:
    """A path write_video can write, checked before any slow work."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a video file name, e.g. {path / 'out.mp4'}")
    if path.suffix.lower() not in VIDEO_OUT_SUFFIXES:
        raise ValueError(f"{path}: videos are written as H.264, into {', '.join(VIDEO_OUT_SUFFIXES)} "
                         "files; end the name with one of them")


class VideoOut:
    """An H.264 yuv420p video (mp4 and the other VIDEO_OUT_SUFFIXES) that common players
    open, written a few frames at a time; the file is complete once closed."""

    def __init__(self, path, fps: float, *, crf: int = 23):
        self.path = path = pathlib.Path(path)
        check_video_out(path)
        if not fps > 0:
            raise ValueError(f"write_video({path}): fps must be positive, got {fps}")
        self._fps, self._crf = fps, crf
        self._container = self._stream = None
        self.frames_written = 0

    def __enter__(self) -> "VideoOut":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self, width: int, height: int) -> None:
        # 1001 keeps NTSC rates exact (30000/1001) while integer rates stay integers.
        rate = fractions.Fraction(self._fps).limit_denominator(1001)
        self._container = av.open(str(self.path), mode="w")
        self._stream = self._container.add_stream("libx264", rate=rate)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(self._crf)}

    def write(self, frames) -> None:
        """Appends (T, H, W, 3) frames, uint8 or float in [-1, 1], all of one size."""
        frames = _as_uint8_video(frames, f"write_video({self.path})")
        # yuv420p stores chroma at half resolution, so libx264 refuses odd sizes: pad the
        # bottom/right edge by replicating the last row/column. A reader gets one extra
        # row/column on odd sides, rather than an error or a resampled picture.
        _, h, w, _ = frames.shape
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self._container is None:
            self._open(frames.shape[2], frames.shape[1])
        elif frames.shape[1:3] != (self._stream.height, self._stream.width):
            raise ValueError(f"write_video({self.path}): frames of {h}x{w} after frames of "
                             f"{self._stream.height}x{self._stream.width}")
        for image in frames:
            self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        self.frames_written += len(frames)

    def close(self) -> None:
        if self._container is not None:
            self._container.mux(self._stream.encode(None))  # flushes frames the encoder holds
            self._container.close()
            self._container = None


def write_video(path, frames, fps: float, *, crf: int = 23) -> None:
    """Writes (T, H, W, 3) frames, uint8 or float in [-1, 1], as one `VideoOut` video."""
    with VideoOut(path, fps, crf=crf) as out:
        out.write(frames)


def enlarge(video, min_height: int) -> np.ndarray:
    """(T, H, W, C) frames repeated pixel by pixel, by the least whole factor that makes
    them `min_height` tall or more, so that small training frames stay sharp on screen."""
    video = np.asarray(video)
    factor = -(-min_height // video.shape[1])
    if factor <= 1:
        return video
    return video.repeat(factor, axis=1).repeat(factor, axis=2)


def side_by_side(*videos) -> np.ndarray:
    """Concatenates videos along width with white separators, e.g. input | reconstruction."""
    if not videos:
        raise ValueError("side_by_side needs at least one video")
    videos = [_as_uint8_video(v, f"side_by_side video {i}") for i, v in enumerate(videos)]
    t, h = videos[0].shape[:2]
    for i, v in enumerate(videos):
        if v.shape[:2] != (t, h):
            raise ValueError(
                f"side_by_side: video {i} has {v.shape[0]} frames of height {v.shape[1]}, "
                f"video 0 has {t} frames of height {h}")
    gap = np.full((t, h, _SEPARATOR_PX, 3), 255, np.uint8)
    parts = [videos[0]]
    for v in videos[1:]:
        parts += [gap, v]
    return np.concatenate(parts, axis=2)


def frame_grid_png(
    path,
    rows: Sequence,
    *,
    n_frames: int = 4,
    labels: Sequence[str] | None = None,
) -> None:
    """Saves a PNG with one row per video and n_frames frames evenly spaced in time.

    Rows may differ in length (each is sampled over its own duration) but not in
    frame size. Labels, if given, go in a white strip on the left.
    """
    path = pathlib.Path(path)
    if not rows:
        raise ValueError(f"frame_grid_png({path}): no rows given")
    if n_frames < 1:
        raise ValueError(f"frame_grid_png({path}): n_frames must be >= 1, got {n_frames}")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(
            f"frame_grid_png({path}): {len(labels)} labels for {len(rows)} rows")
    rows = [_as_uint8_video(r, f"frame_grid_png row {i}") for i, r in enumerate(rows)]
    h, w = rows[0].shape[1:3]
    for i, r in enumerate(rows):
        if r.shape[1:3] != (h, w):
            raise ValueError(
                f"frame_grid_png: row {i} frames are {r.shape[1:3]}, row 0 frames are {(h, w)}")

    font = ImageFont.load_default()
    label_w = 0
    if labels is not None:
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_w = max(measure.textbbox((0, 0), str(s), font=font)[2] for s in labels)
        label_w += 2 * _LABEL_PAD_PX

    grid_w = label_w + n_frames * w + (n_frames - 1) * _SEPARATOR_PX
    grid_h = len(rows) * h + (len(rows) - 1) * _SEPARATOR_PX
    canvas = np.full((grid_h, grid_w, 3), 255, np.uint8)
    for i, video in enumerate(rows):
        y = i * (h + _SEPARATOR_PX)
        times = np.linspace(0, video.shape[0] - 1, n_frames).round().astype(int)
        for j, t in enumerate(times):
            x = label_w + j * (w + _SEPARATOR_PX)
            canvas[y:y + h, x:x + w] = video[t]

    image = Image.fromarray(canvas)
    if labels is not None:
        draw = ImageDraw.Draw(image)
        for i, text in enumerate(labels):
            y = i * (h + _SEPARATOR_PX) + h // 2
            draw.text((_LABEL_PAD_PX, y), str(text), fill=(0, 0, 0), font=font, anchor="lm")
    image.save(path, format="PNG")
