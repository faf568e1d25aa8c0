"""ASHA's rung decision, applied again when later trials reach the rung. Pure Python (no Ray).

Ray's ASHA decides once, when a trial reaches a rung, against the trials recorded there *so far*.
The first trials to reach a rung are compared with nobody and always continue: with 8 trials run
2 at a time, the first two trials of a sweep ran to the end whatever they were worth (in the
bench, 5e-5 learning rates at FID 300-600 ran to 600 steps while the eventual winner waited).
This check keeps ASHA's rule and its numbers (rungs at grace_period * reduction_factor^k, keep
the top 1/reduction_factor, ranked on the same `{metric}_best`) and re-applies it at every later
report of a trial, at the highest rung it has passed, against everyone recorded at that rung by then. A trial is
stopped as soon as the evidence that ASHA would have cut it with exists, instead of never.
"""

from __future__ import annotations

import math

import numpy as np

from latentforge.tune.instability import StopDecision


def rung_milestones(grace_period: int, reduction_factor: int, max_t: int) -> list[int]:
    """Ray's ASHA rungs (one bracket): grace_period * reduction_factor^k below max_t."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1) if max_t > grace_period else 0
    return [grace_period * reduction_factor**k for k in range(count)]


class RungRecheck:
    """Feeds on every trial's reported results; stops a trial that has fallen below a rung's
    cutoff since it passed it.

    Args:
        grace_period, reduction_factor, max_t: the ASHA scheduler's settings.
        metric: the value ASHA ranks (the sweep's `{metric}_best`).
        mode: "min" or "max".
    """

    def __init__(self, grace_period: int, reduction_factor: int, max_t: int, metric: str, mode: str = "min"):
        self.rf, self.metric, self.sign = reduction_factor, metric, (-1.0 if mode == "min" else 1.0)
        self.milestones = rung_milestones(grace_period, reduction_factor, max_t)
        self.recorded: dict[int, dict[str, float]] = {m: {} for m in self.milestones}

    def cutoff(self, milestone: int, excluding: str) -> float | None:
        others = [v for t, v in self.recorded[milestone].items() if t != excluding]
        return float(np.percentile(others, (1 - 1 / self.rf) * 100)) if others else None

    def observe(self, trial_id: str, result: dict) -> StopDecision:
        step, value = result.get("step"), result.get(self.metric)
        if step is None or value is None or not math.isfinite(float(value)):
            return StopDecision(False)
        highest, new = None, False
        for m in self.milestones:
            if step < m:
                break
            highest, new = m, trial_id not in self.recorded[m]
            if new:  # first result at or past the rung: what ASHA records (and decides on itself)
                self.recorded[m][trial_id] = self.sign * float(value)
        # only the highest rung reached: a trial that made a later rung has been judged there,
        # against the trials that got that far (a slow starter cut at the first rung after it led
        # the second was the best trial of a cross-family sweep); and not on the report that
        # reaches it, where ASHA itself decides
        if highest is not None and not new:
            m = highest
            cut = self.cutoff(m, trial_id)
            mine = self.recorded[m][trial_id]
            if cut is not None and mine < cut:
                n = len(self.recorded[m])
                return StopDecision(True, "below_rung_cutoff",
                                    f"{self.metric} {self.sign * mine:.4g} at the step-{m} rung is no longer in the top "
                                    f"1/{self.rf} of the {n} trials recorded there (cutoff {self.sign * cut:.4g}; step {step})")
        return StopDecision(False)
