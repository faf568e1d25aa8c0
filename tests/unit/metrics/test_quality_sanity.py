"""Sanity that cannot be faked: the dataset's own feature network must rank obviously better
and worse image sets the right way round."""

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny
from latentforge.data.spec import DataSpec
from latentforge.builders import build_gan
from latentforge.data import PreparedDataset
from latentforge.images import to_model_range
from latentforge.metrics.evaluate import distribution_metrics, evaluate
from latentforge.train.local import train_local

quiet = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def val_images(mnist_dir):
    return to_model_range(PreparedDataset(mnist_dir).load("val").images)


def test_feature_classifier_reaches_97_percent(mnist_features):
    assert mnist_features.val_accuracy >= 0.97
    assert mnist_features.backbone.startswith("lf-classifier@")


def test_real_validation_scores_far_better_than_an_untrained_generator(mnist_dir, mnist_features, val_images):
    real = distribution_metrics(val_images, mnist_features, "train")
    cfg = tiny("dcgan-mnist")
    torch.manual_seed(0)
    g, _ = build_gan(cfg.model, DataSpec.from_dataset(PreparedDataset(mnist_dir)))
    with torch.no_grad():
        fake = g.eval()(torch.randn(500, cfg.model.z_dim))
    untrained = distribution_metrics(fake, mnist_features, "train")
    assert real["fid"] * 20 < untrained["fid"], (real["fid"], untrained["fid"])
    assert real["recall"] > 0.8 and untrained["recall"] < 0.1
    assert real["class_coverage"] == 1.0


def _blur(x, sigma):
    k = torch.arange(7, dtype=torch.float32) - 3
    g = torch.exp(-(k**2) / (2 * sigma**2))
    g = (g / g.sum())
    w = (g[:, None] * g[None, :])[None, None]
    return F.conv2d(F.pad(x, (3, 3, 3, 3), mode="replicate"), w)


def test_fid_rises_monotonically_with_noise_and_blur(mnist_features, val_images):
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(val_images.shape, generator=gen)
    fid_noise = [distribution_metrics((val_images + s * noise).clamp(-1, 1), mnist_features)["fid"]
                 for s in (0.0, 0.1, 0.2, 0.4, 0.8)]
    fid_blur = [distribution_metrics(val_images if s == 0 else _blur(val_images, s), mnist_features)["fid"]
                for s in (0, 0.7, 1.2, 2.0)]
    assert all(a < b for a, b in zip(fid_noise, fid_noise[1:])), fid_noise
    assert all(a < b for a, b in zip(fid_blur, fid_blur[1:])), fid_blur


def test_collapsed_generator_covers_one_class_and_has_low_recall(mnist_dir, mnist_features, val_images):
    labels = PreparedDataset(mnist_dir).load("val").labels
    threes = val_images[labels == 3]
    collapsed = threes[torch.arange(500) % len(threes)]  # "generates" only 3s
    m = distribution_metrics(collapsed, mnist_features)
    assert m["class_coverage"] == pytest.approx(0.1)
    assert m["recall"] < 0.25 and m["label_kl"] > 1.5


def test_generator_trained_longer_scores_better(mnist_dir, mnist_features, tmp_path):
    cfg = tiny("dcgan-mnist", train__steps=300, train__checkpoint_every=60, train__num_to_keep=10,
               model__g_width=16, model__d_width=16, model__z_dim=32, train__global_batch_size=64)
    train_local(cfg, mnist_dir, tmp_path, log=quiet)
    early = evaluate(tmp_path / "step_000060", mnist_dir, samples=1000, net=mnist_features, log=quiet)
    late = evaluate(tmp_path / "step_000300", mnist_dir, samples=1000, net=mnist_features, log=quiet)
    key = "fid1k_train_lfclassifier"
    assert late[key] < 0.8 * early[key], (early[key], late[key])
    assert late["backbone"] == early["backbone"] == mnist_features.backbone
    assert late["samples"] == 1000 and late["step"] == 300
