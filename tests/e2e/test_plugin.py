"""A user's own architecture, end to end: defined in a module outside the package, trained from a
config that names it, reloaded in fresh processes, generated from and served (generate and an
edit), and refused with a clear message wherever the module is not allowed."""

import os
import subprocess
import sys

import pytest
import torch
import yaml

from helpers import PLUGIN_SOURCE
from latentforge.models import plugins

MODULE = "lf_example_plugin"


def lf(*args, env=None):
    return subprocess.run([sys.executable, "-m", "latentforge.cli", *map(str, args)], capture_output=True, text=True,
                          env=env)


@pytest.fixture(scope="module")
def plugin_run(mnist_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    (root / "plug").mkdir()
    (root / "plug" / f"{MODULE}.py").write_text(PLUGIN_SOURCE)
    config = {
        "name": "my-tiny-gan", "algorithm": "gan",
        "model": {"arch": f"{MODULE}:TinyGenerator", "z_dim": 8, "g_width": 32, "d_width": 32},
        "gan": {"loss": "ns", "lr_g": 1e-3, "lr_d": 1e-3},
        "train": {"steps": 20, "global_batch_size": 16, "tracking": "none", "checkpoint_every": 20, "sample_every": 20,
                  "log_every": 10},
    }
    (root / "mine.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "plug"), os.environ.get("PYTHONPATH", "")])}
    p = lf("train", root / "mine.yaml", "--data", mnist_dir, "--workers", "0", "--out", root / "run", env=env)
    assert p.returncode == 0, p.stderr
    return root, env


def test_loading_refuses_the_module_until_it_is_allowed(plugin_run):
    root, env = plugin_run
    p = lf("generate", root / "run", "--n", "4", "--out", root / "x.png", env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"plug-in module '{MODULE}', which is not allowed" in p.stderr and f"--allow-plugin {MODULE}" in p.stderr
    assert not (root / "x.png").exists()


def test_an_allowed_plugin_generates_the_same_bytes_in_every_fresh_process(plugin_run):
    root, env = plugin_run
    for name in ("a.png", "b.png"):
        p = lf("--allow-plugin", MODULE, "generate", root / "run", "--n", "8", "--seed", "3", "--out", root / name, env=env)
        assert p.returncode == 0, p.stderr
    assert (root / "a.png").read_bytes() == (root / "b.png").read_bytes()


def test_an_allowed_plugin_that_is_not_installed_says_so(plugin_run):
    root, _ = plugin_run
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = lf("--allow-plugin", MODULE, "generate", root / "run", "--n", "4", "--out", root / "y.png", env=env)
    assert p.returncode == 2 and f"cannot import plug-in module '{MODULE}'" in p.stderr and "Traceback" not in p.stderr


def test_a_plugin_model_is_served_generate_and_edit(plugin_run, mnist_dir, monkeypatch):
    from latentforge.registry import local_checkpoint, promote
    from latentforge.serve.engine import ModelRuntime
    from latentforge.serve.schemas import EditRequest, GenerateRequest

    root, _ = plugin_run
    monkeypatch.syspath_prepend(str(root / "plug"))
    monkeypatch.setattr(plugins, "_allowed", set())
    with pytest.raises(Exception, match="not allowed"):
        promote(root / "run", str(root / "registry"), "mine")
    plugins.allow_plugins([MODULE])  # what a Serve config's allow_plugins does in each replica
    promote(root / "run", str(root / "registry"), "mine")
    runtime = ModelRuntime("mine", local_checkpoint(str(root / "registry"), "mine"))
    a = runtime.generate_many([GenerateRequest(n=2, seed=5)])[0]
    assert a == runtime.generate_many([GenerateRequest(n=2, seed=5)])[0] and len(a["images"]) == 2
    assert {"sefa:0", "pca:0"} <= set(runtime.directions)  # from the plug-in's first_layer / first_layer_weight
    direction = sorted(runtime.directions)[0]
    e = runtime.edit(EditRequest(source={"seed": 3}, direction=direction, alpha=2.0))
    z0 = torch.tensor(runtime.generate_many([GenerateRequest(n=1, seed=3)])[0]["latents"][0])
    assert torch.tensor(e["latents"][0]).sub(z0).norm().item() == pytest.approx(2.0, rel=1e-4)
    sys.modules.pop(MODULE, None)
