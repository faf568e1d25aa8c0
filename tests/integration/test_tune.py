"""Sweeps on a real local Ray cluster: unstable trials stopped with their reason, the best trial
promoted with lineage, PBT exploiting, and a killed driver resumed without rerunning trials."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latentforge.registry import list_entries, show
from latentforge.tune.space import load_sweep
from latentforge.tune.sweep import run_sweep

quiet = lambda *_: None  # noqa: E731

TINY = """
name: {name}
base: dcgan-mnist
overrides: {{model.g_width: 8, model.d_width: 8, model.z_dim: 16, train.global_batch_size: 32}}
space:
{space}
trials: {trials}
steps: {steps}
eval_every: 20
eval_samples: 200
report_every: 10
max_concurrent: 2
scheduler: {scheduler}
stopper: {{warmup_steps: 20, patience: 2}}
"""


def sweep_file(tmp_path, name="tiny", space="  gan.lr_g: {grid: [2.0e-4, 1.0]}", trials=1, steps=60,
               scheduler="{kind: fifo}"):
    f = tmp_path / f"{name}.yaml"
    f.write_text(TINY.format(name=name, space=space, trials=trials, steps=steps, scheduler=scheduler))
    return f


def test_unstable_trials_stop_early_with_a_reason_and_the_best_is_promoted(ray_cluster, mnist_dir, mnist_features, tmp_path):
    sw = load_sweep(sweep_file(tmp_path))
    summary = run_sweep(sw, str(mnist_dir), out=str(tmp_path / "sweep"), registry=str(tmp_path / "registry"), log=quiet)
    rows = {r["config"]["gan.lr_g"]: r for r in summary["rows"]}
    assert rows[1.0]["status"].startswith("stopped: ")
    assert rows[1.0]["status"].split(": ")[1] in ("vanishing_generator_gradient", "discriminator_wins", "non_finite", "mode_collapse")
    assert rows[1.0]["steps_used"] < 60 and rows[2e-4]["status"] == "completed" and rows[2e-4]["steps_used"] == 60
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


def test_pbt_exploits_and_warm_starts_with_new_hyperparameters(ray_cluster, mnist_dir, mnist_features, tmp_path):
    sw = load_sweep(sweep_file(
        tmp_path, name="pbt", space="  gan.lr_g: {choice: [1.0e-6, 5.0e-4]}\n  gan.lr_d: {choice: [1.0e-6, 5.0e-4]}",
        trials=2, steps=80, scheduler="{kind: pbt, perturbation_interval: 20, quantile_fraction: 0.5, resample_probability: 1.0}"))
    summary = run_sweep(sw.model_copy(update={"stopper": sw.stopper.model_copy(update={"enabled": False})}),
                        str(mnist_dir), out=str(tmp_path / "sweep"), log=quiet)
    results = []
    for trial in (tmp_path / "sweep" / "tune").glob("sweep_trial_*"):
        results += [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
    warm = [r for r in results if r.get("warm_started_at_step", 0) > 0]
    assert warm, "no trial was warm-started from another trial's checkpoint"
    assert all(r["step"] > r["warm_started_at_step"] for r in warm)  # continued, did not restart at 0
    assert list((tmp_path / "sweep" / "tune").glob("pbt_global.txt"))
    assert summary["trials"] == 2


def test_killed_sweep_driver_resumes_without_rerunning_finished_trials(mnist_dir, mnist_features, tmp_path):
    """Runs in its own processes (the driver owns its local cluster); no shared cluster here."""
    f = sweep_file(tmp_path, name="resume", space="  gan.lr_g: {grid: [1.0e-4, 2.0e-4, 3.0e-4]}", trials=1, steps=40)
    f.write_text(f.read_text().replace("max_concurrent: 2", "max_concurrent: 1"))
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "latentforge.cli", "tune", str(f), "--data", str(mnist_dir), "--out", str(out),
           "--no-promote"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)

    def finished_trials():
        done = []
        for trial in (out / "tune").glob("sweep_trial_*"):
            lines = (trial / "result.json").read_text().splitlines() if (trial / "result.json").exists() else []
            if lines and json.loads(lines[-1]).get("step") == 40:
                done.append(trial)
        return done

    deadline = time.time() + 300
    while time.time() < deadline and not finished_trials():
        time.sleep(1)
    first = finished_trials()
    assert first, "no trial finished before the deadline"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    subprocess.run(["pkill", "-9", "-f", "ray::"], check=False)  # the killed driver's cluster
    subprocess.run([sys.executable, "-c", "import ray; ray.shutdown()"], check=False)
    attempts_before = {t.name: sorted(p.name for p in (t / "train").iterdir()) for t in first}
    resumed = subprocess.run(cmd[:-1] + ["--resume", "--no-promote", "--json"], capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 3 and all(r["status"] == "completed" for r in summary["rows"])
    for t in first:  # finished trials were not rerun: no new Train attempt in their folders
        assert sorted(p.name for p in (t / "train").iterdir()) == attempts_before[t.name]
