"""Sweeps on a real local Ray cluster: unstable trials stopped with their reason, the best trial
promoted with lineage, PBT exploiting (the killed-driver resume is in test_tune_resume.py)."""

import json
from pathlib import Path

import pytest

from helpers import sweep_file

from latentforge.checkpoint import resolve_checkpoint
from latentforge.registry import list_entries, show
from latentforge.tune.space import load_sweep
from latentforge.tune.sweep import run_sweep

quiet = lambda *_: None  # noqa: E731

def test_unstable_trials_stop_early_with_a_reason_and_the_best_is_promoted(ray_cluster, mnist_dir, mnist_features, tmp_path):
    # ASHA with the rung re-check on: the stable trial is never behind anyone and must complete
    sw = load_sweep(sweep_file(tmp_path, steps=100, scheduler="{kind: asha, grace_period: 50, reduction_factor: 2}"))
    summary = run_sweep(sw, str(mnist_dir), out=str(tmp_path / "sweep"), registry=str(tmp_path / "registry"), log=quiet)
    rows = {r["config"]["gan.lr_g"]: r for r in summary["rows"]}
    assert rows[1.0]["status"].startswith("stopped: ")
    assert rows[1.0]["status"].split(": ")[1] in ("vanishing_generator_gradient", "discriminator_wins", "non_finite", "mode_collapse")
    assert rows[1.0]["steps_used"] < 60 and rows[2e-4]["status"] == "completed" and rows[2e-4]["steps_used"] == 100
    assert summary["best"]["config"]["gan.lr_g"] == 2e-4
    table = (tmp_path / "sweep" / "summary.md").read_text()
    assert "stopped: " in table and "completed" in table
    assert (tmp_path / "sweep" / "fid_vs_steps.png").stat().st_size > 1000
    entry = show(str(tmp_path / "registry"), "tiny")
    assert entry["lineage"]["sweep"] == "tiny" and entry["lineage"]["trial_id"] == summary["best"]["trial_id"]
    assert entry["lineage"]["hyperparameters"] == {"gan.lr_g": 2e-4}
    assert entry["dataset_hash"].startswith("sha256:")
    assert entry["metrics"]["fid"] == pytest.approx(summary["best"]["metric"])
    assert [e["name"] for e in list_entries(str(tmp_path / "registry"))] == ["tiny"]
    # generate/evaluate on the sweep folder load the trial the sweep ranked best
    assert resolve_checkpoint(tmp_path / "sweep") == Path(summary["best"]["checkpoint"])


def test_pbt_exploits_and_warm_starts_with_new_hyperparameters(ray_cluster, mnist_dir, mnist_features, tmp_path):
    sw = load_sweep(sweep_file(
        tmp_path, name="pbt", space="  gan.lr_g: {choice: [1.0e-6, 5.0e-4]}\n  gan.lr_d: {choice: [1.0e-6, 5.0e-4]}",
        trials=2, steps=120, eval_every=40,
        scheduler="{kind: pbt, perturbation_interval: 40, quantile_fraction: 0.5, resample_probability: 1.0}"))
    summary = run_sweep(sw.model_copy(update={"stopper": sw.stopper.model_copy(update={"enabled": False})}),
                        str(mnist_dir), out=str(tmp_path / "sweep"), log=quiet)
    results = []
    for trial in (tmp_path / "sweep" / "tune").glob("sweep_trial_*"):
        results += [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
    warm = [r for r in results if r.get("warm_started_at_step", 0) > 0]
    assert warm, "no trial was warm-started from another trial's checkpoint"
    # continued from the checkpoint's step, did not restart at 0 (a trial restored at its last
    # perturbation may report once at exactly that step before finishing)
    assert all(r["step"] >= r["warm_started_at_step"] for r in warm)
    assert list((tmp_path / "sweep" / "tune").glob("pbt_global.txt"))
    assert summary["trials"] == 2
