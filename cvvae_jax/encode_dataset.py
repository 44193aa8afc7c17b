r"""Encode a dataset of videos or images into ArrayRecord shards of CV-VAE latents.

    python -m cvvae_jax.encode_dataset --weights CV-VAE --subfolder vae3d \
        --data /data/videos --frames 17 --size 256 256 --stride 2 --out /data/latents

`--data` is a folder of videos (or of images with `--frames 1`) or `tfds:NAME`.
Each record is cut like the eval pipeline cuts it (the first `frames` frames at
`stride`, centre crop, no flip), encoded in batches, and stored as the scaled
posterior mean `(mean - shift_factor) * scaling_factor`, optionally with the
scaled std. Resuming and multi-process sharding are described in docs/latents.md;
the on-disk format is `latent_shards`, whose `read_record` decodes one stored record.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from . import cli, dtypes, latent_shards, sharding
from .data import SampleSpec, SourceConfig, build_source_from_config, parse_source
from .data.bad_data import SKIPS
from .data.transforms import EvalSample
from .model_config import frame_count_problem
from .pretrained import resolve_dir
from .vae import CVVAE

# Skipped files named on the command line; all of them are in the shards' .json files.
_SHOW_SKIPPED = 5


def _source_description(source_config: SourceConfig, source) -> dict[str, Any]:
    """What identifies the records: a resumed run must read the same ones in the same order."""
    keep = (("tfds_name", "data_dir", "split", "video_key", "image_key", "caption_key", "name_key")
            if source_config.kind == "tfds"
            else ("path", "extensions", "metadata", "file_key", "caption_key"))
    desc = {k: getattr(source_config, k) for k in ("kind", *keep)}
    desc = {k: v for k, v in desc.items() if v is not None}
    desc["num_records"] = len(source)
    files = getattr(source, "files", None)  # folders: the sorted relative paths
    if files is not None:
        desc["path"] = str(source.root)
        desc["files_sha256"] = hashlib.sha256("\n".join(files).encode()).hexdigest()
    if desc.get("metadata"):  # the captions: one file however it is spelled, and its content
        captions = Path(desc["metadata"]).resolve()
        desc["metadata"] = str(captions)
        desc["metadata_sha256"] = hashlib.sha256(captions.read_bytes()).hexdigest()
    return json.loads(json.dumps(desc))  # tuples -> lists, as they read back


def _scaling(vae, scaling_factor: float | None) -> float:
    if scaling_factor is not None:
        return float(scaling_factor)
    factor = getattr(vae.config, "scaling_factor", None)
    if factor is None:
        raise ValueError(f"{vae.config.CLASS_NAME}'s config.json has no scaling_factor: pass "
                         "--scaling-factor (and --shift-factor) of the latent space you target, "
                         "e.g. the SD3 VAE's 1.5305 and 0.0609")
    return float(factor)


def _check_shape(vae, spec: SampleSpec) -> None:
    cfg = vae.config
    problem = frame_count_problem(spec.frames, cfg.time_factor)
    if problem:
        raise ValueError(f"--frames {spec.frames}: {problem}")
    if spec.size[0] % cfg.space_factor or spec.size[1] % cfg.space_factor:
        raise ValueError(f"--size {spec.size[0]} {spec.size[1]}: both must be multiples of "
                         f"{cfg.space_factor}")


def dataset_spec(vae, source_config: SourceConfig, source, *, scaling_factor: float,
                 shift_factor: float, latent_dtype, store_std: bool, layout: latent_shards.Layout,
                 weights: str | None) -> dict[str, Any]:
    """The dataset-level metadata known before encoding; a resumed run must match it."""
    cfg = vae.config
    frames, (h, w) = source_config.frames, source_config.size
    latent_frames = 1 + (frames - 1) // cfg.time_factor
    return {
        "format": latent_shards.FORMAT,
        "model": {"class_name": cfg.CLASS_NAME, "weights": weights, "config": cfg.to_dict(),
                  "compute_dtype": jnp.dtype(vae.dtype).name},
        "latents": "(posterior_mean - shift_factor) * scaling_factor",
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "store_std": store_std,
        "latent_shape": [latent_frames, h // cfg.space_factor, w // cfg.space_factor,
                         cfg.latent_channels],
        "latent_dtype": jnp.dtype(latent_dtype).name,
        "media": source_config.media,
        "video_shape": [frames, h, w, 3],
        "frames": frames,
        "stride": source_config.stride[0],
        "crop": "centre",
        "source": _source_description(source_config, source),
        "num_records": layout.num_records,
        "shard_size": layout.shard_size,
        "num_shards": layout.num_shards,
        "shards": [f"{layout.name(k)}.array_record" for k in range(layout.num_shards)],
    }


def _placement(vae, local_devices: list) -> Any:
    """Puts batches on this process's devices (split over the batch), parameters replicated."""
    if len(local_devices) == 1:
        return lambda x: x
    mesh = sharding.make_mesh({"data": -1}, devices=local_devices)
    nnx.update(vae, jax.device_put(nnx.state(vae), NamedSharding(mesh, PartitionSpec())))
    batch = sharding.batch_sharding(mesh, 5)
    return lambda x: jax.device_put(x, batch)


class _Records:
    """The source records of some shards, in shard order, each with its global index."""

    def __init__(self, source, indices: list[int]):
        self._source, self._indices = source, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self._source[self._indices[i]], "index": self._indices[i]}


class _Sample(grain.transforms.Map):
    """The eval pipeline's sample, with the record's index kept."""

    def __init__(self, spec: SampleSpec):
        self._eval = EvalSample(spec)

    def map(self, record):
        return {**self._eval.map(record), "index": record["index"]}


def _skip_reason(sample: dict[str, Any]) -> str:
    # The reason that dropped a sample is tallied last, after any repairs.
    return str(sample["bad_names"]).splitlines()[-1].split("\t", 1)[0]


def encode_dataset(vae: CVVAE, source_config: SourceConfig, out: str | Path, *,
                   shard_size: int = 1024, scaling_factor: float | None = None,
                   shift_factor: float = 0.0, latent_dtype=np.float32, store_std: bool = False,
                   process_index: int | None = None, process_count: int | None = None,
                   read_threads: int = 4, weights: str | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Encodes this process's shards of `source_config` into `out`; resumes a partial `out`.

    `source_config.batch_size` is per local device; with several local devices each batch
    is split over them (and `vae`'s parameters are replicated onto them in place).
    Returns this process's counts, and `metadata` (the dataset-level JSON) when every
    shard is complete.
    """
    out = Path(out)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process index < process count, got {process_index}, "
                         f"{process_count}")
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    if source_config.stride[0] != source_config.stride[1]:
        raise ValueError(f"the frame stride must be one number, got {source_config.stride}")
    spec = SampleSpec(frames=source_config.frames, size=source_config.size,
                      stride=source_config.stride, train=False, short_clip="skip")
    _check_shape(vae, spec)
    scale, shift = _scaling(vae, scaling_factor), float(shift_factor)
    source = build_source_from_config(source_config)
    layout = latent_shards.Layout(len(source), shard_size)
    latent_shards.prepare_out(out, dataset_spec(
        vae, source_config, source, scaling_factor=scale, shift_factor=shift,
        latent_dtype=latent_dtype, store_std=store_std, layout=layout, weights=weights))

    owned = layout.owned(process_index, process_count)
    todo = [k for k in owned if not latent_shards.complete(out, layout, k)]
    indices = [i for k in todo for i in layout.records(k)]
    local_devices = jax.local_devices()
    batch_size = source_config.batch_size * len(local_devices)
    place = _placement(vae, local_devices) if todo else None
    frame_indices = (np.arange(spec.frames) * spec.stride[0]).astype(np.int32)

    def encode(batch: list[dict[str, Any]], writer: latent_shards.ShardWriter) -> None:
        x = np.zeros((batch_size, spec.frames, *spec.size, 3), np.float32)
        x[:len(batch)] = np.stack([s["video"] for s in batch])  # padded: one compile
        post = vae.encode(place(x))
        mean = ((np.asarray(post.mean) - shift) * scale).astype(latent_dtype)
        std = (np.asarray(post.std) * scale).astype(latent_dtype) if store_std else None
        for j, s in enumerate(batch):
            record = {"index": int(s["index"]), "name": str(s["name"]),
                      "caption": str(s["caption"]), "frame_indices": frame_indices,
                      "latent": mean[j]}
            if std is not None:
                record["latent_std"] = std[j]
            writer.write(record)

    encoded = skipped = 0
    skipped_files: list[dict[str, Any]] = []
    if indices:
        ds = grain.MapDataset.source(_Records(source, indices)).map(_Sample(spec))
        it = iter(ds.to_iter_dataset(grain.ReadOptions(
            num_threads=read_threads, prefetch_buffer_size=2 * batch_size)))
        bar = tqdm(total=len(indices), desc=f"encode {process_index}/{process_count}",
                   unit="clip" if spec.frames > 1 else "image", disable=not progress,
                   dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)
        try:
            for k in todo:
                writer, batch = latent_shards.ShardWriter(out, layout.name(k)), []
                try:
                    for _ in layout.records(k):
                        s = next(it)
                        writer.bad += s["bad"]
                        if s["mask"]:
                            batch.append(s)
                        else:
                            writer.skipped.append({"index": int(s["index"]), "name": str(s["name"]),
                                                   "reason": _skip_reason(s)})
                        if len(batch) == batch_size:
                            encode(batch, writer)
                            batch = []
                        bar.update(1)
                    if batch:
                        encode(batch, writer)
                    summary = writer.commit(layout.records(k))
                finally:
                    writer.close()
                encoded += summary["encoded"]
                skipped += len(summary["skipped"])
                skipped_files += summary["skipped"]
        finally:
            bar.close()
            it.close()
    result = {"process_index": process_index, "process_count": process_count,
              "shards": len(owned), "shards_written": len(todo), "encoded": encoded,
              "skipped": skipped, "skipped_files": skipped_files}
    metadata = latent_shards.finalize(out, layout)
    if metadata is not None:
        result["metadata"] = metadata
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cvvae_jax.encode_dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, required=True, help="CV-VAE model directory")
    p.add_argument("--subfolder", help="model folder inside --weights, e.g. vae3d")
    p.add_argument("--data", required=True,
                   help="a folder of videos (or images, with --frames 1), or tfds:NAME")
    p.add_argument("--out", type=Path, required=True, help="output folder (resumed if partial)")
    p.add_argument("--frames", type=int, default=17, help="frames per clip, 1 + 4k; 1 for images")
    p.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"),
                   help="centre crop after scaling the short side (default 256 256)")
    p.add_argument("--stride", type=int, default=1, help="frame stride (default 1)")
    p.add_argument("--batch-size", type=int, default=4, help="clips per local device per call")
    p.add_argument("--shard-size", type=int, default=1024, help="records per shard")
    p.add_argument("--dtype", type=dtypes.arg(), default="float32",
                   help="encoder compute dtype")
    p.add_argument("--latent-dtype", type=dtypes.arg(dtypes.STORAGE), default="float32",
                   help="dtype of the stored latents")
    p.add_argument("--store-std", action="store_true", help="also store the scaled posterior std")
    p.add_argument("--scaling-factor", type=float,
                   help="default: config.json's scaling_factor (CV-VAE-SD3 has none: required)")
    p.add_argument("--shift-factor", type=float, default=0.0)
    p.add_argument("--metadata", help="folders: captions file (CSV, JSON or JSONL)")
    p.add_argument("--file-key", default="file", help="folders: the captions' file column")
    p.add_argument("--caption-key", help="the caption column (folders) or field (tfds)")
    p.add_argument("--split", default="train", help="tfds: split")
    p.add_argument("--data-dir", help="tfds: data_dir")
    p.add_argument("--video-key", help="tfds: the video field (default video)")
    p.add_argument("--image-key", help="tfds: the image field, for image datasets")
    p.add_argument("--name-key", help="tfds: a field naming the record")
    p.add_argument("--read-threads", type=int, default=4, help="decoding threads")
    p.add_argument("--process-index", type=int, help="default: jax.process_index()")
    p.add_argument("--process-count", type=int, help="default: jax.process_count()")
    return p.parse_args(argv)


def source_config_from_args(args: argparse.Namespace) -> SourceConfig:
    entry = {"name": "data", "frames": args.frames, "size": tuple(args.size),
             "stride": args.stride, "batch_size": args.batch_size}
    if args.data.startswith("tfds:"):
        entry.update(kind="tfds", tfds_name=args.data[len("tfds:"):], split=args.split,
                     data_dir=args.data_dir, video_key=args.video_key, image_key=args.image_key,
                     caption_key=args.caption_key, name_key=args.name_key)
    else:
        if not Path(args.data).is_dir():
            raise FileNotFoundError(f"--data {args.data}: no such folder")
        entry.update(kind="image_folder" if args.frames == 1 else "video_folder",
                     path=args.data, metadata=args.metadata, file_key=args.file_key,
                     caption_key=args.caption_key)
    return parse_source({k: v for k, v in entry.items() if v is not None})


def _check_args(args: argparse.Namespace) -> None:
    """Values a run cannot use, named by their flag, before anything is loaded."""
    for flag, value in (("--stride", args.stride), ("--batch-size", args.batch_size),
                        ("--shard-size", args.shard_size), ("--read-threads", args.read_threads)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be >= 1")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; give the folder to write the shards into")
    if (args.process_index is None) != (args.process_count is None):
        raise ValueError("pass both --process-index and --process-count, or neither")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> None:
        start = time.perf_counter()
        _check_args(args)
        if args.process_index is None:
            sharding.initialize_distributed()
        source_config = source_config_from_args(args)
        weights = resolve_dir(args.weights, args.subfolder, [c.CLASS_NAME for c in CVVAE.CONFIG_CLASSES])
        vae = CVVAE.from_pretrained(weights, dtype=dtypes.resolve(args.dtype))
        result = encode_dataset(
            vae, source_config, args.out, shard_size=args.shard_size,
            scaling_factor=args.scaling_factor, shift_factor=args.shift_factor,
            latent_dtype=dtypes.resolve(args.latent_dtype, dtypes.STORAGE), store_std=args.store_std,
            process_index=args.process_index, process_count=args.process_count,
            read_threads=args.read_threads, weights=str(weights.resolve()))
        r = result
        print(f"process {r['process_index']} of {r['process_count']}: {r['shards']} shard(s), "
              f"{r['shards_written']} written now ({r['encoded']} encoded, {r['skipped']} "
              f"skipped) in {time.perf_counter() - start:.1f} s")
        if r["skipped_files"]:
            shown = [f"{s['name']} ({s['reason']})" for s in r["skipped_files"][:_SHOW_SKIPPED]]
            more = len(r["skipped_files"]) - len(shown)
            print("skipped: " + ", ".join(shown) + (f" and {more} more" if more else "")
                  + " (every one in its shard's .json)")
        metadata = result.get("metadata")
        if metadata is None:
            print(f"{args.out}: other processes' shards are still missing; "
                  f"{latent_shards.METADATA_NAME} gets its totals when the last one finishes")
        else:
            c = metadata["counts"]
            skips = ", ".join(f"{k} {v}" for k, v in c["bad_data"].items() if k in SKIPS)
            used = ", ".join(f"{k} {v}" for k, v in c["bad_data"].items() if k not in SKIPS)
            print(f"{args.out}: complete, {c['encoded']} records of latents "
                  f"{tuple(metadata['latent_shape'])} {metadata['latent_dtype']} in "
                  f"{metadata['num_shards']} shard(s), {c['skipped']} skipped"
                  + (f" ({skips})" if skips else "") + (f"; used after {used}" if used else ""))

    return cli.run(run)


if __name__ == "__main__":
    sys.exit(main())
