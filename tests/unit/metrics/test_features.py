"""A feature network and its real statistics for a dataset larger than memory: the statistics
cover every image, read a chunk at a time; the network fits on a seeded sample."""

import torch

from latentforge.data.dataset import PreparedDataset
from latentforge.metrics import features
from latentforge.metrics.features import real_stats, train_feature_net


def test_statistics_read_in_chunks_equal_those_of_the_split_in_memory(mnist_dir, mnist_features):
    ds = PreparedDataset(mnist_dir)
    whole = real_stats(mnist_features.model, ds.load("val"), ds.num_classes)
    chunks = list(ds.chunks("val", rows=128))
    assert [len(c) for c in chunks][:3] == [128, 128, 128] and sum(len(c) for c in chunks) == 500
    parts = real_stats(mnist_features.model, iter(chunks), ds.num_classes)
    assert whole.keys() == parts.keys()
    for k in whole:
        torch.testing.assert_close(parts[k], whole[k], rtol=1e-5, atol=1e-5, msg=k)  # batching: float rounding


def test_a_split_above_the_fitting_budget_trains_on_a_sample_and_scores_every_image(mnist_dir, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    data = tmp_path / "mnist"
    shutil.copytree(mnist_dir, data, ignore=shutil.ignore_patterns("features", "grader"))
    monkeypatch.setattr(features, "FIT_BYTES", 1000 * 28 * 28)  # as 14 GB of FFHQ against 1 GB
    said = []
    train_feature_net(data, epochs=1, log=said.append)
    assert any("fits on a seeded sample of 1,000" in line for line in said)
    stats = load_file(str(data / "features" / "real_stats.safetensors"))
    assert stats["train.class_share"].sum().item() == 1.0
    # the class shares are those of all 4,500 training images, not of the sample
    labels = PreparedDataset(data).load("train").labels
    torch.testing.assert_close(stats["train.class_share"], torch.bincount(labels, minlength=10).double() / 4500)


def test_the_backbone_name_tells_feature_networks_of_one_dataset_apart(tmp_path):
    """Retrained with another seed, a dataset's feature network is another feature space: its name
    named only the dataset, so FIDs from the two passed for comparable."""
    from latentforge.data import prepare_dataset
    from latentforge.data.sources import SourceOptions

    out = tmp_path / "digits"
    prepare_dataset("digits", out, SourceOptions(count=80, size=16, channels=1), log=lambda *_: None)
    names = [train_feature_net(out, epochs=1, seed=seed, log=lambda *_: None)["backbone"] for seed in (0, 0, 1)]
    assert names[0] == names[1] != names[2]
    assert names[0].split("@")[1].split(".")[0] == names[2].split("@")[1].split(".")[0]  # the same dataset
