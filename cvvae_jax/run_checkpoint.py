"""The training run's checkpoints: train state, data pipeline position and config.

Each saved step is one directory with three Orbax items:
  state   the train state pytree (params, optimizer states, EMA, step, RNG key), as
          global jax.Arrays, restored straight onto the shardings the caller gives;
  data    the data pipeline's position, per process (each process reads its own
          shard of the data): a Grain iterator, or any JSON-able dict;
  config  the run's config, JSON, for reading a run back.

Resume order: build the abstract state with its shardings and the data iterator,
then `restore_latest`; it tries the newest step first and falls back to older
ones when a step cannot be read, so a run interrupted while a disk filled up or a
file got lost resumes from the last good step instead of failing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

logger = logging.getLogger(__name__)

PyTree = Any


class _JsonState:
    """A JSON-able dict dressed as a Grain iterator, so that Grain's Orbax handler
    stores it one file per process, exactly as it stores an iterator's state."""

    def __init__(self, state: Mapping[str, Any] | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        """Called by the handler after `set_state`; there is nothing to prefetch."""


class RunCheckpointer:
    """An Orbax CheckpointManager that saves every `save_every` steps and keeps the
    last `keep_last` saves plus every step divisible by `keep_every`."""

    def __init__(self, directory: str | Path, *, save_every: int, keep_last: int,
                 keep_every: int | None = None, config: Mapping[str, Any] | None = None,
                 async_save: bool = True):
        if save_every < 1 or keep_last < 1 or (keep_every is not None and keep_every < 1):
            raise ValueError(f"save_every={save_every}, keep_last={keep_last} and "
                             f"keep_every={keep_every} must be positive")
        self.save_every = save_every
        self._config = None if config is None else dict(config)
        # Steps this process saved: a forced save at the end of the loop may repeat one.
        self._saved_steps: set[int] = set()
        keep = [checkpoint_managers.LatestN(n=keep_last)]
        if keep_every is not None:
            # EveryNSteps keeps steps divisible by keep_every (exact_interval=True), what
            # the deprecated CheckpointManagerOptions.keep_period maps to in orbax 0.12.8.
            keep.append(checkpoint_managers.EveryNSteps(interval_steps=keep_every))
        self._manager = ocp.CheckpointManager(
            Path(directory).absolute(),  # Orbax refuses relative paths
            options=ocp.CheckpointManagerOptions(
                preservation_policy=checkpoint_managers.AnyPreservationPolicy(keep),
                enable_async_checkpointing=async_save),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    @property
    def directory(self) -> Path:
        return Path(self._manager.directory)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def maybe_save(self, step: int, state: PyTree, data_state: Any, *,
                   force: bool = False) -> bool:
        """Saves at multiples of `save_every`, or any step when `force`d; returns whether
        it saved. Returns once the state is copied off the devices (async saves).

        `data_state` is a Grain iterator (its position is read now, before this
        returns) or a JSON-able dict.
        """
        if step in self._saved_steps or not (force or step % self.save_every == 0):
            return False
        if step in self._manager.all_steps():
            # Left by an earlier attempt that got further than the step we resumed from:
            # it failed to restore then, and it is superseded now.
            logger.warning("replacing checkpoint step %d in %s, written by an earlier attempt",
                           step, self.directory)
            self._manager.delete(step)
        if isinstance(data_state, Mapping):
            data_state = _JsonState(data_state)
        items = {"state": ocp.args.StandardSave(state),
                 "data": grain.checkpoint.CheckpointSave(data_state)}
        if self._config is not None:
            items["config"] = ocp.args.JsonSave(self._config)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._saved_steps.add(step)
        return True

    def restore_latest(self, abstract_state: PyTree,
                       data_target: Any = None) -> tuple[int, PyTree, Any] | None:
        """(step, state, data state) of the newest step that restores, or None.

        `abstract_state` holds `jax.ShapeDtypeStruct`s with the shardings to restore
        onto. `data_target` is the Grain iterator to move to the saved position (and
        returned), or None for the saved state as a dict.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        for step in steps:
            data = _JsonState() if data_target is None else data_target
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=grain.checkpoint.CheckpointRestore(data))
            try:
                restored = self._manager.restore(step, args=args)
            # A damaged step fails in many ways: ValueError (TensorStore NOT_FOUND or
            # DATA_LOSS, a missing Grain file, bad JSON), KeyError (a missing item), and
            # a bare Exception from TensorStore reads of truncated array files.
            except Exception as e:  # noqa: BLE001
                logger.warning("checkpoint step %d in %s could not be restored, trying an "
                               "older one: %s: %s", step, self.directory, type(e).__name__,
                               _first_line(e))
                continue
            data = restored["data"]
            # The restored step is on disk already: a forced save of it (a finished run
            # launched again) must not delete and rewrite it.
            self._saved_steps.add(step)
            return step, restored["state"], data.state if data_target is None else data
        if steps:
            logger.warning("none of the checkpoint steps %s in %s could be restored",
                           steps, self.directory)
        return None

    def saved_config(self, step: int) -> dict[str, Any] | None:
        """The config saved with `step`, or None where it has none or it does not read."""
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception:  # noqa: BLE001 - a step saved without a config, or damaged
            return None
        return dict(restored["config"])

    def saved_process_count(self, step: int) -> int | None:
        """How many processes saved `step` (None where it has no data item): each process
        writes its own data file, `process_<i>-of-<n>.json`, and restores only its own."""
        for path in (self.directory / str(step) / "data").glob("process_*-of-*.json"):
            return int(path.stem.rpartition("-of-")[2])
        return None

    def wait(self) -> None:
        """Blocks until the async saves have been written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _first_line(e: Exception) -> str:
    # TensorStore appends a multi-kilobyte spec dump to its messages.
    lines = str(e).partition(" See full TensorStore")[0].splitlines()
    return lines[0][:300] if lines else ""


class PreemptionGuard:
    """Tells the train loop that the job is being preempted, so that it saves and stops.

        with PreemptionGuard() as guard:
            for step in ...:
                ...
                if guard.preempted(step):
                    checkpointer.maybe_save(step, state, it, force=True)
                    break

    One process: a SIGTERM handler sets a flag; it does no buffered I/O itself, since a
    handler runs between two bytecodes of the main thread, possibly in the middle of a save
    or of a progress bar's write. Ctrl-C (SIGINT) does the same, so that an interrupted run
    keeps its last steps; a second Ctrl-C raises KeyboardInterrupt at once.
    Several processes (jax.distributed): JAX's preemption service already catches
    SIGTERM there and agrees with all processes on the step at which each one sees
    `preempted(step)` (Orbax's `reached_preemption`, which CheckpointManager.save
    itself consults); a local flag would make only the signalled process save, and
    its collective save would hang. So there no SIGTERM handler is installed (it would
    replace JAX's), a first Ctrl-C sends the process SIGTERM, for JAX's service to
    see, and `preempted` must be called at every step by every process.
    """

    def __init__(self):
        self._stop = threading.Event()
        self._previous_handlers: dict[int, object] = {}
        self._multiprocess = False
        self.reason = "SIGTERM"

    def __enter__(self) -> Self:
        self._multiprocess = jax.process_count() > 1
        for sig in (signal.SIGINT,) if self._multiprocess else (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, previous in self._previous_handlers.items():
            # None stands for a handler not set from Python: the default one.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous_handlers = {}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self._stop.is_set():
                raise KeyboardInterrupt
            # os.write: unbuffered, so safe even if the handler interrupted a print.
            os.write(2, b"\ninterrupted: stopping after this step to save it "
                        b"(Ctrl-C again to stop at once, unsaved)\n")
        self.reason = signal.Signals(signum).name
        self._stop.set()
        if self._multiprocess:
            # JAX's preemption notifier catches SIGTERM in C++ and tells every process.
            os.kill(os.getpid(), signal.SIGTERM)

    def preempted(self, step: int) -> bool:
        if self._multiprocess:
            return ocp.multihost.reached_preemption(step)
        return self._stop.is_set()
