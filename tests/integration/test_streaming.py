"""The default data path streams: a prepared split several times larger than the cluster's whole
object store trains through Ray Train (its own small cluster, hence its own module)."""

import pytest

from helpers import tiny


@pytest.fixture(scope="module")
def small_store_cluster():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, object_store_memory=80 * 1024 * 1024, include_dashboard=True, dashboard_host="127.0.0.1")
    yield ray
    ray.shutdown()


def test_a_split_larger_than_the_object_store_streams_through_ray_train(small_store_cluster, tmp_path):
    from latentforge.checkpoint import load_checkpoint
    from latentforge.data.dataset import PreparedDataset
    from latentforge.data.prepare import prepare_dataset
    from latentforge.data.sources import SourceOptions
    from latentforge.train.ray_train import train_ray

    data = tmp_path / "shapes64"
    prepare_dataset("shapes", data, SourceOptions(count=8000, size=64), log=lambda *_: None)
    ds = PreparedDataset(data)
    c, h, w = ds.image_shape
    rows = ds.manifest["splits"]["train"]["count"]
    object_store = small_store_cluster.available_resources()["object_store_memory"]
    assert rows * c * h * w > object_store  # the raw pixels alone exceed the object store (decoded: 4x more)
    cfg = tiny("dcgan-mnist", train__steps=4, train__checkpoint_every=4, train__shuffle_window_mb=8,
               train__global_batch_size=16)
    result = train_ray(cfg, data, workers=2, out="big", storage=str(tmp_path / "runs"), log=lambda *_: None)
    assert result["step"] == 4
    assert load_checkpoint(tmp_path / "runs" / "big").data.image_shape == (3, 64, 64)
