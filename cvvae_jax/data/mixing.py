"""Which source feeds each train step: a fixed, smooth, weighted round robin.

Every step draws one whole batch from one source, so a step has that source's
static shape (e.g. 8x1x320x320 images or 1x17x256x256 clips) and each shape
compiles once. Weights are fractions of steps, not of samples. They become
integer counts over the shortest period that represents them (0.5/0.5 -> 1:1
in 2 steps, 0.7/0.3 -> 7:3 in 10), and the smooth weighted round robin (as in
nginx) spreads each source's steps evenly over the period: for 3:1 the cycle
is A A B A. `schedule(step)` is a pure function of the step, so a restored run,
the trainer and the input pipeline all agree on it without shared state.
"""

from __future__ import annotations

from collections.abc import Mapping

# Weights that no period up to this represents exactly are rounded to it.
MAX_PERIOD = 1000
_TOLERANCE = 1e-6


def integer_weights(weights: Mapping[str, float],
                    max_period: int = MAX_PERIOD) -> dict[str, int]:
    """The smallest integer counts proportional to `weights` (rounded if need be)."""
    if not weights:
        raise ValueError("mixing needs at least one source")
    bad = {k: w for k, w in weights.items() if not w > 0}
    if bad:
        raise ValueError(f"mixing weights must be > 0 (drop a source instead): {bad}")
    total = sum(weights.values())
    fractions = {k: w / total for k, w in weights.items()}
    for period in range(1, max_period + 1):
        counts = {k: f * period for k, f in fractions.items()}
        if all(abs(c - round(c)) < _TOLERANCE * period and round(c) >= 1
               for c in counts.values()):
            return {k: round(c) for k, c in counts.items()}
    # Largest remainder at max_period, every source keeping at least one step.
    counts = {k: max(1, int(f * max_period)) for k, f in fractions.items()}
    by_remainder = sorted(fractions, key=lambda k: int(fractions[k] * max_period)
                          - fractions[k] * max_period)
    for k in by_remainder[:max(0, max_period - sum(counts.values()))]:
        counts[k] += 1
    return counts


class Schedule:
    """step -> source name, periodic in `period` steps."""

    def __init__(self, weights: Mapping[str, float], *, max_period: int = MAX_PERIOD):
        self.counts = integer_weights(weights, max_period)
        self.period = sum(self.counts.values())
        current = dict.fromkeys(self.counts, 0)
        cycle = []
        for _ in range(self.period):
            for k, c in self.counts.items():
                current[k] += c
            # max() keeps the first of equal keys: ties go to the source listed first.
            pick = max(current, key=current.__getitem__)
            current[pick] -= self.period
            cycle.append(pick)
        self.cycle = tuple(cycle)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.counts)

    def __call__(self, step: int) -> str:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.cycle[step % self.period]

    def __repr__(self) -> str:
        return f"Schedule({self.counts}, period={self.period})"
