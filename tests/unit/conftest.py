"""Unit tests never start a Ray cluster (Ray Serve's own unit tests guard the same way): a test
that reaches `ray.init`, directly or through Ray Data/Train/Serve auto-initialisation, fails with
a message saying where it belongs."""

import pytest

REFUSAL = ("a unit test tried to start a Ray cluster (ray.init); unit tests cover the Ray-free core. "
           "Test the pure function instead, or move the test to tests/integration/ and use the ray_cluster fixture")


@pytest.fixture(autouse=True, scope="session")
def _no_ray_cluster():
    import ray
    from ray._private import worker

    def refuse(*args, **kwargs):
        raise RuntimeError(REFUSAL)

    patch = pytest.MonkeyPatch()
    patch.setattr(ray, "init", refuse)
    patch.setattr(worker, "init", refuse)
    yield
    patch.undo()
