"""What a finished sweep may promote, and how many trials it counts (no Ray)."""

from pathlib import Path

import pytest

from latentforge.registry import UnknownModel
from latentforge.tune.space import load_sweep
from latentforge.tune.sweep import _may_replace, trial_count

SWEEP = """
name: s
base: dcgan-mnist
space:
  gan.lr_g: {choice: [1.0e-4, 2.0e-4]}
steps: 50
eval_every: 10
"""


@pytest.fixture
def sweep(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(SWEEP)
    return load_sweep(f)


def _registered(monkeypatch, entry):
    def show(registry, name, list_known=True):
        if entry is None:
            raise UnknownModel(f"no model {name!r}")
        return entry
    monkeypatch.setattr("latentforge.registry.show", show)


@pytest.mark.parametrize("entry, ours, allowed", [
    (None, 30.0, True),  # a free name
    ({"metrics": {"fid": 20.0}, "lineage": {"sweep_dir": "THIS"}}, 30.0, True),  # this sweep's own, resumed
    ({"metrics": {"fid": 40.0}, "lineage": {"sweep_dir": "/other"}}, 30.0, True),  # beaten
    ({"metrics": {"fid": 20.0}, "lineage": {"sweep_dir": "/other"}}, 30.0, False),  # better: kept
    ({"metrics": {}, "lineage": {}}, 30.0, False),  # promoted by hand, nothing to compare: kept
])
def test_a_sweep_replaces_a_registered_model_only_when_it_may(monkeypatch, sweep, tmp_path, entry, ours, allowed):
    """Running the same sweep YAML again replaced the promoted model even when its best was worse,
    and replaced a model promoted by hand under that name."""
    if entry and entry["lineage"].get("sweep_dir") == "THIS":
        entry["lineage"]["sweep_dir"] = str(tmp_path)
    _registered(monkeypatch, entry)
    lines = []
    assert _may_replace(sweep, "reg", ours, Path(tmp_path), lines.append) is allowed
    if not allowed:
        assert "kept 's' in reg" in lines[0] and "registry promote CHECKPOINT --registry reg --name s --overwrite" in lines[0]


def test_a_grid_multiplies_the_trials_counted(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text(SWEEP.replace("{choice: [1.0e-4, 2.0e-4]}", "{grid: [1.0e-4, 2.0e-4, 3.0e-4]}\n  gan.beta1: {grid: [0.0, 0.5]}")
                 + "trials: 2\n")
    assert trial_count(load_sweep(f)) == 12
