"""Every YAML in cluster/ and jobs/ is valid: the launcher file against the autoscaler schema in
the Ray wheel, KubeRay manifests for required fields and one consistent Ray version and image,
the RayService's embedded Serve config (and cluster/serve-config.yaml) against Ray's own Serve
schema and our ServeConfig, and every job spec and sweep against their models."""

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))


def test_launcher_config_validates_against_the_autoscaler_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster" / "ray-cluster-aws.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["gpu_workers"]["resources"]["GPU"] == 1
    assert config["available_node_types"]["gpu_workers"]["max_workers"] > config["available_node_types"]["gpu_workers"]["min_workers"]
    assert any("pip install" in c for c in config["setup_commands"])


def _cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def _images(spec: dict) -> list[str]:
    groups = [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", [])
    return [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests_have_required_fields_and_one_ray_version(path):
    import ray

    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in ("RayCluster", "RayJob", "RayService")
    assert doc["metadata"]["name"]
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__, "rayVersion must match the Ray the package is tested with"
    assert "headGroupSpec" in spec and spec["workerGroupSpecs"]
    assert spec.get("authOptions", {}).get("mode") == "token", "clusters must require Ray's token authentication"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    images = _images(spec)
    assert len(set(images)) == 1, images
    assert f"ray{ray.__version__}" in images[0]
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-", dockerfile, re.M)
    for group in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            assert not c["image"].endswith(":latest") and ":" in c["image"], "images are pinned to a version"
            assert c.get("imagePullPolicy") == "IfNotPresent", "a pinned tag is pulled once, never re-resolved"
    if doc["kind"] == "RayJob":
        from latentforge.jobs import load_spec
        from latentforge.storage import is_uri

        entry = doc["spec"]["entrypoint"].split()
        assert entry[:2] == ["python", "jobs/train.py"]
        job = load_spec("train", str(ROOT / entry[2]))
        # the cluster (and its pods' disks) is deleted after the job: results must outlive it
        assert is_uri(job.storage) and not job.storage.startswith("file://"), job.storage


def _check_serve_config(config: dict):
    from ray.serve.schema import ServeDeploySchema

    from latentforge.serve.config import ServeConfig

    ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(config)
    for app in config["applications"]:
        assert app["import_path"] == "latentforge.serve.app:build_app"
        ServeConfig.model_validate(app.get("args", {}))


def test_rayservice_embeds_a_valid_serve_config():
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    _check_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]))


def test_serve_config_file_is_valid():
    _check_serve_config(yaml.safe_load((ROOT / "cluster" / "serve-config.yaml").read_text()))


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "specs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_specs_are_valid(path):
    from latentforge.jobs import load_spec

    kind = yaml.safe_load(path.read_text())["kind"]
    assert load_spec(kind, str(path)).kind == kind


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_sweeps_are_valid(path):
    from latentforge.tune.space import load_sweep

    assert load_sweep(path).trials >= 1


def test_dashboards_are_grafana_json_with_prometheus_queries():
    for path in (ROOT / "dashboards").glob("*.json"):
        dash = json.loads(path.read_text())
        assert dash["title"] and dash["panels"]
        for panel in dash["panels"]:
            assert panel["targets"] and all("ray_" in t["expr"] for t in panel["targets"]), panel["title"]


def test_no_dashboard_is_open_without_authentication():
    """A dashboard (and its job-submission API) on 0.0.0.0 is only allowed where Ray's token
    authentication guards it (the KubeRay manifests, checked above); the launcher keeps it on the
    head's loopback, reached through `ray dashboard`'s SSH tunnel."""
    launcher = (ROOT / "cluster" / "ray-cluster-aws.yaml").read_text()
    starts = yaml.safe_load(launcher)["head_start_ray_commands"]
    assert any("--dashboard-host=127.0.0.1" in c for c in starts) and "0.0.0.0" not in launcher
    assert "0.0.0.0" not in (ROOT / "cluster" / "local-multinode.sh").read_text()
    for path in KUBERAY:
        doc = yaml.safe_load(path.read_text())
        if _cluster_spec(doc)["headGroupSpec"]["rayStartParams"].get("dashboard-host") == "0.0.0.0":
            assert _cluster_spec(doc).get("authOptions", {}).get("mode") == "token", path.name


def test_docker_context_leaves_out_environments_history_runs_and_secrets():
    import fnmatch

    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(parts[0], p) or
                   (p.startswith("**/") and any(fnmatch.fnmatch(x, p[3:]) for x in parts)) for p in patterns)

    for path in (".venv/bin/python", ".git/config", "runs/x/model.safetensors", "demo-output/grid.png",
                 "platform/latentforge/__pycache__/cli.cpython-311.pyc", "wandb/run-1/files", "secret/api-key"):
        assert ignored(path), path
    for path in ("platform/latentforge/cli.py", "pyproject.toml", "jobs/train.py", "cluster/Dockerfile",
                 "platform/latentforge/presets/dcgan-mnist.yaml", "README.md"):
        assert not ignored(path), path
