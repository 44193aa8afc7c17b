"""Synthetic media whose pixels say which frame they are, for tests and benchmarks.

Frame i of `write_indexed_video` is flat: red 8 + 16 (i mod 15), green
8 + 16 (i div 15), blue 128. H.264 at CRF 18 keeps flat frames within ~3 levels,
far inside the 8-level margin, so `frame_ids` reads the indices back exactly
after decoding, resizing and cropping.
"""

from __future__ import annotations

import av
import numpy as np

_STEP = 16
_BASE = 8
_PER_ROW = 15


def indexed_frame(i: int, size: tuple[int, int]) -> np.ndarray:
    pixels = np.empty((*size, 3), np.uint8)
    pixels[..., 0] = _BASE + _STEP * (i % _PER_ROW)
    pixels[..., 1] = _BASE + _STEP * (i // _PER_ROW)
    pixels[..., 2] = 128
    return pixels


def write_indexed_video(path, num_frames: int, *, size: tuple[int, int] = (32, 32),
                        fps: int = 30, codec: str = "libx264", keyframe_interval=None,
                        container_options=None, rotation: int = 0) -> None:
    """Writes frames 0..num_frames-1 (at most 240) with `indexed_frame` pixels.

    `rotation` (degrees, counter-clockwise) is stored for the display, as phones do.
    """
    if num_frames > _PER_ROW * _PER_ROW:
        raise ValueError(f"at most {_PER_ROW * _PER_ROW} distinguishable frames")
    with av.open(str(path), mode="w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        options = {"crf": "18"}
        if keyframe_interval is not None:
            options["g"] = str(keyframe_interval)
        stream.options = options
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(indexed_frame(i, size), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_corner_video(path, num_frames: int, *, size: tuple[int, int] = (32, 48),
                       rotation: int = 0, corner: int = 8) -> None:
    """Black frames with a white `corner` x `corner` square at the stored top left, and a
    display `rotation` (degrees, counter-clockwise): where the square lands shows the turn."""
    pixels = np.zeros((*size, 3), np.uint8)
    pixels[:corner, :corner] = 255
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for _ in range(num_frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))


def white_box(frame: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, left), (bottom, right)) of the bright pixels of a uint8 or [-1, 1] frame."""
    frame = np.asarray(frame, np.float32)
    bright = np.argwhere(frame.mean(-1) > (0 if frame.max() <= 1 else 128))
    return tuple(bright.min(0).tolist()), tuple(bright.max(0).tolist())


def frame_ids(frames: np.ndarray) -> np.ndarray:
    """Frame indices of (T, H, W, 3) uint8 or [-1, 1] float frames of an indexed video."""
    frames = np.asarray(frames)
    if np.issubdtype(frames.dtype, np.floating):
        frames = (frames.astype(np.float64) + 1.0) * 127.5
    mean = frames.mean(axis=(1, 2))
    row = np.round((mean[:, 0] - _BASE) / _STEP).astype(int)
    col = np.round((mean[:, 1] - _BASE) / _STEP).astype(int)
    return row + _PER_ROW * col
