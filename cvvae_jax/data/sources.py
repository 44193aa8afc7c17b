"""Grain random-access sources: folders of videos or images, and TFDS datasets.

A source has a stable length and index order (folders: files sorted by relative
path; TFDS: the prepared record order) and returns records, not pixels:
{"media": "video" | "image", "data": path, encoded bytes or decoded pixels,
"name": str, "caption": str}. Decoding happens in the transforms, inside Grain's
workers. Construction probes headers until one record opens, so a source with
no readable file fails at start; the bad files themselves are skipped and
counted while streaming (see bad_data.py).
"""

from __future__ import annotations

import csv
import json
import logging
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from .bad_data import MediaError
from .decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, probe_image, probe_video

logger = logging.getLogger(__name__)


def load_captions(path, *, file_key: str = "file",
                  caption_key: str = "caption") -> dict[str, str]:
    """{file: caption} from a CSV (header row), a JSON list of rows or {file: caption}
    object, or JSON Lines. A file is matched by relative path, file name or stem."""
    path = pathlib.Path(path)
    text = path.read_text(encoding="utf-8-sig")  # spreadsheets write CSVs with a BOM
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    elif path.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        data = json.loads(text)
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}
        rows = data
    for i, row in enumerate(rows):
        missing = [k for k in (file_key, caption_key) if k not in row]
        if missing:
            where = "" if i == 0 else f" row {i + 1}"
            raise KeyError(f"{path}{where}: no column/key {missing} (found {sorted(row)}); "
                           f"set file_key / caption_key")
    return {str(row[file_key]): str(row[caption_key]) for row in rows}


def caption_for(captions: dict[str, str], rel: pathlib.PurePosixPath) -> str | None:
    """The caption of the file at relative path `rel`, None if the metadata has none."""
    for key in (str(rel), rel.name, rel.stem):
        if key in captions:
            return captions[key]
    return None


def captions_for(metadata, files: list[str], **keys) -> list[str]:
    """Each file's caption ("" without one), saying how many files the metadata missed:
    rows keyed otherwise (./x.mp4, absolute paths) would leave every caption empty."""
    captions = load_captions(metadata, **keys)
    found = [caption_for(captions, pathlib.PurePosixPath(f)) for f in files]
    missed = [f for f, c in zip(files, found) if c is None]
    if missed:
        logger.warning("%s: %d of %d files have no caption row and get \"\" (e.g. %s); rows "
                       "match a file by its path under the folder, its name or its stem",
                       metadata, len(missed), len(files), missed[0])
    return ["" if c is None else c for c in found]


def _first_readable(what: str, count: int, probe: Callable[[int], None]) -> None:
    """Probes records in index order until one opens; a clear error if none does."""
    if count == 0:
        raise ValueError(f"{what}: no records")
    errors = []
    for i in range(count):
        try:
            probe(i)
            return
        except MediaError as e:
            errors.append(f"{e.reason}: {e}")
    raise ValueError(f"{what}: none of the {count} record(s) is readable, e.g.\n  "
                     + "\n  ".join(errors[:5]))


class FolderSource:
    """Files under `root` (recursively) whose suffix is in `extensions`, sorted."""

    def __init__(self, root, *, media: str, extensions, metadata=None,
                 file_key: str = "file", caption_key: str = "caption"):
        if media not in ("video", "image"):
            raise ValueError(f"media must be 'video' or 'image', got {media!r}")
        self.root = pathlib.Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder not found: {self.root}")
        self.media = media
        if isinstance(extensions, str):
            extensions = (extensions,)
        suffixes = {("" if e.startswith(".") else ".") + e.lower() for e in extensions}
        self.files = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                            if p.suffix.lower() in suffixes and p.is_file())
        if not self.files:
            raise FileNotFoundError(f"no {media} files ({', '.join(sorted(suffixes))}) "
                                    f"under {self.root}")
        self.captions = [""] * len(self.files)
        if metadata is not None:
            self.captions = captions_for(metadata, self.files, file_key=file_key,
                                         caption_key=caption_key)
        probe = probe_video if media == "video" else probe_image
        _first_readable(f"{media} folder {self.root}", len(self.files),
                        lambda i: probe(self.root / self.files[i]))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"media": self.media, "data": str(self.root / self.files[index]),
                "name": self.files[index], "caption": self.captions[index]}

    def __repr__(self) -> str:
        return f"FolderSource({self.media}, {self.root}, {len(self)} files)"


def video_folder(root, *, extensions=VIDEO_EXTENSIONS, **kwargs) -> FolderSource:
    """A folder (recursive) of videos: mp4, webm, mov, avi."""
    return FolderSource(root, media="video", extensions=extensions, **kwargs)


def image_folder(root, *, extensions=IMAGE_EXTENSIONS, **kwargs) -> FolderSource:
    """A folder (recursive) of images: jpg, png, webp."""
    return FolderSource(root, media="image", extensions=extensions, **kwargs)


def _text(value) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsSource:
    """A split of a prepared TFDS dataset read through `tfds.data_source` (ArrayRecord).

    Exactly one of `video_key` / `image_key` names the field with the media:
    encoded bytes (a file's bytes, e.g. this project's `cvvae_videos` builder) or
    decoded uint8 pixels ((T, H, W, C) videos, (H, W, C) images). `name_key`
    names a field that identifies the record in logs (else "name/split/index").
    """

    def __init__(self, name: str, *, split: str = "train", data_dir=None,
                 video_key: str | None = None, image_key: str | None = None,
                 caption_key: str | None = None, name_key: str | None = None):
        import tensorflow_datasets as tfds  # slow import; only this source needs it

        if (video_key is None) == (image_key is None):
            raise ValueError("TfdsSource needs exactly one of video_key, image_key")
        self.media = "video" if video_key else "image"
        self._key = video_key or image_key
        self._caption_key, self._name_key = caption_key, name_key
        self._label = f"{name}/{split}"
        try:
            self._records = tfds.data_source(name, split=split, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            # TFDS's own message lists every dataset it could download, thousands of lines.
            root = pathlib.Path(data_dir or "~/tensorflow_datasets").expanduser()
            here = sorted({p.relative_to(root).parts[0] for p in root.glob("**/dataset_info.json")})
            raise ValueError(f"TFDS dataset {name!r} is not prepared under data_dir={data_dir!r} "
                             f"(prepared there: {here or 'none'}); `python -m "
                             "cvvae_jax.data.tfds_videos prepare` makes one from a folder") from None
        if len(self._records):
            first = self._records[0]
            missing = [k for k in (self._key, caption_key, name_key)
                       if k is not None and k not in first]
            if missing:
                raise KeyError(f"TFDS {self._label}: no field(s) {missing}; "
                               f"fields: {sorted(first)}")
        probe = probe_video if self.media == "video" else probe_image
        _first_readable(f"TFDS {self._label}", len(self._records),
                        lambda i: self._probe(self._records[i][self._key], probe))

    @staticmethod
    def _probe(data, probe) -> None:
        if isinstance(data, np.ndarray) and data.ndim >= 2 and data.size:
            return  # decoded pixels
        probe(data)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._records[index]
        name = (_text(record[self._name_key]) if self._name_key
                else f"{self._label}/{index}")
        caption = _text(record[self._caption_key]) if self._caption_key else ""
        return {"media": self.media, "data": record[self._key], "name": name,
                "caption": caption}

    def __repr__(self) -> str:
        return f"TfdsSource({self.media}, {self._label}, {len(self)} records)"
