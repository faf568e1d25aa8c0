"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): a 2-worker training whose
workers land on different nodes completes."""

import json

import pytest

from helpers import tiny
from latentforge.checkpoint import load_checkpoint
from latentforge.train.ray_train import train_ray


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True})
    c.add_node(num_cpus=1)
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


def test_two_workers_on_two_nodes(cluster, mnist_dir, tmp_path):
    cfg = tiny("dcgan-mnist", train__steps=4, train__checkpoint_every=4)
    result = train_ray(cfg, mnist_dir, workers=2, out="multi", storage=str(tmp_path), data_loader="memory",
                       log=lambda *_: None)
    assert result["step"] == 4 and load_checkpoint(tmp_path / "multi").step == 4
    nodes = {json.loads(p.read_text())["node_id"] for p in (tmp_path / "multi" / "workers").iterdir()}
    assert len(nodes) == 2, "both workers ran on the same node"
