"""The instability policy: decides, from a trial's stream of reported metrics, whether a GAN
trial has become a waste of compute and why. Pure Python (no Ray): the Tune `Stopper` in
`tune/sweep.py` only asks it.

Failure modes and their default thresholds (each can be changed or turned off in the sweep):

- non_finite: a loss or gradient norm is NaN/inf once. Nothing recovers from that.
- discriminator_wins: D's loss below `d_loss_floor` (0.05) with mean D(x) > 0.95 and D(G(z)) < 0.05
  for `patience` (3) reports in a row. G's gradient vanishes once D is that sure (non-saturating
  and hinge losses); not applied to WGAN-GP, whose critic outputs are not probabilities. A hinge
  D stops at its margins, D(x) >= 1 and D(G(z)) <= -1, i.e. sigmoids of 0.73 and 0.27, and never
  needs to go further: for hinge, D(x) > 0.73 and D(G(z)) < 0.27 with the loss floor count as
  winning (a resnet-mnist run that died with every sample black read d_loss 0, D(x) 0.999, D(G(z))
  0.266 and was not caught by 0.95/0.05).
- gradient_explosion: a gradient norm above `max_grad_norm` (1e4) for `patience` reports in a row.
  Healthy runs of the shipped presets stay below ~100; 1e4 leaves two orders of headroom.
- vanishing_generator_gradient: G's gradient norm below `min_grad_norm_g` (1e-6) for `patience`
  reports: with every unit dead (a learning rate of 1.0 does this in a few steps) G gets no
  signal and cannot recover, whatever D does.
- mode_collapse: after `warmup_steps` (300), class coverage below `min_class_coverage` (0.3, i.e.
  most classes missing) or recall below `min_recall` (0.02) in `patience` evaluations in a row.
  Early samples are bad for everyone, hence the warm-up.
- fid_degradation: FID more than `fid_degradation` (50%) above the trial's best for `patience`
  evaluations in a row (a run that was good and fell apart).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pydantic import Field

from latentforge.config import StrictConfig

HINGE_REAL, HINGE_FAKE = 0.73, 0.27  # just inside sigmoid(1) = 0.731 and sigmoid(-1) = 0.269
_FINITE_KEYS = ("d_loss", "g_loss", "loss", "nll", "kl", "grad_norm_d", "grad_norm_g", "grad_norm", "fid")


class InstabilityThresholds(StrictConfig):
    enabled: bool = True  # False turns the whole policy off (naive sweeps, benchmarks)
    patience: int = Field(3, ge=1)  # consecutive reports a condition must hold (non-finite: 1)
    d_loss_floor: float | None = Field(0.05, ge=0)  # discriminator_wins: D loss below this (None = off)
    d_real_min: float = Field(0.95, ge=0, le=1)  # discriminator_wins: mean sigmoid(D(x)) above this
    d_fake_max: float = Field(0.05, ge=0, le=1)  # discriminator_wins: mean sigmoid(D(G(z))) below this
    max_grad_norm: float | None = Field(1e4, gt=0)  # gradient_explosion threshold (None = off)
    min_grad_norm_g: float | None = Field(1e-6, ge=0)  # vanishing_generator_gradient threshold (None = off)
    warmup_steps: int = Field(300, ge=0)  # mode_collapse is not judged before this step
    min_class_coverage: float | None = Field(0.3, ge=0, le=1)  # mode_collapse: class coverage floor
    min_recall: float | None = Field(0.02, ge=0, le=1)  # mode_collapse: recall floor
    fid_degradation: float | None = Field(0.5, gt=0)  # FID above best*(1+x) counts as degraded (None = off)


@dataclass(frozen=True)
class StopDecision:
    stop: bool
    reason: str | None = None  # a failure mode named in the module docstring
    detail: str = ""  # human-readable evidence, e.g. "d_loss 0.01, D(x) 0.99, D(G(z)) 0.01 for 3 reports"


@dataclass
class _TrialState:
    streaks: dict[str, int] = field(default_factory=dict)
    best_fid: float = math.inf
    stopped: StopDecision | None = None
    last_step: int | None = None
    loss: str = "ns"  # the trial's adversarial loss (its own, when a sweep searches over losses)


class InstabilityPolicy:
    """Feeds on reported results (dicts with the training/eval metrics) one trial at a time."""

    def __init__(self, thresholds: InstabilityThresholds | None = None, loss: str = "ns"):
        self.t = thresholds or InstabilityThresholds()
        self.loss = loss  # the default for trials observed without their own
        self._trials: dict[str, _TrialState] = {}

    def _streak(self, state: _TrialState, key: str, condition: bool) -> int:
        state.streaks[key] = state.streaks.get(key, 0) + 1 if condition else 0
        return state.streaks[key]

    def forget(self, trial_id: str) -> None:
        """Start a trial's history again: PBT gave it another trial's weights, whose best FID and
        streaks are not its own."""
        self._trials.pop(trial_id, None)

    def observe(self, trial_id: str, result: dict, loss: str | None = None) -> StopDecision:
        """Update the trial's state with one result and decide.

        Args:
            trial_id: the trial.
            result: its reported metrics.
            loss: the trial's adversarial loss now ('wgan-gp' changes which checks apply); the
                last one given, or the policy's default.
        """
        state = self._trials.setdefault(trial_id, _TrialState(loss=self.loss))
        if loss:  # PBT may hand a trial another trial's config, loss included
            state.loss = loss
        if state.stopped is not None:
            return state.stopped
        step = result.get("step")
        if step is not None and step == state.last_step:
            return StopDecision(False)  # the same step again (Tune repeats a trial's last result when it ends)
        state.last_step = step
        decision = self._decide(state, result)
        if decision.stop:
            state.stopped = decision
        return decision

    def _decide(self, state: _TrialState, r: dict) -> StopDecision:
        t = self.t
        if not t.enabled:
            return StopDecision(False)
        bad = [k for k in _FINITE_KEYS if k in r and r[k] is not None and not math.isfinite(float(r[k]))]
        if bad:
            return StopDecision(True, "non_finite", f"non-finite {', '.join(bad)} at step {r.get('step')}")

        gan = "d_loss" in r
        if gan and t.d_loss_floor is not None and state.loss != "wgan-gp" and {"d_real", "d_fake"} <= set(r):
            real_min, fake_max = t.d_real_min, t.d_fake_max
            if state.loss == "hinge":  # hinge D is done at its margins: sigmoid(1), sigmoid(-1)
                real_min, fake_max = min(real_min, HINGE_REAL), max(fake_max, HINGE_FAKE)
            wins = r["d_loss"] < t.d_loss_floor and r["d_real"] > real_min and r["d_fake"] < fake_max
            if self._streak(state, "d_wins", wins) >= t.patience:
                return StopDecision(True, "discriminator_wins",
                                    f"d_loss {r['d_loss']:.3g}, D(x) {r['d_real']:.3f}, D(G(z)) {r['d_fake']:.3f} "
                                    f"for {t.patience} reports (step {r.get('step')})")

        if t.max_grad_norm is not None:
            norms = {k: float(r[k]) for k in ("grad_norm_d", "grad_norm_g", "grad_norm") if k in r}
            worst = max(norms.values(), default=0.0)
            if self._streak(state, "grad", worst > t.max_grad_norm) >= t.patience:
                name = max(norms, key=norms.get)
                return StopDecision(True, "gradient_explosion",
                                    f"{name} {worst:.3g} > {t.max_grad_norm:g} for {t.patience} reports (step {r.get('step')})")

        if t.min_grad_norm_g is not None and "grad_norm_g" in r:
            if self._streak(state, "g_dead", float(r["grad_norm_g"]) < t.min_grad_norm_g) >= t.patience:
                return StopDecision(True, "vanishing_generator_gradient",
                                    f"grad_norm_g {float(r['grad_norm_g']):.2g} < {t.min_grad_norm_g:g} for "
                                    f"{t.patience} reports (step {r.get('step')})")

        step = int(r.get("step", 0))
        if step >= t.warmup_steps and ("class_coverage" in r or "recall" in r):
            low_cov = t.min_class_coverage is not None and "class_coverage" in r and r["class_coverage"] < t.min_class_coverage
            low_rec = t.min_recall is not None and "recall" in r and r["recall"] < t.min_recall
            if self._streak(state, "collapse", low_cov or low_rec) >= t.patience:
                return StopDecision(True, "mode_collapse",
                                    f"class coverage {r.get('class_coverage', float('nan')):.2f}, recall "
                                    f"{r.get('recall', float('nan')):.3f} for {t.patience} evaluations (step {step})")

        if "fid" in r and t.fid_degradation is not None:
            fid = float(r["fid"])
            state.best_fid = min(state.best_fid, fid)
            degraded = fid > state.best_fid * (1 + t.fid_degradation)
            if self._streak(state, "fid", degraded) >= t.patience:
                return StopDecision(True, "fid_degradation",
                                    f"FID {fid:.1f} vs best {state.best_fid:.1f} (> +{t.fid_degradation:.0%}) "
                                    f"for {t.patience} evaluations (step {step})")
        return StopDecision(False)

    def reason(self, trial_id: str) -> StopDecision | None:
        """The decision that stopped a trial, if any."""
        state = self._trials.get(trial_id)
        return state.stopped if state else None


ADVICE = {
    "non_finite": "nothing recovers from a NaN: lower the learning rates, or train in fp32 if this run is bf16",
    "discriminator_wins": "G gets no gradient any more and its samples will not improve: restart with another "
                          "train.seed, a lower gan.lr_d, or augmentation (gan.augment=diffaugment)",
    "gradient_explosion": "lower the learning rates",
    "vanishing_generator_gradient": "G got no gradient for several reports in a row and runs seldom recover from "
                                    "that: restart with lower learning rates or another train.seed",
    "mode_collapse": "the samples cover few classes or styles: an earlier checkpoint may be better; restart with "
                     "another train.seed or augmentation (gan.augment=diffaugment)",
    "fid_degradation": "the run was better before: an earlier checkpoint may be the one to keep",
}


def unstable_warning(decision: StopDecision) -> str:
    """One line for a run's log: what went wrong, the evidence, and what to try."""
    return (f"warning: this run looks unstable ({decision.reason}: {decision.detail}); "
            f"{ADVICE.get(decision.reason, 'see the metrics')}. Sweeps stop such trials by themselves")
