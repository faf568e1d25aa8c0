"""The rung re-check: ASHA's cut, applied again as later trials reach a rung."""

import pytest

from latentforge.tune.rungs import RungRecheck, rung_milestones


@pytest.mark.parametrize("grace,rf,max_t", [(100, 3, 600), (100, 4, 600), (50, 4, 600), (10, 2, 100), (200, 3, 1500)])
def test_milestones_are_rays_asha_rungs(grace, rf, max_t):
    from ray.tune.schedulers.async_hyperband import _Bracket

    assert rung_milestones(grace, rf, max_t) == sorted(m for m, _ in _Bracket(grace, max_t, rf, 0)._rungs)


def report(policy, trial, step, fid_best):
    return policy.observe(trial, {"step": step, "fid_best": fid_best})


def test_a_free_pass_is_taken_back_once_better_trials_reach_the_rung():
    p = RungRecheck(100, 3, 600, "fid_best", "min")
    # the first trial at the rung is compared with nobody (ASHA lets it continue)
    assert not report(p, "slow", 100, 1300).stop
    assert not report(p, "slow", 150, 1200).stop
    for trial, fid in (("a", 130), ("b", 450), ("c", 600)):
        assert not report(p, trial, 100, fid).stop  # at the rung itself ASHA decides, not this check
    decision = report(p, "slow", 175, 1100)
    assert decision.stop and decision.reason == "below_rung_cutoff"
    assert "step-100 rung" in decision.detail and "1300" in decision.detail
    assert report(p, "slow", 200, 1000).stop  # stays stopped while it reports


def test_the_leader_and_the_top_share_keep_running():
    p = RungRecheck(100, 3, 600, "fid_best", "min")
    fids = {"t0": 900, "t1": 120, "t2": 500, "t3": 700, "t4": 800, "t5": 1000}
    for t, f in fids.items():
        report(p, t, 100, f)
    for step in (125, 150, 300, 325, 575):
        assert not report(p, "t1", step, 100).stop
    # top 1/3 of 6 at the rung: t1 and t2 continue; t3 (third best) is cut on its next report
    assert not report(p, "t2", 125, 480).stop
    assert report(p, "t3", 125, 690).stop


def test_a_trial_that_leads_a_later_rung_is_not_cut_at_an_earlier_one():
    """A slow starter (behind at the step-125 rung) that leads at the step-250 rung keeps
    running: ASHA judges a trial at the latest rung it reached (in a cross-family sweep the
    eventual best, a DCGAN, had been cut at step 300 for its step-125 FID)."""
    p = RungRecheck(125, 2, 500, "fid_best", "min")
    report(p, "late", 125, 215)
    report(p, "late", 250, 132)
    for trial, fid in (("early", 163), ("other", 170)):
        report(p, trial, 125, fid)
        report(p, trial, 250, fid - 5)
    assert not report(p, "late", 300, 130).stop
    assert report(p, "other", 300, 160).stop  # behind at the step-250 rung: cut there


def test_the_report_that_reaches_a_new_rung_is_not_judged_at_the_one_before():
    """A trial behind at the step-100 rung that is the first to reach step 200 is left to ASHA
    there; it was cut for its step-100 value on that very report."""
    p = RungRecheck(100, 2, 400, "fid_best", "min")
    report(p, "a", 100, 50)
    report(p, "a", 175, 50)
    report(p, "b", 100, 10)
    report(p, "c", 100, 20)
    assert not report(p, "a", 200, 30).stop  # the only trial at the step-200 rung
    assert not report(p, "a", 250, 30).stop  # and judged there afterwards, against nobody yet
    report(p, "b", 200, 8)
    report(p, "c", 200, 9)
    assert report(p, "a", 275, 30).stop  # behind both at the step-200 rung


def test_max_mode_missing_and_non_finite_values():
    p = RungRecheck(10, 2, 100, "recall_best", "max")
    assert not p.observe("x", {"step": 10}).stop  # no metric in this report
    assert not p.observe("x", {"step": 10, "recall_best": float("nan")}).stop
    report_max = lambda t, s, v: p.observe(t, {"step": s, "recall_best": v})  # noqa: E731
    report_max("low", 10, 0.1)
    report_max("high", 10, 0.6)
    report_max("mid", 10, 0.5)
    assert report_max("low", 12, 0.2).stop
    assert not report_max("high", 12, 0.6).stop


def test_a_resumed_sweep_replays_its_trials_results_into_the_rungs(tmp_path):
    """A resumed sweep's Tune restores the stopper pickled when the sweep began, with empty rungs:
    finished trials no longer counted, so a weak trial that resumed ran on. The trials' result
    files are replayed into the rungs on restore."""
    import json
    from ray import cloudpickle as pickle  # as Tune pickles its stopper

    from latentforge.tune.instability import InstabilityPolicy
    from latentforge.tune.sweep import InstabilityStopper

    stopper = InstabilityStopper(InstabilityPolicy(), str(tmp_path),
                                 RungRecheck(100, 2, 400, "fid_best", "min"))
    frozen = pickle.dumps(stopper)  # what Tune keeps from the sweep's start
    for trial, fids in (("good1", [20, 15]), ("good2", [25, 18]), ("weak", [90])):
        folder = tmp_path / "tune" / f"trial_{trial}"
        folder.mkdir(parents=True)
        lines = [json.dumps({"trial_id": trial, "step": 100 * (i + 1), "fid_best": f}) for i, f in enumerate(fids)]
        (folder / "result.json").write_text("\n".join(lines) + "\n{\"trial_id\": \"cut sh")  # a line cut by the crash
    restored = pickle.loads(frozen)
    assert restored.rungs.recorded[100] == {"good1": -20.0, "good2": -25.0, "weak": -90.0}
    assert restored("weak", {"step": 150, "fid_best": 85, "config": {}})  # behind both at the step-100 rung
