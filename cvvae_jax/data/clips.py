"""Which frames of a video make a clip: `1 + 4k` frames at a stride, where they start.

Training draws the stride uniformly from the strides in the configured range
that fit the video (official CV-VAE: 1..8), then a uniform start; evaluation
takes the first frames at a fixed stride. A video too short even for the
smallest stride gets start 0 at that stride, and the caller pads or skips it.
"""

from __future__ import annotations

import numpy as np

from ..model_config import frame_count_problem


def check_frames(frames: int) -> None:
    """The VAE compresses time 4x after the first frame: clips have 1 + 4k frames."""
    problem = frame_count_problem(frames, 4)
    if problem:
        raise ValueError(f"frames={frames}: {problem}")


def span(frames: int, stride: int) -> int:
    """Source frames covered by a clip: first to last, inclusive."""
    return (frames - 1) * stride + 1


def train_window(num_frames: int, frames: int, stride_range: tuple[int, int],
                 rng: np.random.Generator) -> tuple[int, int]:
    """(start, stride) drawn uniformly: stride among those that fit, then start."""
    lo, hi = stride_range
    fitting = [s for s in range(lo, hi + 1) if span(frames, s) <= num_frames]
    if not fitting:
        return 0, lo
    stride = fitting[int(rng.integers(len(fitting)))]
    start = int(rng.integers(num_frames - span(frames, stride) + 1))
    return start, stride


def pad_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """Repeats the last frame until there are `count` frames."""
    missing = count - frames.shape[0]
    if missing <= 0:
        return frames
    return np.concatenate([frames, np.repeat(frames[-1:], missing, axis=0)])
