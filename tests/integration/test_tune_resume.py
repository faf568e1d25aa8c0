"""A sweep driver killed mid-sweep resumes with --resume; finished trials are not rerun.

Its own module: the driver is a subprocess that owns its local Ray cluster, and killing it
must not touch a cluster shared with other tests."""

import json
import os
import signal
import subprocess
import sys
import time

try:
    import psutil
except ImportError:  # Ray ships its own copy (ray/thirdparty_files) and puts it on sys.path when imported
    import ray  # noqa: F401
    import psutil

from helpers import sweep_file


def _in_session(session_id: int) -> dict[int, psutil.Process]:
    """Processes whose session is `session_id` (its leader excluded), by pid."""
    found = {}
    for p in psutil.process_iter():
        try:
            if p.pid != session_id and os.getsid(p.pid) == session_id:
                found[p.pid] = p
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            continue
    return found


def _kill(procs: dict[int, psutil.Process]) -> None:
    for p in procs.values():
        try:
            p.kill()  # psutil refuses if the pid now names another process (pid reuse)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass


def _kill_driver_and_its_cluster(driver: subprocess.Popen) -> None:
    """SIGKILL the sweep driver and every process it started (its local Ray cluster), by pid.

    Only this test's processes: killing by name (every `ray::` process) would also kill any other
    Ray on the host, a user's included. The driver was started in a session of its own, so its
    processes are found two ways: the process tree, collected before the driver dies and its
    children are reparented, and the session id, which Ray's gcs/raylet keep when reparented.
    """
    try:
        procs = {p.pid: p for p in psutil.Process(driver.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        procs = {}
    procs |= _in_session(driver.pid)
    try:
        os.killpg(driver.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    driver.wait()
    _kill(procs)
    stragglers = _in_session(driver.pid)  # started between the scan and the kill (e.g. a new Ray worker)
    _kill(stragglers)
    # Brief wait only: reparented processes are reaped by init, and a zombie still counts as running.
    psutil.wait_procs(list((procs | stragglers).values()), timeout=10)


def test_killed_sweep_driver_resumes_without_rerunning_finished_trials(mnist_dir, mnist_features, tmp_path):
    """Runs in its own processes (the driver owns its local cluster); no shared cluster here."""
    f = sweep_file(tmp_path, name="resume", space="  gan.lr_g: {grid: [1.0e-4, 2.0e-4]}", trials=1, steps=40,
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
    _kill_driver_and_its_cluster(driver)
    subprocess.run([sys.executable, "-c", "import ray; ray.shutdown()"], check=False)
    attempts_before = {t.name: sorted(p.name for p in (t / "train").iterdir()) for t in first}
    resumed = subprocess.run(cmd[:-1] + ["--resume", "--no-promote", "--json"], capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 2 and all(r["status"] == "completed" for r in summary["rows"])
    for t in first:  # finished trials were not rerun: no new Train attempt in their folders
        assert sorted(p.name for p in (t / "train").iterdir()) == attempts_before[t.name]
