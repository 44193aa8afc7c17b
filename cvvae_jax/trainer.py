"""The training loop behind train.py: models, sharded state, resume, logging, exports.

Start-up, in order:
1. the mesh from `config.mesh` (jax.distributed is initialised first when the launch
   is multi-host);
2. the initial autoencoder, by the resume order: the run's own latest good
   checkpoint in `workdir/checkpoints` (a damaged latest step falls back to the one
   before it); else `config.init_from` (an Orbax or official PyTorch model
   directory); else inflation from the image VAE at `config.image_vae.path`
   (`config.inflate`); else scratch;
3. state born sharded (`jax.jit(init, out_shardings=...)`), then the loop: one
   fused generator + discriminator step per batch (train_step.py), one compile
   per batch shape.

Outputs in `workdir`: checkpoints/, metrics.jsonl, tensorboard/, samples/ (grids
and videos), export/ and export_ema/ (official-layout model directories).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from . import conv_forms, data, dtypes, host_memory, losses, media, metrics, remat, sharding
from .discriminator import NLayerDiscriminator3D
from .flops import jaxpr_flops, peak_tflops
from .lpips import load_lpips
from .metrics_log import MetricsLog
from .objective import Objective, per_frame
from .posterior import DiagonalGaussian
from .run_checkpoint import PreemptionGuard, RunCheckpointer
from .train_models import (check_config, check_data_shapes, initial_autoencoder, initial_config,
                           load_image_vae, model_class)
from .train_step import GraphDefs, TrainState, init_state, make_train_step, optimizers, schedules

logger = logging.getLogger(__name__)

class Evaluator:
    """Reconstruction PSNR and, for a CV-VAE with an image VAE, the compatibility PSNR:
    the image VAE's decoder on the CV-VAE latents against the mapped ("slice") frames."""

    def __init__(self, graphdefs: GraphDefs, clips: np.ndarray, time_factor: int):
        self.clips, self.time_factor = clips, time_factor
        gd = graphdefs

        @functools.partial(jax.jit, compiler_options=conv_forms.compiler_options())
        def run(vae_state, frozen, x):
            vae = nnx.merge(gd.vae, vae_state)
            z = DiagonalGaussian.from_moments(vae.encode_moments(x)).mode()
            recon = vae.decode_latents(z).astype(jnp.float32)
            if gd.image_vae is None:
                return recon, None
            image_vae = nnx.merge(gd.image_vae, frozen["image_vae"])
            return recon, per_frame(image_vae.decode_latents, z).astype(jnp.float32)

        self._run = run

    def __call__(self, vae_state, frozen) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        recon, view = self._run(vae_state, frozen, self.clips)
        recon = np.asarray(multihost_utils.process_allgather(recon, tiled=True))
        out = {"eval/psnr": metrics.pooled_psnr(recon, self.clips)}
        media_out = {"input": self.clips, "recon": recon}
        if view is not None:
            view = np.asarray(multihost_utils.process_allgather(view, tiled=True))
            mapped = np.asarray(losses.map_frames(self.clips, "slice", factor=self.time_factor))
            out["eval/compat_psnr"] = metrics.pooled_psnr(view, mapped)
            media_out["image_vae_view"] = view
        return out, media_out


# Sample frames smaller than this are enlarged (whole pixels) in the PNG and mp4.
SAMPLE_MIN_HEIGHT = 128


def write_samples(directory: Path, step: int, clips: dict[str, np.ndarray], fps: float = 8.0):
    """input | 3D recon | image-VAE view of the latents, as a PNG grid and an mp4
    (process 0 writes; every process holds the same gathered arrays)."""
    if jax.process_index() != 0:
        return
    directory.mkdir(parents=True, exist_ok=True)
    x, recon = clips["input"][0], clips["recon"][0]
    rows, labels = [x, recon], ["input", "recon"]
    view = clips.get("image_vae_view")
    if view is not None:
        # Latent frame i stands for input frames 4i-3..4i: repeat it to align in time.
        t, tl = x.shape[0], view.shape[1]
        index = [0] + [1 + (i - 1) * (tl - 1) // max(t - 1, 1) for i in range(1, t)]
        rows.append(view[0][index])
        labels.append("image VAE")
    rows = [media.enlarge(r, SAMPLE_MIN_HEIGHT) for r in rows]
    media.frame_grid_png(directory / f"step_{step:06d}.png", rows, labels=labels,
                         n_frames=min(4, x.shape[0]))
    if x.shape[0] > 1:
        media.write_video(directory / f"step_{step:06d}.mp4", media.side_by_side(*rows), fps=fps)


def _eval_clips(config, time_factor: int) -> np.ndarray:
    """The fixed clip(s) for before/after numbers: the first batch of the first eval source."""
    pipeline = data.make_eval_pipeline(config.data, process_index=0, process_count=1)
    _, batch = next(iter(pipeline))
    clips = batch["video"]
    t = clips.shape[1]
    return clips[:, : 1 + (t - 1) // time_factor * time_factor]


def _say(line: str) -> None:
    """A line on stdout from process 0 that leaves a progress bar on the terminal intact."""
    if jax.process_index() == 0:
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()


def _eval_line(step: int, metrics: dict[str, float]) -> str:
    return f"eval at step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())


# Config keys that shape the train state or the data position saved with it: where a
# run's checkpoints do not restore, a change to one of these is the reason to name.
# Others (total_steps, the intervals, the mesh, learning rates...) may change on resume.
_STATE_KEYS = ("model", "disc", "optim.grad_clip", "init_from", "inflate", "image_vae")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": leaf} of nested dicts (lists are leaves)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else key))
    return flat


def _state_shaping(config: dict[str, Any]) -> dict[str, Any]:
    """The values of `_STATE_KEYS` and the data sources' names in a config dict."""
    values = {k: v for k, v in _flat(config).items()
              if any(k == key or k.startswith(key + ".") for key in _STATE_KEYS)}
    values["data source names"] = [s["name"] for s in config["data"]["sources"]]
    return values


def _state_config_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """'key: <saved value> saved, <value> now' for each state-shaping value that differs
    between a checkpoint's config and the current one."""
    if saved is None:
        return []
    old = _state_shaping(saved)
    new = _state_shaping(json.loads(json.dumps(current)))  # tuples as saved: lists
    unset = "(unset)"
    return [f"{k}: {old.get(k, unset)!r} saved, {new.get(k, unset)!r} now"
            for k in sorted(old.keys() | new.keys()) if old.get(k, unset) != new.get(k, unset)]


def _resume_notes(saved: dict[str, Any], config, start: int) -> None:
    """What a resumed run does differently from the run that saved `start`."""
    saved_total = saved.get("total_steps", config.total_steps)
    if saved_total != config.total_steps:
        print(f"note: config.total_steps is {config.total_steps}, {saved_total} when step "
              f"{start} was saved: the learning-rate schedule follows the new total", flush=True)
    saved_devices = saved.get("device_count")  # absent from checkpoints of older versions
    saved_batch = {s["name"]: s["batch_size"] for s in saved.get("data", {}).get("sources", [])}
    devices = jax.device_count()
    for source in config.data.sources:
        name, now = source["name"], source["batch_size"]
        if saved_devices is None or name not in saved_batch:
            continue
        before = saved_batch[name]
        if before * saved_devices != now * devices:
            print(f"note: source {name!r} takes {now * devices} examples a step ({now} per "
                  f"device x {devices} devices), {before * saved_devices} when step {start} was "
                  f"saved ({before} x {saved_devices}): batch_size is per device", flush=True)


class Trainer:
    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
        check_config(config)
        self.config, self.workdir = config, Path(workdir)
        self.mesh = sharding.make_mesh(dict(config.mesh))
        dtype = dtypes.resolve(config.model.dtype, what="config.model.dtype")
        image_vae = load_image_vae(config, dtype)
        disc = NLayerDiscriminator3D(**dict(config.disc), dtype=dtype, rngs=nnx.Rngs(config.seed))
        lpips = load_lpips(config.loss.lpips_vgg_path or None, dtype=dtype)
        self.objective = Objective(**{k: v for k, v in dict(config.loss).items()
                                      if k not in ("lpips_vgg_path", "logvar_init")})
        vae_config = initial_config(config, image_vae)
        check_data_shapes(config, vae_config)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.vae_abstract = model_class(config.model.kind).abstract(vae_config, dtype=dtype)
        rm = remat.resolve(config.remat)
        if rm.blocks:  # before the graph definitions are split off: they carry the switch
            for model in (self.vae_abstract, image_vae):
                if model is not None:
                    remat.set_block_remat(model)
        vae_def, _ = nnx.split(self.vae_abstract)
        disc_def, disc_state = nnx.split(disc)
        split = lambda m: (None, None) if m is None else nnx.split(m)  # noqa: E731
        (image_def, image_state), (lpips_def, lpips_state) = split(image_vae), split(lpips)
        self.graphdefs = GraphDefs(vae_def, disc_def, image_def, lpips_def)
        frozen = {"image_vae": image_state, "lpips": lpips_state}
        frozen_shardings = sharding.param_sharding(self.mesh, frozen,
                                                   min_size=config.fsdp_min_size)
        self.frozen = jax.device_put(frozen, frozen_shardings)

        o = config.optim
        self.g_schedule, d_schedule = schedules(
            lr=o.lr, lr_g_factor=o.lr_g_factor, warmup_steps=o.warmup_steps,
            total_steps=config.total_steps, min_lr_ratio=o.min_lr_ratio)
        self.g_tx, self.d_tx = optimizers(g_schedule=self.g_schedule, d_schedule=d_schedule,
                                          b1=o.b1, b2=o.b2, eps=o.eps,
                                          weight_decay=o.weight_decay, grad_clip=o.grad_clip or None)
        self._init = lambda v, d: init_state(v, d, g_tx=self.g_tx, d_tx=self.d_tx,
                                             logvar_init=config.loss.logvar_init)
        _, vae_abstract_state = nnx.split(self.vae_abstract)
        abstract = jax.eval_shape(self._init, vae_abstract_state, disc_state)
        self.shardings = sharding.param_sharding(self.mesh, abstract,
                                                min_size=config.fsdp_min_size)
        self.abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
            self.shardings)
        self._disc_state, self._image_vae = disc_state, image_vae

        step_fn = make_train_step(objective=self.objective, graphdefs=self.graphdefs,
                                  g_tx=self.g_tx, d_tx=self.d_tx, g_schedule=self.g_schedule,
                                  ema_decay=config.optim.ema_decay, remat_policy=rm.policy)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self._step = jax.jit(
            step_fn,
            in_shardings=(self.shardings, frozen_shardings,
                          sharding.batch_sharding(self.mesh, 5), replicated),
            out_shardings=(self.shardings, replicated), donate_argnums=(0,),
            compiler_options=conv_forms.compiler_options())
        self._compiled: dict[tuple, Any] = {}
        self.key = jax.random.key(config.seed)

    # -- state ---------------------------------------------------------------------------

    def fresh_state(self) -> tuple[TrainState, str]:
        dtype = dtypes.resolve(self.config.model.dtype, what="config.model.dtype")
        vae, origin = initial_autoencoder(self.config, self._image_vae, dtype)
        _, vae_state = nnx.split(vae)
        state = jax.jit(self._init, out_shardings=self.shardings)(vae_state, self._disc_state)
        return state, origin

    def compiled_step(self, state, x):
        """The step compiled for this batch shape (once), and its FLOPs for the MFU estimate."""
        shape = x.shape
        if shape not in self._compiled:
            _say(f"compiling the train step for batch {shape} (once per shape)")
            t = time.perf_counter()
            traced = self._step.trace(state, self.frozen, x, self.key)
            compiled = traced.lower().compile()
            flops = float(jaxpr_flops(traced.jaxpr))
            # Before the first step allocates its temporaries: on a CPU backend the heap
            # the compiler freed would otherwise stay resident beside them.
            host_memory.release_freed_heap()
            _say(f"compiled it in {time.perf_counter() - t:.1f} s ({flops:.3g} FLOP/step)")
            self._compiled[shape] = (compiled, flops)
        return self._compiled[shape]

    # -- the loop ------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        config = self.config
        pipeline = data.make_train_pipeline(config.data,
                                            per_process_batch_scale=jax.local_device_count())
        # The device count goes with the config: batch sizes are per device.
        ckpt = RunCheckpointer(self.workdir / "checkpoints", save_every=config.checkpoint.every,
                               keep_last=config.checkpoint.keep_last,
                               keep_every=config.checkpoint.keep_every or None,
                               config={**config.to_dict(), "device_count": jax.device_count()},
                               async_save=config.checkpoint.async_save)
        start, state = 0, None
        if steps := ckpt.all_steps():
            saved_processes = ckpt.saved_process_count(steps[-1])
            if saved_processes not in (None, jax.process_count()):
                raise ValueError(
                    f"the checkpoints in {ckpt.directory} were saved by {saved_processes} "
                    f"processes, this run has {jax.process_count()}: each process restores "
                    f"its own data position, so resume with {saved_processes} processes, or "
                    "start afresh in a new workdir")
            restored = ckpt.restore_latest(self.abstract, data_target=pipeline)
            if restored is None:
                saved = next(filter(None, map(ckpt.saved_config, reversed(steps))), None)
                changed = _state_config_changes(saved, config.to_dict())
                if changed:
                    raise ValueError(
                        f"the checkpoints in {ckpt.directory} were saved with another config "
                        f"and do not restore into this one: {'; '.join(changed)}; use a new "
                        "workdir, or set those keys back")
                raise RuntimeError(f"checkpoints {steps} exist in {ckpt.directory} "
                                   "but none restores (see the warnings above); move them away "
                                   "to start afresh")
            start, state, _ = restored
            origin = f"checkpoint step {start}"
            if start < config.total_steps:
                _resume_notes(ckpt.saved_config(start) or {}, config, start)
        else:
            state, origin = self.fresh_state()
        if start >= config.total_steps:
            # Launched again after its end: the export is redone (the first launch may have
            # stopped between its last save and its export), nothing is trained or evaluated.
            ckpt.close()
            pipeline.close()
            self.export(state)
            print(f"nothing to train: the run is at step {start}, config.total_steps is "
                  f"{config.total_steps}; models in {self.workdir}/export and export_ema "
                  "(raise config.total_steps to train on)", flush=True)
            return {"complete_at": float(start)}
        # Made only for a run that trains: a finished one launched again adds no event file.
        log = MetricsLog(self.workdir, tensorboard=config.tensorboard)
        logger.info("autoencoder from %s; %d steps to go", origin, config.total_steps - start)
        print(f"starting at step {start} from {origin}", flush=True)

        vae_cfg = self.vae_abstract.config
        time_factor = getattr(vae_cfg, "time_factor", 1)
        evaluator = Evaluator(self.graphdefs, _eval_clips(config, time_factor), time_factor)
        results: dict[str, float] = {}
        if start == 0:
            before, clips = evaluator(state.gen["vae"], self.frozen)
            _say(_eval_line(0, before))
            results.update({f"{k}_before": v for k, v in before.items()})
            log.write(0, before)
            write_samples(self.workdir / "samples", 0, clips)

        per_device = config.peak_tflops_per_device
        if per_device is None:
            per_device = peak_tflops(jax.devices()[0].device_kind) or 0.0
        if per_device:
            logger.info("MFU against a peak of %g TFLOP/s per device", per_device)
        peak = per_device * 1e12 * jax.device_count()
        # Redirected to a file, a bar redrawn 10 times a second is mostly noise. Its rate and
        # ETA are the logged step time's: tqdm's smoothed rate carried the compiles for
        # minutes (29.71 s/step shown at step 37 of a run at 1.38 s/step).
        bar = tqdm(total=config.total_steps, initial=start, desc="train", unit="step",
                   disable=jax.process_index() != 0, dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 30.0,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        last_time, compiling = time.perf_counter(), 0.0
        window = {"steps": 0, "examples": 0, "flops": 0.0}  # since the last perf row
        # The sources take turns (a 1:1 mix alternates), so a log every `log_every` steps
        # can land on the same source every time: each other source logs its next step.
        sources = {s["name"] for s in config.data.sources}
        owed: set[str] = set()
        step, metrics = start, None
        try:
            with PreemptionGuard() as guard:
                while step < config.total_steps:
                    name, batch = next(pipeline)
                    x = sharding.global_batch(batch["video"], self.mesh)
                    t = time.perf_counter()
                    compiled, flops = self.compiled_step(state, x)
                    compiling += time.perf_counter() - t
                    previous = metrics
                    state, metrics = compiled(state, self.frozen, x, self.key)
                    step += 1
                    # The guard reads the previous step's count (the state is donated, so from
                    # its metrics): the host fetches the next batch while this step runs.
                    last = previous if previous is not None and step < config.total_steps else metrics
                    run = int(last["nonfinite_run"])
                    if run >= config.max_nonfinite_in_row:
                        raise FloatingPointError(
                            f"{run} steps in a row had non-finite losses or gradients (last at "
                            f"step {step}); stopping. Lower config.optim.lr, set "
                            "config.optim.grad_clip, or use float32 compute")
                    window["steps"] += 1
                    window["examples"] += x.shape[0]
                    window["flops"] += flops
                    if step % config.log_every == 0 or step == config.total_steps:
                        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                        now = time.perf_counter()
                        # Over all sources' steps since the last perf row: their examples
                        # and FLOPs differ, so both are summed, not taken from this batch.
                        elapsed = now - last_time - compiling
                        dt = elapsed / window["steps"]
                        metrics.update({"perf/step_time_s": dt,
                                        "perf/examples_per_s": window["examples"] / elapsed,
                                        "perf/flops_per_step": window["flops"] / window["steps"],
                                        "data/batch_frames": float(x.shape[1])})
                        if peak > 0 and window["flops"] > 0:
                            metrics["perf/mfu"] = window["flops"] / elapsed / peak
                        last_time, compiling = now, 0.0
                        window = {"steps": 0, "examples": 0, "flops": 0.0}
                        metrics.update({k: float(v) for k, v in pipeline.metrics().items()})
                        log.write(step, {"source/" + name: 1.0, **metrics})
                        owed = sources - {name}
                        # Drawn with the bar's next update, so a log line shows it once.
                        bar.set_postfix(loss=f"{metrics['loss/total']:.4g}",
                                        rec=f"{metrics['loss/rec']:.4f}", src=name,
                                        step=f"{dt:.3g}s",
                                        left=tqdm.format_interval(dt * (config.total_steps - step)),
                                        refresh=False)
                    elif name in owed:
                        owed.discard(name)
                        losses = {k: float(v) for k, v in jax.device_get(metrics).items()}
                        log.write(step, {"source/" + name: 1.0, **losses,
                                         "data/batch_frames": float(x.shape[1])})
                    bar.update(1)
                    ckpt.maybe_save(step, state, pipeline)
                    if config.sample_every and step % config.sample_every == 0:
                        _, clips = evaluator(state.gen["vae"], self.frozen)
                        write_samples(self.workdir / "samples", step, clips)
                    if guard.preempted(step):
                        bar.close()
                        print(f"stopping at step {step} ({guard.reason}): saving", flush=True)
                        ckpt.maybe_save(step, state, pipeline, force=True)
                        ckpt.wait()
                        print(f"saved step {step}; the same command resumes the run", flush=True)
                        return {"preempted_at": float(step)}
            ckpt.maybe_save(step, state, pipeline, force=True)
            ckpt.wait()
        finally:
            bar.close()
            log.flush()
            ckpt.close()
            pipeline.close()

        after, clips = evaluator(state.gen["vae"], self.frozen)
        _say(_eval_line(step, after))
        results.update({f"{k}_after": v for k, v in after.items()})
        log.write(step, after)
        log.close()
        write_samples(self.workdir / "samples", step, clips)
        self.export(state)
        return results

    def export(self, state: TrainState) -> None:
        """The raw and EMA autoencoders as official-layout model directories."""
        for name, params in (("export", state.gen["vae"]), ("export_ema", state.ema)):
            host = multihost_utils.process_allgather(params, tiled=True)
            if jax.process_index() == 0:
                module = nnx.merge(self.graphdefs.vae, host)
                module.save_pretrained(self.workdir / name)
