"""A real head node started with `ray start`: the train job submitted through the Jobs API
succeeds and leaves a checkpoint in its storage folder; a job with a bad spec ends FAILED with a
readable reason; and every metric a dashboard panel queries is exported on the node's
Prometheus endpoint after a short training, a small sweep and a few Serve requests."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ports = {"gcs": free_port(), "dashboard": free_port(), "metrics": free_port()}
    # a throwaway head bound to 127.0.0.1 for this test only: no token (clusters in cluster/ use tokens)
    auth = {"RAY_AUTH_MODE": "disabled"}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    # report metrics every second (default 10 s) so that a short test run's gauges reach Prometheus
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_metrics_report_interval_ms": "1000"}
    # a node whose environment is active, as on a cluster image: `python` in job entrypoints is this
    # interpreter even when the tests run without an activated virtualenv (make test, CI)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run([RAY, "start", "--head", "--port", str(ports["gcs"]), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(ports["dashboard"]), "--metrics-export-port", str(ports["metrics"]),
                    "--num-cpus", "4", "--disable-usage-stats"], check=True, env=env, capture_output=True)
    yield {"address": f"127.0.0.1:{ports['gcs']}", "dashboard": f"http://127.0.0.1:{ports['dashboard']}",
           "metrics": f"http://127.0.0.1:{ports['metrics']}/metrics"}
    if ray.is_initialized():
        ray.shutdown()
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _wait(client, job_id, timeout=400):
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(2)
    raise AssertionError(f"job {job_id} did not finish: {client.get_job_logs(job_id)[-3000:]}")


def test_train_job_succeeds_and_a_bad_spec_fails_readably(head, mnist_dir, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    spec = tmp_path / "train.yaml"
    spec.write_text(yaml.safe_dump({
        "kind": "train", "preset": "dcgan-mnist", "data": {"source": "mnist5k", "dir": str(mnist_dir)},
        "overrides": {"model.g_width": 8, "model.d_width": 8, "train.global_batch_size": 16, "train.steps": 6,
                      "train.checkpoint_every": 3, "train.tracking": "none"},
        "workers": 2, "storage": str(tmp_path / "runs"), "name": "job-run"}))
    client = JobSubmissionClient(head["dashboard"])
    job = client.submit_job(entrypoint=f"python jobs/train.py {spec}",
                            runtime_env={"working_dir": str(ROOT), "excludes": ["docs/", "tests/", "*.png"]})
    status = _wait(client, job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert (tmp_path / "runs" / "job-run" / "step_000006" / "model.safetensors").is_file()
    assert "step      6/6" in logs  # progress reaches `ray job logs`

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"kind": "train", "preset": "dcgan-mnist", "data": {"dir": str(mnist_dir)},
                                   "workerz": 2}))
    job = client.submit_job(entrypoint=f"python jobs/train.py {bad}", runtime_env={"working_dir": str(ROOT),
                                                                                  "excludes": ["docs/", "tests/"]})
    assert _wait(client, job) == JobStatus.FAILED
    logs = client.get_job_logs(job)
    assert "bad spec" in logs and "workerz: unknown key" in logs


def _dashboard_metric_names() -> set[str]:
    names = set()
    for path in (ROOT / "dashboards").glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                names |= set(re.findall(r"\bray_[a-zA-Z0-9_]+", target["expr"]))
    return names


def test_every_dashboard_metric_is_exported(head, mnist_dir, mnist_features, tmp_path):
    import ray
    from ray import serve

    from helpers import sweep_file, tiny
    from latentforge.registry import promote
    from latentforge.serve.config import ServeConfig
    from latentforge.ray_cluster import ray_init
    from latentforge.train.ray_train import train_ray
    from latentforge.tune.space import load_sweep
    from latentforge.tune.sweep import run_sweep

    # gauges live as long as the process that sets them (a Train worker, a trial): scrape all along,
    # as Prometheus would, and check the union
    exported: set[str] = set()
    done = threading.Event()

    def scrape():
        while not done.is_set():
            try:
                text = requests.get(head["metrics"], timeout=10).text
                exported.update(re.findall(r"^(ray_[a-zA-Z0-9_]+)", text, re.M))
            except requests.RequestException:
                pass
            done.wait(1.0)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    ray_init(head["address"])
    # training with periodic evaluation (train, eval metrics)
    cfg = tiny("dcgan-mnist", train__steps=20, train__eval_every=10, train__eval_samples=100, train__checkpoint_every=20)
    result = train_ray(cfg, mnist_dir, workers=1, out="metrics-run", storage=str(tmp_path / "runs"), log=lambda *_: None)
    # a sweep with one unstable trial (tune metrics)
    sw = load_sweep(sweep_file(tmp_path, name="m", steps=30, eval_every=10))
    run_sweep(sw, str(mnist_dir), out=str(tmp_path / "sweep"), log=lambda *_: None)
    # serving (serve metrics)
    promote(result["run_dir"], str(tmp_path / "registry"), "m")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    from latentforge.serve.app import build_application

    serve.run(build_application(ServeConfig.model_validate({
        "registry": str(tmp_path / "registry"), "replica_cpus": 0.2,
        "generator": {"max_replicas": 1}, "editor": {"max_replicas": 1}})), name="latentforge", route_prefix="/")
    for i in range(5):
        assert requests.post(f"http://127.0.0.1:{port}/v1/models/m/generate", json={"n": 2, "seed": i}, timeout=60).ok
    wanted = _dashboard_metric_names()
    deadline = time.time() + 90
    while wanted - exported and time.time() < deadline:
        time.sleep(2)
    done.set()
    scraper.join()
    missing = wanted - exported
    serve.shutdown()
    ray.shutdown()
    assert not missing, f"dashboard panels query metrics that are not exported: {sorted(missing)}"


def test_serve_on_a_ray_start_head_takes_its_key_from_a_file_never_the_env(head, mnist_dir, tmp_path):
    """The key reaches the gateway replicas of a cluster started with `ray start` (whose workers
    never saw this process's environment) through the deployment's arguments."""
    import secrets

    import ray
    from ray import serve

    from helpers import tiny
    from latentforge.ray_cluster import ray_init
    from latentforge.registry import promote
    from latentforge.serve.config import ServeConfig
    from latentforge.serve.runner import start_serve
    from latentforge.train.local import train_local

    assert "LATENTFORGE_API_KEY" not in os.environ
    key = secrets.token_urlsafe(24)
    (tmp_path / "api-key").write_text(key + "\n")  # as a user would keep it, e.g. a mounted Secret
    train_local(tiny("dcgan-mnist", train__steps=2, train__checkpoint_every=2), mnist_dir, tmp_path / "run",
                log=lambda *_: None)
    promote(tmp_path / "run", str(tmp_path / "registry"), "gan")
    if ray.is_initialized():
        ray.shutdown()
    ray_init(head["address"])
    cfg = ServeConfig.model_validate({"registry": str(tmp_path / "registry"), "api_key_file": str(tmp_path / "api-key"),
                                      "replica_cpus": 0.2, "generator": {"min_replicas": 1, "max_replicas": 1},
                                      "editor": {"min_replicas": 1, "max_replicas": 1}})
    url = start_serve(cfg, port=free_port(), address=head["address"])
    try:
        assert requests.get(f"{url}/v1/models", timeout=60).status_code == 401
        listed = requests.get(f"{url}/v1/models", headers={"X-API-Key": key}, timeout=60)
        assert listed.status_code == 200 and [m["id"] for m in listed.json()["models"]] == ["gan"]
        made = requests.post(f"{url}/v1/models/gan/generate", json={"n": 2}, timeout=120,
                             headers={"Authorization": f"bearer {key}"})
        assert made.status_code == 200 and len(made.json()["images"]) == 2
    finally:
        serve.shutdown()
