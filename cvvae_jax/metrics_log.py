"""Scalar metrics to a JSON-lines file and TensorBoard (process 0 only)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import jax


class MetricsLog:
    """Appends `{"step": s, **metrics}` lines to `workdir/metrics.jsonl` and mirrors them
    to TensorBoard event files under `workdir/tensorboard` (tensorboardX: no TensorFlow)."""

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            # NaN/Inf are not JSON: written as strings so a bad step stays visible.
            f.write(json.dumps({"step": step, **{k: v if math.isfinite(v) else str(v)
                                                 for k, v in clean.items()}}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    """One row per step of `workdir/metrics.jsonl`, merging the lines of a step (training
    metrics and the final eval share the last step); a key logged again (after a resume)
    keeps its last value."""
    by_step: dict[int, dict] = {}
    path = Path(workdir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            by_step.setdefault(row["step"], {}).update(row)
    return [by_step[s] for s in sorted(by_step)]
