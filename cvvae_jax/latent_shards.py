"""The on-disk format of a latents dataset: ArrayRecord shards, their sidecars, metadata.json.

`encode_dataset` writes it; `read_record` and `shard_paths` read it back. The layout,
the record fields and the metadata are described in docs/latents.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from flax import serialization

from .data import REASONS

FORMAT = "cvvae-latents/1"
METADATA_NAME = "metadata.json"
PREFIX = "latents"
# One record per chunk, so that a reader (Grain) can fetch any record alone.
WRITER_OPTIONS = "group_size:1"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Records [k * shard_size, (k + 1) * shard_size) form shard k; process k % P writes it.

    The layout does not depend on the process count, so a run resumed with another
    process count picks up the same shards.
    """

    num_records: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_records // self.shard_size)

    def records(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_records))

    def name(self, k: int) -> str:
        return f"{PREFIX}-{k:05d}-of-{self.num_shards:05d}"

    def owned(self, process_index: int, process_count: int) -> list[int]:
        return list(range(process_index, self.num_shards, process_count))


def read_record(data: bytes) -> dict[str, Any]:
    """One stored record as a dict of numpy arrays, ints and strings (see docs/latents.md)."""
    return serialization.msgpack_restore(data)


def shard_paths(out: str | Path) -> list[Path]:
    """The completed shards in `out`, in record order (e.g. for grain's ArrayRecordDataSource)."""
    return sorted(Path(out).glob(f"{PREFIX}-*-of-*.array_record"))


def write_json(path: Path, value: dict) -> None:
    """Atomically: a reader (or a resumed run) sees the old file or the new one, never half."""
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")  # hosts may share pids
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def complete(out: Path, layout: Layout, k: int) -> bool:
    # The sidecar is written before the shard is renamed into place: both or redo.
    name = layout.name(k)
    return (out / f"{name}.array_record").is_file() and (out / f"{name}.json").is_file()


def prepare_out(out: Path, spec: dict[str, Any]) -> None:
    """Starts `out`, or checks that what it holds was encoded with the same settings."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / METADATA_NAME
    if not path.is_file():
        # Processes starting together may all get here: they write the same content.
        write_json(path, {**spec, "complete": False})
        return
    saved = json.loads(path.read_text())
    saved = {k: v for k, v in saved.items() if k not in ("complete", "counts")}
    diff = _differing(saved, spec)
    if diff:
        raise ValueError(f"{out} holds latents encoded with other settings (differing: "
                         f"{'; '.join(diff)}); pass the same arguments to resume, or use a "
                         "new --out")


def _differing(saved: dict, spec: dict, prefix: str = "") -> list[str]:
    """`key: saved -> new` for each setting that differs, dotted into nested settings."""
    out = []
    for k in sorted(set(saved) | set(spec)):
        a, b = saved.get(k), spec.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {_short(a)} -> {_short(b)}")
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class ShardWriter:
    """Writes one shard under a temporary name and moves it into place when it is complete."""

    def __init__(self, out: Path, name: str):
        self.final = out / f"{name}.array_record"
        self.sidecar = out / f"{name}.json"
        self.tmp = out / f"{name}.array_record.tmp"
        self.tmp.unlink(missing_ok=True)  # a partial shard of an interrupted run
        self._writer: ArrayRecordWriter | None = ArrayRecordWriter(str(self.tmp), WRITER_OPTIONS)
        self.encoded = 0
        self.skipped: list[dict[str, Any]] = []
        self.bad = np.zeros(len(REASONS), np.int64)

    def write(self, record: dict[str, Any]) -> None:
        self._writer.write(serialization.msgpack_serialize(record))
        self.encoded += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def commit(self, records: range) -> dict[str, Any]:
        self.close()
        summary = {"records": [records.start, records.stop], "encoded": self.encoded,
                   "skipped": self.skipped,
                   "bad_data": {r: int(n) for r, n in zip(REASONS, self.bad) if n}}
        write_json(self.sidecar, summary)
        os.replace(self.tmp, self.final)
        return summary


def finalize(out: Path, layout: Layout) -> dict[str, Any] | None:
    """metadata.json with the totals, once every shard is in (whichever process is last)."""
    if not all(complete(out, layout, k) for k in range(layout.num_shards)):
        return None
    metadata = json.loads((out / METADATA_NAME).read_text())
    encoded, skipped, bad = 0, 0, dict.fromkeys(REASONS, 0)
    for k in range(layout.num_shards):
        shard = json.loads((out / f"{layout.name(k)}.json").read_text())
        encoded += shard["encoded"]
        skipped += len(shard["skipped"])
        for reason, n in shard["bad_data"].items():
            bad[reason] += n
    metadata.update(complete=True, counts={"encoded": encoded, "skipped": skipped,
                                           "bad_data": {r: n for r, n in bad.items() if n}})
    write_json(out / METADATA_NAME, metadata)
    return metadata
