"""The metric registry: one place that names every metric, its direction and requirements, and
derives the lists other parts used to keep by hand; protocol-named keys round-trip."""

import numpy as np
import pytest
import torch

from latentforge.metrics import registry
from latentforge.metrics.distribution import frechet_distance, gaussian_stats, precision_recall
from latentforge.metrics.features import RealStats
from latentforge.metrics.registry import (
    METRICS,
    REPORTED_METRICS,
    SampleSet,
    backbone_tag,
    distribution_values,
    metric_values,
    protocol_key,
    protocol_suffix,
    register_metric,
)


def _real(n=400, d=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g)
    mu, sigma = gaussian_stats(feats)
    labels = torch.arange(n) % classes
    return RealStats(torch.from_numpy(np.asarray(mu)), torch.from_numpy(np.asarray(sigma)), feats, labels,
                     torch.full((classes,), 1 / classes))


def test_every_metric_is_well_formed_and_the_derived_lists_agree():
    for m in METRICS.values():
        assert m.better in ("min", "max") and m.column and m.description
        assert m.fmt.format(1.2345)
    assert {"fid", "kid", "precision", "recall", "class_coverage", "recon_psnr", "val_neg_elbo"} <= set(REPORTED_METRICS)
    assert REPORTED_METRICS["fid"] == "min" and REPORTED_METRICS["recall"] == "max"
    assert set(registry.VAE_ONLY_METRICS) == {m.name for m in METRICS.values() if m.compute is None}
    assert "class_accuracy" in registry.CONDITIONAL_MODEL_METRICS and "class_accuracy" in registry.LABELLED_DATA_METRICS
    from latentforge.train.ray_metrics import EVAL_KEYS

    assert set(EVAL_KEYS) == set(REPORTED_METRICS)  # a gauge for every metric a run reports
    with pytest.raises(ValueError, match="registered twice"):
        register_metric("fid", "min", "FID")(lambda s: 0.0)
    with pytest.raises(ValueError, match="lower-case"):
        register_metric("FID-5k", "min", "FID")


def test_distribution_values_compute_what_the_functions_do_and_respect_requirements():
    real = _real()
    g = torch.Generator().manual_seed(1)
    fake = torch.randn(300, 8, generator=g) + 0.3
    probs = torch.softmax(torch.randn(300, 4, generator=g), 1)
    values = distribution_values(SampleSet(real, fake, probs, seed=0, requested=torch.arange(300) % 4))
    mu, sigma = gaussian_stats(fake)
    assert values["fid"] == pytest.approx(frechet_distance(mu, sigma, real.mu.numpy(), real.sigma.numpy()))
    p, r = precision_recall(real.features[:300], fake, k=3)  # equal counts (SampleSet.knn)
    assert (values["precision"], values["recall"]) == (p, r)
    assert {"kid_std", "inception_score_std", "class_coverage", "label_kl", "class_accuracy"} <= set(values)
    # no classifier: no class metrics; unconditional: no class accuracy
    bare = distribution_values(SampleSet(real, fake, None))
    assert "inception_score" not in bare and "class_coverage" not in bare and bare["fid"] == values["fid"]
    unconditional = distribution_values(SampleSet(real, fake, probs))
    assert "class_accuracy" not in unconditional and "class_coverage" in unconditional
    # a classifier whose classes are not the dataset's (Inception's 1,000): IS, but no class metrics
    other = distribution_values(SampleSet(real, fake, torch.softmax(torch.randn(300, 10, generator=g), 1)))
    assert "inception_score" in other and "class_coverage" not in other


def test_protocol_names_state_samples_split_and_backbone_and_round_trip():
    assert backbone_tag("lf-classifier@3f2a9c1b0d4e") == "lfclassifier"
    assert backbone_tag("lf-autoencoder@3f2a9c1b0d4e") == "lfautoencoder"
    assert backbone_tag("torchvision-inception-v3-legacy@ab12") == "inceptionv3legacy"
    suffix = protocol_suffix(5000, "train", "lf-classifier@3f2a9c1b0d4e")
    assert protocol_key("fid", suffix) == "fid5k_train_lfclassifier"
    assert protocol_suffix(500, "val", "lf-classifier@x") == "500_val_lfclassifier"
    assert protocol_suffix(2500, "train", "lf-classifier@x") == "2500_train_lfclassifier"
    result = {"protocol": suffix, "samples": 5000, "backbone": "lf-classifier@3f2a9c1b0d4e",
              "fid5k_train_lfclassifier": 12.5, "kid_std5k_train_lfclassifier": 0.1,
              "reconstruction_protocol": "500_val", "recon_psnr500_val": 21.0}
    assert metric_values(result) == {"fid": 12.5, "kid_std": 0.1, "recon_psnr": 21.0}


def test_a_sweep_given_an_evaluate_key_is_told_the_bare_name(tmp_path):
    from latentforge.errors import ConfigError
    from latentforge.tune.space import load_sweep

    path = tmp_path / "s.yaml"
    path.write_text("name: s\nbase: dcgan-mnist\nmetric: fid5k_train_lfclassifier\nspace: {gan.lr_g: {choice: [1e-4, 2e-4]}}\n")
    with pytest.raises(ConfigError, match="sweeps optimise the bare name \\('fid'\\)"):
        load_sweep(path)


def test_the_knn_metrics_compare_equal_counts_of_real_and_generated_points():
    """Samples of the very distribution of the reals score coverage near 1 whatever the counts: with
    2,000 real points against 400 generated ones it read about 0.6 (ReLU Gaussian features, as the
    review measured 0.59 at 5,000 against 1,000)."""
    g = torch.Generator().manual_seed(1)
    real = _real(n=2000, d=16)
    real.features.copy_(torch.relu(torch.randn(2000, 16, generator=g)))
    fake = torch.relu(torch.randn(400, 16, generator=g))
    s = SampleSet(real, fake, None)
    assert [len(x) for x in s.knn] == [400, 400]
    _, coverage = s.density_coverage
    assert coverage > 0.9
    from latentforge.metrics.distribution import density_coverage

    assert density_coverage(real.features, fake, k=5)[1] < 0.75  # what unequal sets gave
