"""A sweep driver killed mid-sweep resumes with --resume; finished trials are not rerun.

Its own module: the driver is a subprocess that owns its local Ray cluster, and killing it
must not touch a cluster shared with other tests."""

import json
import os
import signal
import subprocess
import sys
import time

from helpers import sweep_file


def test_killed_sweep_driver_resumes_without_rerunning_finished_trials(mnist_dir, mnist_features, tmp_path):
    """Runs in its own processes (the driver owns its local cluster); no shared cluster here."""
    f = sweep_file(tmp_path, name="resume", space="  gan.lr_g: {grid: [1.0e-4, 2.0e-4, 3.0e-4]}", trials=1, steps=40,
                   eval_every=20)
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

    def recorded_terminated():
        states = sorted((out / "tune").glob("experiment_state-*.json"))
        return states and '\\"status\\": \\"TERMINATED\\"' in states[-1].read_text()

    deadline = time.time() + 300
    while time.time() < deadline and not (finished_trials() and recorded_terminated()):
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
