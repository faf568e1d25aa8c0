import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster per test module (4 logical CPUs on 2 cores, as Ray's own tests do)."""
    import ray

    from latentforge.ray_cluster import ray_init

    if ray.is_initialized():
        ray.shutdown()
    ray_init(num_cpus=4)
    yield ray
    ray.shutdown()
