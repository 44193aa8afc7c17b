"""Bad data never stops a run: reasons, per-sample tallies, the skipping step, the counts.

A loader that meets a bad or repairable file records it in the sample itself
(`bad`: counts per reason, `bad_names`: "reason<TAB>name" lines) instead of in a
counter, because loaders run in Grain worker processes whose memory the trainer
never sees. Unusable samples carry no "video" and are dropped by `SkipBadIterDataset`,
which hands their tallies to the next good sample; the trainer's process sums the
tallies of each batch in a `BadDataLog` and logs every file name once.
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import numpy as np

# Skips: the sample is dropped (train) or masked out (eval).
EMPTY_FILE = "empty_file"  # zero bytes
UNREADABLE = "unreadable"  # no container/image header, no video stream, corrupt header
DECODE_ERROR = "decode_error"  # the header was fine but decoding failed or gave no frame
SHORT_CLIP_SKIPPED = "short_clip_skipped"  # fewer frames than the clip needs, short_clip="skip"
# Repairs: the sample is used.
SHORT_CLIP_PADDED = "short_clip_padded"  # last frame repeated, short_clip="pad"
GRAYSCALE_REPAIRED = "grayscale_repaired"  # one channel copied to RGB
ALPHA_REPAIRED = "alpha_repaired"  # composited over white
# Used as it is, but worth knowing: training on blurred frames teaches the VAE to blur.
UPSCALED = "upscaled"  # smaller than the sample size: enlarged to cover it

SKIPS = (EMPTY_FILE, UNREADABLE, DECODE_ERROR, SHORT_CLIP_SKIPPED)
REASONS = (*SKIPS, SHORT_CLIP_PADDED, GRAYSCALE_REPAIRED, ALPHA_REPAIRED, UPSCALED)
_REASON_INDEX = {r: i for i, r in enumerate(REASONS)}

# A source whose records fail this many times in a row is broken, not unlucky:
# stop with a message rather than spin through it forever.
MAX_CONSECUTIVE_BAD = 1000

logger = logging.getLogger(__name__)


class MediaError(Exception):
    """A file or record that cannot give a usable sample; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        if reason not in _REASON_INDEX:
            raise ValueError(f"unknown bad-data reason {reason!r}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        # Crosses process boundaries (preparing with worker processes) intact.
        return MediaError, (self.reason, str(self))


class Tally:
    """What one sample met on its way: reasons with the record name, in order."""

    def __init__(self, name: str):
        self.name = name
        self.counts = np.zeros(len(REASONS), np.int32)
        self.lines: list[str] = []

    def add(self, reason: str) -> None:
        self.counts[_REASON_INDEX[reason]] += 1
        self.lines.append(f"{reason}\t{self.name}")

    def fields(self) -> dict[str, Any]:
        return {"bad": self.counts, "bad_names": "\n".join(self.lines)}


class _SkipBadIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, source_name: str):
        super().__init__(parent)
        self._source_name = source_name

    def __next__(self) -> dict[str, Any]:
        counts = np.zeros(len(REASONS), np.int32)
        lines = []
        for _ in range(MAX_CONSECUTIVE_BAD):
            element = next(self._parent)
            counts += element["bad"]
            if element["bad_names"]:
                lines.append(element["bad_names"])
            if "video" in element:
                return {**element, "bad": counts, "bad_names": "\n".join(lines)}
        raise RuntimeError(
            f"data source {self._source_name!r}: {MAX_CONSECUTIVE_BAD} records in a row "
            f"were unusable; the last ones were:\n"
            + "\n".join(line.replace("\t", ": ") for line in lines[-5:]))

    # Tallies of dropped samples ride on the next good sample, so after every good
    # sample (hence at every batch boundary) nothing is pending: the parent's state
    # is the whole state.
    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class SkipBadIterDataset(grain.IterDataset):
    """Drops samples without "video", moving their tallies onto the next good sample."""

    def __init__(self, parent: grain.IterDataset, *, source_name: str):
        super().__init__(parent)
        self._source_name = source_name

    def __iter__(self) -> _SkipBadIterator:
        return _SkipBadIterator(self._parent.__iter__(), self._source_name)


class BadDataLog:
    """Counts per source and reason, summed from batch tallies; logs each file once."""

    def __init__(self, source_names):
        self._counts = {name: dict.fromkeys(REASONS, 0) for name in source_names}
        self._logged: set[tuple[str, str]] = set()

    def add(self, source: str, counts: np.ndarray, names: np.ndarray) -> None:
        """Takes a batch's `bad` (B, R) and `bad_names` (B,) fields."""
        for reason, n in zip(REASONS, np.asarray(counts).sum(axis=0)):
            self._counts[source][reason] += int(n)
        for lines in np.asarray(names).ravel():
            for line in str(lines).splitlines():
                if (source, line) not in self._logged:
                    self._logged.add((source, line))
                    reason, name = line.split("\t", 1)
                    logger.warning("data source %r: %s: %s (logged once, counted each time)",
                                   source, reason, name)

    def counts(self) -> dict[str, dict[str, int]]:
        """{source: {reason: count}} for every source and reason, zeros included."""
        return {source: dict(c) for source, c in self._counts.items()}

    def metrics(self, prefix: str = "data") -> dict[str, int]:
        """Flat non-zero counts, e.g. {"data/videos/unreadable": 2}, for a metrics writer."""
        return {f"{prefix}/{source}/{reason}": n
                for source, c in self._counts.items() for reason, n in c.items() if n}

    def set_counts(self, counts: dict[str, dict[str, int]]) -> None:
        for source, c in counts.items():
            if source not in self._counts:
                raise ValueError(f"saved bad-data counts name an unknown source {source!r}; "
                                 f"sources: {sorted(self._counts)}")
            self._counts[source].update({r: int(n) for r, n in c.items() if r in REASONS})
