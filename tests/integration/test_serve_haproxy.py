"""`latentforge serve --request-path haproxy`: HAProxy in front of the ingress replicas (Ray
Serve's direct ingress), the path bench serve measured fastest. The same API answers through it,
the key is still enforced, and HAProxy is really the one answering."""

import os
import secrets
from pathlib import Path

import pytest
import requests

from latentforge.errors import ConfigError
from latentforge.serve.config import ServeConfig

KEY = secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import ray

    from latentforge.bench.serve_bench import untrained_checkpoint
    from latentforge.registry import promote
    from latentforge.serve.runner import start_serve

    root = tmp_path_factory.mktemp("haproxy")
    promote(untrained_checkpoint(root / "ckpt"), str(root / "registry"), "gan")
    if ray.is_initialized():
        ray.shutdown()
    saved = dict(os.environ)
    cfg = ServeConfig.model_validate({"registry": str(root / "registry"), "api_key": KEY, "replica_cpus": 0.2,
                                      "generator": {"min_replicas": 1, "max_replicas": 1},
                                      "editor": {"min_replicas": 1, "max_replicas": 1}})
    with pytest.raises(ConfigError, match="cluster this command starts"):
        start_serve(cfg, address="127.0.0.1:1", request_path="haproxy")  # cannot change a running cluster's path
    try:
        yield start_serve(cfg, port=18431, num_cpus=4, request_path="haproxy")
    finally:
        ray.shutdown()  # ends HAProxy with its actors (checked: no haproxy process is left); serve.shutdown() waited 30 s
        os.environ.clear()
        os.environ.update(saved)


def test_the_api_answers_through_haproxy_with_the_key_enforced(server):
    names = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            names.append(comm.read_text().strip())
        except OSError:
            pass  # a process that ended meanwhile
    assert any("haproxy" in n for n in names), "no HAProxy process: the request path was not applied"
    # no polling here: start_serve returns only once HAProxy lists the route (CI once got a 404 before)
    r = requests.post(f"{server}/v1/models/gan/generate", json={"n": 3, "seed": 4}, headers={"X-API-Key": KEY}, timeout=60)
    assert r.status_code == 200 and len(r.json()["images"]) == 3, r.text[:300]
    again = requests.post(f"{server}/v1/models/gan/generate", json={"n": 3, "seed": 4}, headers={"X-API-Key": KEY}, timeout=60)
    assert again.json()["images"] == r.json()["images"]  # same seed, same images
    edit = requests.post(f"{server}/v1/models/gan/edit", json={"source": {"seed": 1}, "direction": "sefa:0", "alpha": 2},
                         headers={"X-API-Key": KEY}, timeout=60)
    assert edit.status_code == 200, edit.text[:300]
    for headers in ({}, {"X-API-Key": "wrong" * 5}):
        denied = requests.post(f"{server}/v1/models/gan/generate", json={"n": 1}, headers=headers, timeout=60)
        assert denied.status_code == 401 and set(denied.json()) == {"error"}
    assert requests.get(f"{server}/healthz", timeout=60).status_code == 200
