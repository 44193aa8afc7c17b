"""Reconstruction and compatibility metrics of a CV-VAE on a folder of videos and images.

`evaluate(config)` (config: configs/eval.py; docs/eval.md) runs, on every clip of the
folder (videos: `frames` frames at `stride` from the first, images as T = 1, both
centre-cropped to `size`):
- "cvvae": the CV-VAE's reconstruction (posterior mode, chunked and tiled as its
  config.json says) against the input, per frame;
- "compat": the compatibility score, the frozen image VAE's decoder applied to the
  CV-VAE latents against the frames those latents stand for (`losses.map_frames`);
- "image_vae": the baseline, the image VAE applied frame by frame.
Each row gets PSNR and SSIM (on [0, 1]) and LPIPS when a VGG16 backbone is given.
The per-clip and aggregate numbers go to a JSON file, the markdown table
(eval_report.py) to stdout, and side-by-side examples to PNG/mp4 files.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from . import conv_forms, data, dtypes, losses, metrics
from .data import bad_data
from .data.decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from .eval_report import markdown_table, write_example
from .image_vae import ImageVAE
from .lpips import LPIPS, load_lpips, lpips_distance
from .model_config import frame_count_problem
from .pretrained import resolve_dir
from .vae import CVVAE
from .weights import CONFIG_NAME

logger = logging.getLogger(__name__)

VIDEOS, IMAGES = "videos", "images"
ROWS = ("cvvae", "compat", "image_vae")
# Reasons a file gives no sample. Not among them: repairs (padding, grayscale, alpha),
# and short clips dropped because config.short_clip asks for it.
UNUSABLE = (bad_data.EMPTY_FILE, bad_data.UNREADABLE, bad_data.DECODE_ERROR)
METRICS = ("psnr", "ssim", "lpips")
DECIMALS = 6
# LPIPS: VGG16 pools four times before its last tap.
MIN_SIZE = 16
# What configs/eval.py:tiny reads: the models README command 1 trains.
TINY_RUNS = {"checkpoint": "runs/cvvae_tiny", "image_vae.path": "runs/image_vae_tiny/export"}


class EvalError(ValueError):
    """A config value or input that cannot work, named by its config key."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fail before loading anything, naming the key to set."""
    for key, hint in (("checkpoint", "a CV-VAE model directory or a training workdir"),
                      ("data", "a folder of videos and/or images"),
                      ("image_vae.path", "the SD image VAE directory (diffusers layout)")):
        value = config.image_vae.path if key == "image_vae.path" else config[key]
        if not value:
            raise EvalError(f"set config.{key} to {hint}")
        if not Path(value).exists():
            hint = (f"; README command 1 trains it (or point config.{key} at a model)"
                    if value == TINY_RUNS.get(key) else "")
            raise EvalError(f"config.{key}={value!r} does not exist{hint}")
    if not Path(config.data).is_dir():
        raise EvalError(f"config.data={config.data!r} is a file; give the folder that holds it")
    if config.lpips_vgg_path and not Path(config.lpips_vgg_path).is_file():
        raise EvalError(f"config.lpips_vgg_path={config.lpips_vgg_path!r} is not a file")
    # Both official variants compress time 4x.
    problem = frame_count_problem(config.frames, 4)
    if problem:
        raise EvalError(f"config.frames={config.frames}: {problem}")
    if config.mapping not in losses.MAPPINGS:
        raise EvalError(f"config.mapping={config.mapping!r}; expected one of {losses.MAPPINGS}")
    if config.size % 8 or config.size < MIN_SIZE:
        raise EvalError(f"config.size={config.size}: crops must be a multiple of 8 and at "
                        f"least {MIN_SIZE} px")
    try:
        dtypes.canonical(config.dtype, what="config.dtype")
    except ValueError as e:
        raise EvalError(str(e)) from None


def model_dir(path: str, subfolder: str, ema: bool) -> Path:
    """A model directory (official or Orbax layout), or a training workdir's export."""
    d = Path(path) / subfolder if subfolder else Path(path)
    export = d / ("export_ema" if ema else "export")
    if (d / CONFIG_NAME).is_file():
        return d
    if (export / CONFIG_NAME).is_file():
        return export
    if (d / "checkpoints").is_dir():
        raise EvalError(f"{d} is a training workdir without {export.name}/ (written when "
                        "training ends); finish or resume the run, or export its latest "
                        f"checkpoint: python -m cvvae_jax.convert to-pytorch {d} DST")
    # Raises, naming what is missing.
    return resolve_dir(path, subfolder or None, [c.CLASS_NAME for c in CVVAE.CONFIG_CLASSES])


def eval_sources(config) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The data package's eval sources for the folder (videos and/or images found in it),
    and each one's file count."""
    root = Path(config.data)
    suffixes = collections.Counter(p.suffix.lower() for p in root.rglob("*") if p.is_file())
    common = {"path": str(root), "size": (config.size, config.size),
              "batch_size": config.batch_size}
    sources, files = [], {}
    for name, extensions, source in (
            (VIDEOS, VIDEO_EXTENSIONS, {"kind": "video_folder", "frames": config.frames,
                                        "stride": config.stride}),
            (IMAGES, IMAGE_EXTENSIONS, {"kind": "image_folder", "frames": 1})):
        files[name] = sum(suffixes[e] for e in extensions)
        if files[name]:
            sources.append({"name": name, **source, **common})
    if not sources:
        raise EvalError(f"config.data={str(root)!r} holds no videos ({', '.join(VIDEO_EXTENSIONS)})"
                        f" or images ({', '.join(IMAGE_EXTENSIONS)})")
    return sources, files


def pipeline_for(config, source: dict[str, Any]) -> data.EvalPipeline:
    c = data.default_config()
    c.eval_sources = [source]
    c.read_threads, c.num_workers, c.short_clip = config.read_threads, 0, config.short_clip
    return data.make_eval_pipeline(c, process_index=0, process_count=1)


class Models:
    """The CV-VAE, the frozen image VAE and the optional LPIPS, with the jitted scorer."""

    def __init__(self, config):
        dtype = dtypes.resolve(config.dtype, what="config.dtype")
        self.vae_dir = model_dir(config.checkpoint, config.subfolder, config.ema)
        self.vae = CVVAE.from_pretrained(self.vae_dir, dtype=dtype)
        self.image_vae = ImageVAE.from_pretrained(config.image_vae.path,
                                                  config.image_vae.subfolder or None, dtype=dtype)
        if self.vae.latent_channels != self.image_vae.latent_channels:
            raise EvalError(
                f"the CV-VAE has {self.vae.latent_channels} latent channels, the image VAE at "
                f"config.image_vae.path has {self.image_vae.latent_channels}: pair v1 with "
                "the SD 2.1 VAE and the SD3 variant with the SD3 VAE")
        self.lpips = load_lpips(config.lpips_vgg_path) if config.lpips_vgg_path else None
        if self.lpips is None:
            logger.warning("no VGG16 weights for LPIPS (config.lpips_vgg_path): LPIPS is "
                           "reported as null")
        self.scorer = Scorer(self.lpips, mapping=config.mapping,
                             time_factor=self.vae.config.time_factor)


class Scorer:
    """Every row's per-frame PSNR, SSIM and LPIPS for one batch, as one jitted program per
    batch shape (a program per metric and row would multiply the compiles).

    LPIPS enters as an argument: closed over, its weights would be baked into the program.
    """

    def __init__(self, lpips: LPIPS | None, *, mapping: str, time_factor: int):
        graphdef, self._state = (None, None) if lpips is None else nnx.split(lpips)

        def score(state, a, b):
            out = {"psnr": metrics.psnr(a, b), "ssim": metrics.ssim(a, b)}
            if graphdef is not None:
                out["lpips"] = lpips_distance(graphdef, state, a.astype(jnp.float32),
                                              b.astype(jnp.float32))
            return out

        def target_of(clip, key):
            return losses.map_frames(clip[None], mapping, key, factor=time_factor)[0]

        def scores(state, x, recon, view, baseline, key, first):
            # One key per clip, by its index: a clip's "random" picks do not depend on
            # which batch it lands in.
            keys = jax.vmap(jax.random.fold_in, (None, 0))(key, first + jnp.arange(len(x)))
            target = jax.vmap(target_of)(x, keys)
            if mapping == "first":
                # As the regulariser (objective.py): only latent frame 0 is compared.
                view = view[:, :1]
            out = {"cvvae": score(state, x, recon), "compat": score(state, target, view)}
            if baseline is not None:
                out["image_vae"] = score(state, x, baseline)
            return out

        self._scores = jax.jit(scores, compiler_options=conv_forms.compiler_options())

    def __call__(self, x, recon, view, baseline, key,
                 first: int = 0) -> dict[str, dict[str, np.ndarray]]:
        """x, recon, baseline (B, T, H, W, 3) (baseline may be None), view (B, 1 + k, H, W, 3)
        -> {row: {metric: (B, T') frame scores}}. Clip i maps its frames with
        fold_in(key, first + i)."""
        return jax.device_get(self._scores(self._state, x, recon, view, baseline, key, first))


def run_batch(models: Models, x: np.ndarray, *, key: jax.Array, first: int,
              baseline: bool) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Per-frame scores of every row for x (B, T, H, W, 3), whose clips are the source's
    `first`, `first` + 1, ..., and the outputs for examples."""
    vae, image_vae = models.vae, models.image_vae
    z = vae.encode(x).mode()
    out = {"input": x, "cvvae": vae.decode(z)}
    # The image VAE decodes every latent frame as an image: the CV-VAE's latents and,
    # for the baseline, its own latents of every input frame, in one call (one compile).
    latents = [losses.frames(z)]
    if baseline:
        latents.append(image_vae.encode(losses.frames(x)).mode())
    decoded = image_vae.decode(jnp.concatenate(latents))
    n = latents[0].shape[0]
    out["compat"] = decoded[:n].reshape(z.shape[:2] + x.shape[2:])
    if baseline:
        out["image_vae"] = decoded[n:].reshape(x.shape)
    scores = models.scorer(x, out["cvvae"], out["compat"], out.get("image_vae"), key, first)
    return scores, {k: np.asarray(v, np.float32) for k, v in out.items()}


def _stats(per_frame: dict[str, np.ndarray], *, frames: bool) -> dict[str, Any]:
    """Each metric's mean (and with `frames` its frame values); None where not computed."""
    out = {m: round(float(np.mean(per_frame[m])), DECIMALS) if m in per_frame else None
           for m in METRICS}
    if frames:
        out["frames"] = {m: [round(float(v), DECIMALS) for v in per_frame[m]]
                         if m in per_frame else None for m in METRICS}
    return out


def _check_usable(batch, pipeline, before: dict[str, int], source: str, root: Path,
                  skip_bad: bool) -> dict[str, int]:
    """Raises if a file of this batch gave no sample (unless skip_bad); returns the
    source's bad-data counts, which now include this batch."""
    after = pipeline.skip_counts()[source]
    errors = [r for r in UNUSABLE if after[r] > before[r]]
    if errors and not skip_bad:
        # Padding records have no name; per-record reasons are summed per batch.
        names = [str(root / n) for n, ok in zip(batch["name"], batch["mask"]) if n and not ok]
        raise EvalError(f"{' or '.join(names)}: {', '.join(errors)}; fix or remove it, or set "
                        "config.skip_bad=True to leave such files out")
    return after


@contextlib.contextmanager
def _quiet_bad_data(quiet: bool):
    """Without skip_bad the error names an unusable file: the data log's warning would
    repeat it. Repairs and upscaled media are still logged."""
    log = logging.getLogger(bad_data.__name__)

    def usable(record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (len(args) == 3 and args[1] in UNUSABLE)  # BadDataLog's: source, reason, name

    if quiet:
        log.addFilter(usable)
    try:
        yield
    finally:
        log.removeFilter(usable)


def _source_pass(config, models: Models, source: dict, pipeline: data.EvalPipeline, bar,
                 files: int, examples_dir: Path) -> dict[str, Any]:
    """All clips of one source: per-clip results, the source's aggregate, bad-data counts.
    The bar ticks once per file read (`files` of them), scored or skipped."""
    name, root = source["name"], Path(config.data)
    limit = config.max_clips or sys.maxsize
    clips, frames = [], {row: {} for row in ROWS}  # frames[row][metric]: per-clip arrays
    key = jax.random.key(config.seed)
    counts = pipeline.skip_counts()[name]
    skipped, planned = 0, min(files, limit)
    for _, batch in pipeline:
        counts = _check_usable(batch, pipeline, counts, name, root, config.skip_bad)
        usable = np.flatnonzero(batch["mask"])
        keep = usable[:limit - len(clips)]
        # Files read but not scored (padding records have no name); past max_clips, none.
        unused = np.array([bool(n) for n in batch["name"]]) & ~batch["mask"]
        if len(keep) < len(usable):
            unused[keep[-1] + 1:] = False
        n_unused = int(unused.sum())
        skipped += n_unused
        # Under max_clips, each skipped file means one more is read to reach it.
        bar.total += min(files, limit + skipped) - planned
        planned = min(files, limit + skipped)
        bar.update(n_unused)
        if not len(keep):
            continue
        scores, outputs = run_batch(models, batch["video"][keep], baseline=config.baseline,
                                    key=key, first=len(clips))
        for i, j in enumerate(keep):
            clip = {"name": str(batch["name"][j]), "source": name}
            for row in (r for r in ROWS if r in scores):
                clip[row] = _stats({m: a[i] for m, a in scores[row].items()}, frames=True)
                for m, a in scores[row].items():
                    frames[row].setdefault(m, []).append(a[i])
            if len(clips) < config.examples:
                write_example(examples_dir, name, len(clips), clip["name"],
                              {k: v[i] for k, v in outputs.items()},
                              time_factor=models.vae.config.time_factor)
            clips.append(clip)
            bar.update(1)
        if len(clips) >= limit:
            break
    aggregate = {"clips": len(clips), "frames_per_clip": source["frames"]}
    for row, per_metric in frames.items():
        if per_metric:  # every frame of every clip weighs the same
            aggregate[row] = _stats({m: np.concatenate(a) for m, a in per_metric.items()},
                                    frames=False)
    return {"clips": clips, "aggregate": aggregate, "data": counts}


def _no_clip_error(config, counts: dict[str, dict[str, int]]) -> EvalError:
    """Every file was skipped: say why, per data kind."""
    why = "; ".join(f"{name}: " + ", ".join(f"{n} {reason}" for reason, n in c.items() if n)
                    for name, c in counts.items())
    return EvalError(f"config.data={config.data!r} gave no usable clip ({why})")


def evaluate(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Run the evaluation; write the JSON and the examples; return the results."""
    check_config(config)
    sources, files = eval_sources(config)
    default = "_".join(filter(None, ("runs/eval", Path(config.checkpoint).resolve().name,
                                     config.subfolder)))
    out_dir = Path(config.out_dir or default)
    start = time.perf_counter()
    # Examples go to out_dir only once the run succeeds: a failed one leaves no half folder.
    with _quiet_bad_data(not config.skip_bad), tempfile.TemporaryDirectory() as tmp:
        # Built first: a folder with no readable file fails before any model loads.
        pipelines = {s["name"]: pipeline_for(config, s) for s in sources}
        models = Models(config)
        limit = config.max_clips or sys.maxsize
        # Redirected to a file, a bar redrawn 10 times a second is mostly noise.
        with tqdm(total=sum(min(files[n], limit) for n in pipelines), desc="eval", unit="file",
                  dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0) as bar:
            passes = {s["name"]: _source_pass(config, models, s, pipelines[s["name"]], bar,
                                              files[s["name"]], Path(tmp) / "examples")
                      for s in sources}
        if not any(p["clips"] for p in passes.values()):
            raise _no_clip_error(config, {name: p["data"] for name, p in passes.items()})
        out_dir.mkdir(parents=True, exist_ok=True)
        if (Path(tmp) / "examples").is_dir():
            shutil.rmtree(out_dir / "examples", ignore_errors=True)  # an earlier run's
            shutil.move(Path(tmp) / "examples", out_dir / "examples")
    results = {
        "checkpoint": str(models.vae_dir),
        "image_vae": str(Path(config.image_vae.path) / (config.image_vae.subfolder or "")),
        "protocol": {"size": config.size, "frames": config.frames, "stride": config.stride,
                     "mapping": config.mapping, "seed": config.seed,
                     "short_clip": config.short_clip, "dtype": config.dtype,
                     "batch_size": config.batch_size, "max_clips": config.max_clips,
                     "baseline": config.baseline, "lpips": models.lpips is not None,
                     "time_factor": models.vae.config.time_factor},
        "aggregate": {name: p["aggregate"] for name, p in passes.items()},
        "data": {name: p["data"] for name, p in passes.items()},
        "clips": [c for p in passes.values() for c in p["clips"]],
        "seconds": round(time.perf_counter() - start, 1),
    }
    results["table"] = markdown_table(results)
    (out_dir / "eval.json").write_text(json.dumps(results, indent=1) + "\n")
    results["out_dir"] = str(out_dir)
    return results


def main(config: ml_collections.ConfigDict) -> int:
    """eval.py's body: evaluate, then print the table and where the files went."""
    results = evaluate(config)
    print(results["table"])
    examples = f"; examples: {results['out_dir']}/examples/" if config.examples else ""
    print(f"\nper-clip results: {results['out_dir']}/eval.json{examples}")
    return 0
