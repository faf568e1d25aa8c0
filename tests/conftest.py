"""Shared fixtures: prepared datasets made once per session, tiny configs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config, items):
    """Mark every test with its tier (the folder it lives in), so `pytest -m unit` selects it."""
    for item in items:
        parts = item.path.relative_to(config.rootpath).parts
        tier = next((p for p in parts if p in TIERS), None)
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))

@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    """mnist5k prepared once: 4,500 train / 500 val, 10 classes, 1x28x28."""
    from latentforge.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "mnist5k"
    prepare_dataset("mnist5k", out, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """600 procedural shapes at 16 px (3 classes, 4 factors)."""
    from latentforge.data.prepare import prepare_dataset
    from latentforge.data.sources import SourceOptions

    out = tmp_path_factory.mktemp("data") / "shapes"
    prepare_dataset("shapes", out, SourceOptions(count=600, size=16), log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def mnist_features(mnist_dir):
    """mnist5k's feature network (trained once, about 20 s) and its real statistics."""
    from latentforge.metrics.features import ensure_feature_net

    return ensure_feature_net(mnist_dir, log=lambda *_: None)
