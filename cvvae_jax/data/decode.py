"""Decoding for the input pipeline: video clips by frame range (PyAV), images (Pillow).

Failures raise `MediaError` with a bad-data reason. Video frames are scaled by
FFmpeg's swscale while they are converted to RGB, which is cheaper than
converting at full size and resizing afterwards.
"""

from __future__ import annotations

import io
import itertools
import pathlib
from typing import Self

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, ImageOps, UnidentifiedImageError

from ..media import upright
from .bad_data import (
    ALPHA_REPAIRED,
    DECODE_ERROR,
    EMPTY_FILE,
    GRAYSCALE_REPAIRED,
    UNREADABLE,
    MediaError,
)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# Below this start frame, decoding from the beginning is about as fast as a seek
# (which lands on the previous keyframe anyway) and needs no timestamps.
_SEEK_MIN_START = 32
_GRAY_MODES = ("1", "L", "I", "I;16", "F")
_ALPHA_MODES = ("LA", "La", "RGBA", "RGBa", "PA")


def _open_media(media) -> tuple[object, str]:
    """A file path or encoded bytes (bytes or a 1-D uint8 array) as something PyAV/PIL open."""
    if isinstance(media, (str, pathlib.Path)):
        path = pathlib.Path(media)
        try:
            size = path.stat().st_size
        except OSError as e:
            raise MediaError(UNREADABLE, f"cannot read {path}: {e}") from e
        if size == 0:
            raise MediaError(EMPTY_FILE, f"{path} is empty (0 bytes)")
        return str(path), str(path)
    data = media.tobytes() if isinstance(media, np.ndarray) else bytes(media)
    if not data:
        raise MediaError(EMPTY_FILE, "the record holds 0 bytes")
    return io.BytesIO(data), "<bytes>"


class VideoReader:
    """One open video: header facts, then frames by (start, stride, count), upright.

    `height` and `width` are the stored frames'; `upright_size()` decodes the first
    frame for the size players show (phones store portrait video turned, with a
    display rotation).
    """

    def __init__(self, media):
        target, self._what = _open_media(media)
        try:
            self._container = av.open(target)
        except (av.error.FFmpegError, OSError) as e:
            raise MediaError(UNREADABLE, f"cannot open {self._what} as a video: {e}") from e
        try:
            if not self._container.streams.video:
                raise MediaError(UNREADABLE, f"{self._what} has no video stream")
            self._stream = self._container.streams.video[0]
            self._stream.thread_type = "AUTO"
            rate = self._stream.average_rate or self._stream.guessed_rate
            if not rate or not self._stream.width or not self._stream.height:
                raise MediaError(UNREADABLE, f"{self._what} declares no frame rate or size")
            self.fps = float(rate)
            self.height, self.width = self._stream.height, self._stream.width
            self.num_frames = self._count_frames()
            self._first = self._rest = None
        except MediaError:
            self._container.close()
            raise

    def _count_frames(self) -> int:
        if self._stream.frames:
            return int(self._stream.frames)
        # WebM and some other containers store a duration, not a frame count.
        if self._stream.duration is not None and self._stream.time_base:
            seconds = float(self._stream.duration * self._stream.time_base)
        elif self._container.duration:
            seconds = self._container.duration / av.time_base
        else:
            raise MediaError(UNREADABLE, f"{self._what} declares neither frames nor duration")
        frames = round(seconds * self.fps)
        if frames < 1:
            raise MediaError(UNREADABLE, f"{self._what} declares no frames")
        return frames

    def _first_frame(self):
        if self._first is None:
            self._rest = self._container.decode(self._stream)
            try:
                self._first = next(self._rest)
            except StopIteration:
                raise MediaError(DECODE_ERROR, f"{self._what}: no frame decoded") from None
            except av.error.FFmpegError as e:
                raise MediaError(DECODE_ERROR, f"decoding {self._what} failed: {e}") from e
        return self._first

    def _turned(self) -> bool:
        return round(self._first_frame().rotation / 90) % 2 == 1

    def upright_size(self) -> tuple[int, int]:
        """(height, width) as players show the video."""
        return (self.width, self.height) if self._turned() else (self.height, self.width)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._container.close()

    def _frame_index(self, frame) -> int:
        start_time = self._stream.start_time or 0
        return round(float((frame.pts - start_time) * self._stream.time_base) * self.fps)

    def read(self, start: int, stride: int, count: int,
             size: tuple[int, int] | None = None) -> np.ndarray:
        """Frames start, start + stride, ... (at most count) as uint8 (n, H, W, 3).

        `size` = (height, width), upright, scales each frame. Fewer than `count` frames
        come back when the video ends early (its header promised more than it has).
        """
        wanted = start
        last = start + (count - 1) * stride
        kwargs = {"format": "rgb24"}
        if size is not None and tuple(size) != self.upright_size():
            stored = size[::-1] if self._turned() else size
            kwargs.update(height=stored[0], width=stored[1], interpolation="BICUBIC")
        frames = []
        # One reformatter for the clip: it keeps its swscale context, which frame.to_ndarray
        # would rebuild for every frame (about 2/3 of the conversion time).
        reformatter = VideoReformatter()
        seek = start >= _SEEK_MIN_START and self._stream.time_base is not None
        try:
            if seek:
                offset = round(start / self.fps / self._stream.time_base)
                self._container.seek((self._stream.start_time or 0) + offset,
                                     stream=self._stream, backward=True)
                decoded = self._container.decode(self._stream)
            elif self._first is not None:  # upright_size decoded it: the stream is past it
                decoded = itertools.chain([self._first], self._rest)
            else:
                decoded = self._container.decode(self._stream)
            for i, frame in enumerate(decoded):
                if seek:
                    if frame.pts is None:
                        raise MediaError(DECODE_ERROR,
                                         f"{self._what}: frames lack timestamps, cannot seek")
                    i = self._frame_index(frame)
                if i < wanted:
                    continue
                frames.append(upright(frame, reformatter.reformat(frame, **kwargs).to_ndarray()))
                wanted += stride
                if wanted > last:
                    break
        except av.error.FFmpegError as e:
            raise MediaError(DECODE_ERROR, f"decoding {self._what} failed: {e}") from e
        if not frames:
            raise MediaError(DECODE_ERROR,
                             f"{self._what}: no frame decoded from frame {start} on")
        return np.stack(frames)


def probe_video(media) -> None:
    """Raises MediaError unless the header opens and declares a video stream."""
    with VideoReader(media):
        pass


def probe_image(media) -> None:
    """Raises MediaError unless the image header can be read (no pixel decode)."""
    target, what = _open_media(media)
    try:
        with Image.open(target):
            pass
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise MediaError(UNREADABLE, f"cannot read {what} as an image: {e}") from e


def load_image(media) -> tuple[np.ndarray, list[str]]:
    """Decodes an image to uint8 (H, W, 3) with repairs applied: (pixels, repair reasons).

    Grayscale is copied to RGB; transparency is composited over white, which is
    what viewers show for transparent areas.
    """
    target, what = _open_media(media)
    try:
        with Image.open(target) as image:
            image.load()
            return repair_pixels(ImageOps.exif_transpose(image))
    except MediaError:
        raise
    # Pillow's decoders fail on corrupt files with many types (OSError for truncation,
    # SyntaxError, ValueError, struct.error, DecompressionBombError, ...): all are bad data.
    except Exception as e:
        raise MediaError(UNREADABLE, f"cannot decode {what} as an image: {e}") from e


def repair_pixels(image) -> tuple[np.ndarray, list[str]]:
    """RGB uint8 (H, W, 3) from a PIL image or an (H, W[, C]) uint8 array, with repairs."""
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] == 3:
            return image.astype(np.uint8, copy=False), []
        if image.ndim == 2 or image.shape[-1] == 1:
            image = Image.fromarray(image.reshape(image.shape[:2]), "L")
        elif image.shape[-1] == 4:
            image = Image.fromarray(image, "RGBA")
        elif image.shape[-1] == 2:
            image = Image.fromarray(image, "LA")
        else:
            raise MediaError(UNREADABLE, f"pixels shaped {image.shape} are not an image")
    repairs = []
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        repairs.append(ALPHA_REPAIRED)
        if image.mode.startswith("L"):
            repairs.append(GRAYSCALE_REPAIRED)
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    elif image.mode in _GRAY_MODES:
        repairs.append(GRAYSCALE_REPAIRED)
    return np.asarray(image.convert("RGB")), repairs
