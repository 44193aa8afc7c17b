"""Small real media shipped with the package, for tests, demos and smoke runs.

See README.md here for where each file comes from and how to regenerate it.
"""

from __future__ import annotations

import pathlib

_DIR = pathlib.Path(__file__).resolve().parent
_MEDIA_SUFFIXES = (".mp4", ".jpg")

# 81 frames, 256x144, 30 fps, H.264 yuv420p.
CLIPS = ("clip_a.mp4", "clip_b.mp4")
# 456x256 RGB JPEGs.
IMAGES = ("image_0.jpg", "image_1.jpg", "image_2.jpg")


def path(name: str) -> pathlib.Path:
    """Absolute path of a bundled file, e.g. path("clip_a.mp4")."""
    available = sorted(p.name for p in _DIR.iterdir() if p.suffix in _MEDIA_SUFFIXES)
    # Matching against the listing (not joining blindly) also rejects "../x" and
    # files that are packaged here but are not media (this module, the README).
    if name not in available:
        raise FileNotFoundError(
            f"no bundled asset named {name!r} in {_DIR}; available: {', '.join(available)}")
    return _DIR / name
