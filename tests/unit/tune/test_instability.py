"""The instability policy on synthetic metric streams: each failure mode stops with its reason;
a healthy run (noisy, with early bad FIDs) is never stopped."""

import math
import random

import pytest

from latentforge.tune.instability import InstabilityPolicy, InstabilityThresholds


def healthy_stream(steps=1500, every=25, seed=0):
    """Losses that wander, D(x) ~0.6-0.8, gradient norms 1-30, FID falling from 400 to 40 with noise."""
    rng = random.Random(seed)
    for step in range(every, steps + 1, every):
        r = {"step": step, "d_loss": 1.0 + rng.uniform(-0.4, 0.4), "g_loss": 1.0 + rng.uniform(-0.5, 0.5),
             "d_real": rng.uniform(0.55, 0.8), "d_fake": rng.uniform(0.2, 0.45),
             "grad_norm_d": rng.uniform(1, 30), "grad_norm_g": rng.uniform(0.5, 10)}
        if step % 100 == 0:
            r["fid"] = 40 + 360 * math.exp(-step / 300) * rng.uniform(0.85, 1.15)
            r["recall"] = min(0.7, step / 1000)
            r["class_coverage"] = 0.2 if step < 200 else 1.0  # early samples are bad for everyone
        yield r


def run(policy, stream, trial="t"):
    for r in stream:
        d = policy.observe(trial, r)
        if d.stop:
            return d, r["step"]
    return None, None


@pytest.mark.parametrize("seed", range(5))
def test_healthy_runs_are_never_stopped(seed):
    decision, _ = run(InstabilityPolicy(), healthy_stream(seed=seed))
    assert decision is None


def test_nan_stops_immediately():
    stream = list(healthy_stream(400))
    stream[5]["g_loss"] = float("nan")
    decision, step = run(InstabilityPolicy(), stream)
    assert decision.reason == "non_finite" and "g_loss" in decision.detail and step == stream[5]["step"]
    inf = [{"step": 10, "fid": float("inf")}]
    assert run(InstabilityPolicy(), inf)[0].reason == "non_finite"


def test_discriminator_wins_needs_patience_and_is_off_for_wgan():
    wins = {"d_loss": 0.01, "g_loss": 6.0, "d_real": 0.99, "d_fake": 0.01, "grad_norm_d": 0.1, "grad_norm_g": 0.5}
    policy = InstabilityPolicy()
    assert not policy.observe("a", {"step": 25, **wins}).stop
    assert not policy.observe("a", {"step": 50, **wins}).stop
    d = policy.observe("a", {"step": 75, **wins})
    assert d.stop and d.reason == "discriminator_wins" and "0.99" in d.detail
    # a single good report resets the streak
    p2 = InstabilityPolicy()
    for i, r in enumerate([wins, wins, {**wins, "d_loss": 0.9, "d_real": 0.6}, wins, wins]):
        assert not p2.observe("b", {"step": 25 * (i + 1), **r}).stop
    wgan = InstabilityPolicy(loss="wgan-gp")
    assert run(wgan, ({"step": 25 * i, **wins} for i in range(1, 10)))[0] is None


def test_a_hinge_discriminator_wins_at_its_margins():
    """Hinge D has no reason to push D(G(z)) below -1: a dead resnet-mnist run (every sample black)
    logged exactly this, which the non-saturating thresholds (D(G(z)) < 0.05) never caught."""
    dead = {"d_loss": 0.0, "g_loss": 1.013, "d_real": 0.9994, "d_fake": 0.2664, "grad_norm_d": 0.0, "grad_norm_g": 0.04}
    d, step = run(InstabilityPolicy(loss="hinge"), ({"step": 25 * i, **dead} for i in range(1, 10)))
    assert d.reason == "discriminator_wins" and step == 75 and "0.266" in d.detail
    assert run(InstabilityPolicy(loss="ns"), ({"step": 25 * i, **dead} for i in range(1, 10)))[0] is None
    healthy_hinge = {**dead, "d_loss": 1.6, "d_real": 0.56, "d_fake": 0.43}  # a live resnet-mnist run
    assert run(InstabilityPolicy(loss="hinge"), ({"step": 25 * i, **healthy_hinge} for i in range(1, 10)))[0] is None


def test_gradient_explosion():
    stream = ({"step": 25 * i, "d_loss": 1.0, "grad_norm_d": 10 ** (i / 2), "grad_norm_g": 1.0} for i in range(1, 20))
    d, step = run(InstabilityPolicy(), stream)
    assert d.reason == "gradient_explosion" and "grad_norm_d" in d.detail
    assert step == 25 * 11  # 10^4.5 at i=9, then two more above 1e4 (patience 3): i=9,10,11


def test_vanishing_generator_gradient():
    stream = ({"step": 10 * i, "d_loss": 0.8, "d_real": 0.7, "d_fake": 0.3, "grad_norm_d": 2.0, "grad_norm_g": 0.0}
              for i in range(1, 10))
    assert run(InstabilityPolicy(), stream)[0].reason == "vanishing_generator_gradient"


def test_mode_collapse_after_warmup_only():
    collapsed = {"class_coverage": 0.1, "recall": 0.001, "fid": 300.0}
    early = [{"step": s, **collapsed} for s in (100, 200)]
    assert run(InstabilityPolicy(), early)[0] is None  # before the 300-step warm-up
    late = [{"step": s, **collapsed} for s in (100, 200, 300, 400, 500)]
    d, step = run(InstabilityPolicy(), late)
    assert d.reason == "mode_collapse" and step == 500


def test_fid_degradation_from_the_trials_best():
    fids = [300, 150, 80, 60, 70, 95, 100, 120]  # best 60; >90 three times in a row from step 600
    stream = [{"step": 100 * (i + 1), "fid": f, "recall": 0.5, "class_coverage": 1.0} for i, f in enumerate(fids)]
    d, step = run(InstabilityPolicy(), stream)
    assert d.reason == "fid_degradation" and step == 800 and "best 60.0" in d.detail


def test_thresholds_are_configurable_and_can_be_disabled():
    nan = [{"step": 1, "d_loss": float("nan")}]
    assert run(InstabilityPolicy(InstabilityThresholds(enabled=False)), nan)[0] is None
    fids = [{"step": 100 * (i + 1), "fid": f} for i, f in enumerate([60, 100, 100, 100])]
    assert run(InstabilityPolicy(InstabilityThresholds(fid_degradation=None)), fids)[0] is None
    with pytest.raises(ValueError):
        InstabilityThresholds(patience=0)
    with pytest.raises(ValueError):
        InstabilityThresholds(bogus=1)


def test_trials_are_independent_and_decisions_stick():
    p = InstabilityPolicy()
    assert p.observe("bad", {"step": 1, "d_loss": float("nan")}).reason == "non_finite"
    assert not p.observe("good", {"step": 1, "d_loss": 1.0}).stop
    assert p.observe("bad", {"step": 2, "d_loss": 1.0}).stop  # once stopped, stays stopped
    assert p.reason("bad").reason == "non_finite" and p.reason("good") is None


def test_a_repeated_result_is_not_counted_twice():
    """Tune hands a finished trial's last result to the stopper again: one evaluation, not two."""
    collapsed = {"step": 300, "class_coverage": 0.1, "recall": 0.0}
    p = InstabilityPolicy(InstabilityThresholds(patience=2))
    assert not p.observe("t", collapsed).stop
    assert not p.observe("t", dict(collapsed)).stop
    assert p.observe("t", {**collapsed, "step": 400}).stop


def test_a_trial_warm_started_from_another_trials_weights_starts_its_history_again(tmp_path):
    """PBT gives an exploiting trial another trial's weights: judging them against the best FID of
    the weights it had (60 here) stopped it as degraded three reports later."""
    from latentforge.tune.instability import InstabilityPolicy
    from latentforge.tune.sweep import InstabilityStopper

    def reports(stopper, fids, start, warm=None):
        out = []
        for i, f in enumerate(fids):
            r = {"step": start + 100 * i, "fid": f, "recall": 0.5, "class_coverage": 1.0, "config": {}}
            if warm is not None:
                r["warm_started_at_step"] = warm
            out.append(stopper("t", r))
        return out

    for warm, stopped in ((400, False), (None, True)):  # None: the same weights went on (no warm start)
        stopper = InstabilityStopper(InstabilityPolicy(), str(tmp_path / str(warm)))
        assert not any(reports(stopper, [300, 150, 80, 60], 100))
        assert any(reports(stopper, [95, 100, 120], 500, warm)) is stopped
