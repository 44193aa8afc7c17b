"""Grain pipelines from the data config: the mixed train stream and the eval pass.

Per source and process: the records of this process's shard (every
`process_count`-th record from `process_index`) -> shuffle -> repeat -> decode
and augment (threads, or worker processes with `num_workers`) -> drop bad
samples -> batch. `TrainPipeline` then takes each step's batch from the source
`schedule(step)` names (mixing.py) and is itself a Grain iterator whose state
(every source's position, the step, the bad-data counts) goes into the Orbax
checkpoint with `grain.checkpoint.CheckpointSave(pipeline)`.

Batches are process-local numpy arrays; the trainer assembles global arrays,
e.g. `jax.make_array_from_process_local_data(sharding, batch["video"])`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from . import sources
from .bad_data import BadDataLog, SkipBadIterDataset
from .config import SourceConfig, parse_sources
from .mixing import Schedule
from .transforms import EvalSample, SampleSpec, TrainSample

_PAD_RECORD = {"media": "pad", "data": None, "name": "", "caption": ""}


def build_source_from_config(source: SourceConfig):
    """The Grain random-access source for one config entry."""
    if source.kind == "tfds":
        video_key = source.video_key or (None if source.image_key else "video")
        return sources.TfdsSource(
            source.tfds_name, split=source.split, data_dir=source.data_dir,
            video_key=video_key, image_key=source.image_key,
            caption_key=source.caption_key, name_key=source.name_key)
    make = sources.video_folder if source.kind == "video_folder" else sources.image_folder
    kwargs = {} if source.extensions is None else {"extensions": source.extensions}
    return make(source.path, metadata=source.metadata, file_key=source.file_key,
                caption_key=source.caption_key or "caption", **kwargs)


def _check_scale(per_process_batch_scale: int) -> None:
    if not (isinstance(per_process_batch_scale, int) and per_process_batch_scale >= 1):
        raise ValueError(f"per_process_batch_scale must be an int >= 1 (the local device "
                         f"count), got {per_process_batch_scale!r}")


def _process(process_index, process_count) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"need 0 <= process_index < process_count, got {index}, {count}")
    return index, count


def _source_seed(seed: int, source_index: int, process_index: int) -> int:
    """Independent streams per source and process from one config seed."""
    state = np.random.SeedSequence([seed, source_index, process_index]).generate_state(1)
    return int(state[0])


def _prefetch(iter_ds: grain.IterDataset, *, num_workers: int,
              buffer_size: int) -> grain.IterDataset:
    if num_workers == 0:
        return iter_ds
    # Grain's workers read its absl flags; programs without absl never parse them.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return iter_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=buffer_size))


def _host_batch(batch: dict[str, Any], name: str, bad: BadDataLog) -> dict[str, Any]:
    """Sums the tallies into `bad`; copies arrays out of workers' shared memory."""
    batch = dict(batch)
    bad.add(name, batch.pop("bad"), batch.pop("bad_names"))
    return {k: v if type(v) is np.ndarray else np.array(v) for k, v in batch.items()}


class TrainPipeline(grain.DatasetIterator):
    """Yields (source name, batch) forever; `schedule(step)` names each step's source.

    batch: "video" float32 (B, T, H, W, 3) in [-1, 1] with B = per-device batch x
    `per_process_batch_scale`, "name" and "caption" (B,) str. `batch_shapes` gives
    each source's video shape before any data is read.
    """

    def __init__(self, datasets: Mapping[str, grain.IterDataset], schedule: Schedule,
                 batch_shapes: Mapping[str, tuple[int, ...]]):
        super().__init__()
        if set(datasets) != set(schedule.names):
            raise ValueError(f"datasets {sorted(datasets)} != scheduled {schedule.names}")
        self.schedule = schedule
        self.batch_shapes = dict(batch_shapes)
        self.step = 0
        self._iterators = {name: iter(ds) for name, ds in datasets.items()}
        self._bad = BadDataLog(datasets)

    def __next__(self) -> tuple[str, dict[str, Any]]:
        name = self.schedule(self.step)
        batch = next(self._iterators[name])
        self.step += 1
        return name, _host_batch(batch, name, self._bad)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable: the next step, each source's Grain state, bad-data counts."""
        return {"step": self.step,
                "sources": {n: it.get_state() for n, it in self._iterators.items()},
                "bad_data": self._bad.counts()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if set(state["sources"]) != set(self._iterators):
            raise ValueError(f"saved data state has sources {sorted(state['sources'])}, "
                             f"this pipeline has {sorted(self._iterators)}")
        for name, it in self._iterators.items():
            it.set_state(state["sources"][name])
        self.step = int(state["step"])
        self._bad.set_counts(state["bad_data"])

    def skip_counts(self) -> dict[str, dict[str, int]]:
        """{source: {reason: count}} of bad data met so far, repairs included."""
        return self._bad.counts()

    def metrics(self) -> dict[str, int]:
        """Non-zero counts as {"data/<source>/<reason>": n}."""
        return self._bad.metrics()

    def start_prefetch(self) -> None:
        for it in self._iterators.values():
            it.start_prefetch()

    def close(self) -> None:
        # getattr: also called by __del__ of a pipeline whose __init__ raised.
        for it in getattr(self, "_iterators", {}).values():
            it.close()
        super().close()


def make_train_pipeline(data_config, *, process_index: int | None = None,
                        process_count: int | None = None, per_process_batch_scale: int = 1,
                        seed: int | None = None) -> TrainPipeline:
    """The mixed, endless train stream of this process.

    process_index / process_count default to JAX's; per_process_batch_scale
    multiplies each source's per-device batch_size (pass the local device count);
    seed defaults to data_config.seed.
    """
    process_index, process_count = _process(process_index, process_count)
    _check_scale(per_process_batch_scale)
    seed = data_config.seed if seed is None else seed
    entries = parse_sources(data_config.sources)
    datasets, shapes = {}, {}
    for i, entry in enumerate(entries):
        spec = SampleSpec(frames=entry.frames, size=entry.size, stride=entry.stride,
                          train=True, flip=data_config.flip,
                          short_clip=data_config.short_clip)
        batch_size = entry.batch_size * per_process_batch_scale
        ds = grain.MapDataset.source(build_source_from_config(entry))
        shard = ds[process_index::process_count]
        if not len(shard):
            raise ValueError(f"source {entry.name!r}: {len(ds)} record(s) cannot give each "
                             f"of {process_count} processes one")
        shard = shard.seed(_source_seed(seed, i, process_index)).shuffle().repeat()
        iter_ds = shard.random_map(TrainSample(spec)).to_iter_dataset(grain.ReadOptions(
            num_threads=data_config.read_threads,
            prefetch_buffer_size=batch_size * data_config.prefetch))
        # Workers batch (fewer, larger transfers); each worker reads every
        # num_workers-th record, so the stream depends on num_workers.
        batched = SkipBadIterDataset(iter_ds, source_name=entry.name).batch(
            batch_size, drop_remainder=True)
        datasets[entry.name] = _prefetch(batched, num_workers=data_config.num_workers,
                                         buffer_size=data_config.prefetch)
        shapes[entry.name] = (batch_size, entry.frames, *entry.size, 3)
    schedule = Schedule({e.name: e.weight for e in entries})
    return TrainPipeline(datasets, schedule, shapes)


class _EvalShard:
    """This process's records, padded so every process yields the same batches."""

    def __init__(self, source, process_index: int, process_count: int, batch_size: int):
        self._source = source
        per_process = math.ceil(len(source) / process_count)
        length = math.ceil(per_process / batch_size) * batch_size
        self._indices = range(process_index, process_index + length * process_count,
                              process_count)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self._indices[i]
        return self._source[index] if index < len(self._source) else _PAD_RECORD


class EvalPipeline:
    """One finite, deterministic pass per iteration: (source name, batch) source by source.

    batch: "video" (B, T, H, W, 3) in [-1, 1], "mask" (B,) bool (False for padding
    and unusable records, whose video is zeros), "name", "caption". Every process
    gets `num_batches[name]` batches of each source.
    """

    def __init__(self, datasets: Mapping[str, grain.IterDataset],
                 num_batches: Mapping[str, int]):
        self._datasets = dict(datasets)
        self.num_batches = dict(num_batches)
        self._bad = BadDataLog(datasets)

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for name, ds in self._datasets.items():
            it = iter(ds)
            try:
                for batch in it:
                    yield name, _host_batch(batch, name, self._bad)
            finally:
                it.close()

    def skip_counts(self) -> dict[str, dict[str, int]]:
        return self._bad.counts()

    def metrics(self) -> dict[str, int]:
        return self._bad.metrics(prefix="eval_data")


def make_eval_pipeline(data_config, *, process_index: int | None = None,
                       process_count: int | None = None,
                       per_process_batch_scale: int = 1) -> EvalPipeline:
    """The eval pass over `data_config.eval_sources`: first frames at a fixed stride,
    centre crop, no flip, no shuffle."""
    process_index, process_count = _process(process_index, process_count)
    _check_scale(per_process_batch_scale)
    datasets, num_batches = {}, {}
    for entry in parse_sources(data_config.eval_sources):
        if entry.stride[0] != entry.stride[1]:
            raise ValueError(f"eval source {entry.name!r}: stride must be one number, "
                             f"got {entry.stride}")
        spec = SampleSpec(frames=entry.frames, size=entry.size, stride=entry.stride,
                          train=False, short_clip=data_config.short_clip)
        batch_size = entry.batch_size * per_process_batch_scale
        shard = _EvalShard(build_source_from_config(entry), process_index, process_count,
                           batch_size)
        iter_ds = grain.MapDataset.source(shard).map(EvalSample(spec)).to_iter_dataset(
            grain.ReadOptions(num_threads=data_config.read_threads,
                              prefetch_buffer_size=batch_size * data_config.prefetch))
        # Batched after the workers, whose outputs interleave back into record order:
        # batched inside them, each worker's share would end in a partial batch.
        datasets[entry.name] = _prefetch(
            iter_ds, num_workers=data_config.num_workers,
            buffer_size=batch_size * data_config.prefetch).batch(batch_size)
        num_batches[entry.name] = len(shard) // batch_size
    return EvalPipeline(datasets, num_batches)
