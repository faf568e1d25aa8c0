"""The CLI as a user runs it (subprocesses)."""

import json
import subprocess
import sys

import pytest


def lf(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "latentforge.cli", *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def trained(mnist_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    lf("train", "dcgan-mnist", "--data", mnist_dir, "--workers", "0", "--steps", "3", "--out", run,
       "--set", "model.g_width=8", "--set", "model.d_width=8", "--set", "train.global_batch_size=16")
    return run


def test_train_writes_a_run_and_generate_is_byte_identical(trained, tmp_path):
    assert (trained / "step_000003" / "model.safetensors").is_file()
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    lf("generate", trained, "--n", "16", "--seed", "7", "--out", a)
    lf("generate", trained, "--n", "16", "--seed", "7", "--out", b)
    lf("generate", trained, "--n", "16", "--seed", "8", "--out", c)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_fresh_run_refuses_to_reuse_a_folder(trained, mnist_dir):
    p = lf("train", "dcgan-mnist", "--data", mnist_dir, "--workers", "0", "--steps", "1", "--out", trained, check=False)
    assert p.returncode == 2 and "--resume" in p.stderr and "Traceback" not in p.stderr


def test_errors_are_clear_and_non_zero(tmp_path, mnist_dir):
    p = lf("train", "dcgan-mnist", "--data", tmp_path / "missing", "--workers", "0", "--out", tmp_path / "r", check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr and "data prepare" in p.stderr
    p = lf("train", "dcgan-mnistt", "--data", mnist_dir, "--workers", "0", check=False)
    assert p.returncode == 2 and "unknown preset" in p.stderr and "dcgan-mnist" in p.stderr
    p = lf("train", "dcgan-mnist", "--data", mnist_dir, "--workers", "0", "--set", "gan.loss=hinge2", check=False)
    assert p.returncode == 2 and "gan.loss" in p.stderr
    p = lf("data", "prepare", "imagenet", "--out", tmp_path / "x", check=False)
    assert p.returncode == 2 and "unknown data source" in p.stderr
    p = lf("generate", tmp_path, "--n", "4", "--out", tmp_path / "x.png", check=False)
    assert p.returncode == 2 and "holds no checkpoint" in p.stderr


def test_prepare_json_summary(tmp_path):
    p = lf("data", "prepare", "digits", "--out", tmp_path / "d", "--no-features", "--json")
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["num_images"] == 1797 and summary["num_classes"] == 10


def test_evaluate_json_names_backbone_samples_and_seed(trained, mnist_dir, mnist_features):
    p = lf("evaluate", trained, "--data", mnist_dir, "--samples", "300", "--seed", "4", "--json")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["backbone"] == mnist_features.backbone and result["samples"] == 300 and result["seed"] == 4
    from latentforge.metrics.registry import METRICS, metric_values

    assert result["protocol"] == "300_train_lfclassifier"
    assert {"fid", "kid", "precision", "recall", "density", "coverage", "class_coverage", "inception_score"} <= set(metric_values(result))
    metrics = {k for k in result if any(k.startswith(name) for name in METRICS)}
    assert metrics and all(k.endswith("300_train_lfclassifier") for k in metrics), metrics  # every metric names its protocol


def test_serve_config_errors_name_the_field_before_ray_starts(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("limits: {max_nn: 3}\n")
    p = lf("serve", "--config", bad, "--registry", tmp_path / "registry", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "limits.max_nn" in p.stderr and "unknown key" in p.stderr and str(bad) in p.stderr
    assert "serving registry" not in p.stdout  # it stopped before deploying anything


def test_generate_refuses_what_the_api_refuses(trained, tmp_path):
    for flags, message in ((["--truncation", "nan"], "--truncation nan"), (["--truncation", "-1"], "--truncation -1"),
                           (["--seed", str(2**63)], "out of range"), (["--seed", "-1"], "out of range"),
                           (["--seed", "1.5"], "not a whole number")):
        p = lf("generate", trained, "--out", tmp_path / "x.png", *flags, check=False)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not (tmp_path / "x.png").exists()


def test_serve_refuses_a_public_host_without_a_key_and_never_takes_one_on_argv(tmp_path):
    p = lf("serve", "--registry", tmp_path / "registry", "--host", "0.0.0.0", check=False)
    assert p.returncode == 2 and "without an API key" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = lf("serve", "--registry", tmp_path / "registry", "--api-key", "x" * 20, check=False)
    assert p.returncode == 2 and "unrecognized arguments: --api-key" in p.stderr
