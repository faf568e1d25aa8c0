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
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].startswith("python jobs/train.py")


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
