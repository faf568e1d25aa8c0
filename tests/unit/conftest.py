"""Unit tests never start a Ray cluster (Ray Serve's own unit tests guard the same way): a test
that reaches `ray.init`, directly or through Ray Data/Train/Serve auto-initialisation, fails with
a message saying where it belongs."""

import pytest

REFUSAL = ("a unit test tried to start a Ray cluster (ray.init); unit tests cover the Ray-free core. "
           "Test the pure function instead, or move the test to tests/integration/ and use the ray_cluster fixture")


@pytest.fixture(autouse=True)
def _no_ray_cluster(monkeypatch):
    """Per test, so that the refusal ends with the unit tests whatever order a run takes."""
    import ray
    from ray._private import worker

    def refuse(*args, **kwargs):
        raise RuntimeError(REFUSAL)

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(worker, "init", refuse)
