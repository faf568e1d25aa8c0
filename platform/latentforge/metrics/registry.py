"""The metric registry: every evaluation metric once, with the direction in which it is better,
what it needs, how a table shows it and how it is computed (`@register_metric`).

What used to be kept by hand in several lists derives from here: the metrics a run reports while
it trains (and a sweep may optimise, validated when the sweep file loads), which of them need a
labelled dataset, a conditional model or a VAE, the Prometheus evaluation gauges, and the columns
of the quality table.

A metric's value means something only with its protocol: how many generated samples, which real
split, which backbone. `latentforge evaluate` therefore names every key by it,
`fid5k_train_lfclassifier` = FID of 5,000 samples against the training split in the features of
the dataset's own classifier (`protocol_key`). Training runs report the bare names (`fid`): their
protocol is fixed by the run's config (`train.eval_samples` samples against the training split,
the dataset's feature network) and stated where the numbers are shown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Literal

import torch

MIN_SAMPLES = 10  # FID's covariance and the k=5 nearest-neighbour balls need several images
MAX_SAMPLES = 100_000  # twice the 50k samples papers' FID uses

from latentforge.metrics.distribution import (
    class_coverage,
    density_coverage,
    frechet_distance,
    gaussian_stats,
    inception_score,
    kernel_inception_distance,
    label_kl,
    precision_recall,
)

MAX_KNN = 5000  # points per side for the k-NN metrics (memory is O(N^2))


def knn_count(real: int, generated: int) -> int:
    """Points per side the k-NN metrics take: as many real as generated, at most MAX_KNN."""
    return min(real, generated, MAX_KNN)

Requirement = Literal["probs", "labels", "conditional", "vae"]


@dataclass(frozen=True)
class Metric:
    name: str  # the bare name (training results, sweeps): fid, recall, ...
    better: Literal["min", "max"]
    column: str  # how a table heads it
    fmt: str  # how a table shows it
    requires: frozenset = frozenset()  # probs: a classifier backbone; labels: + the real class shares; conditional; vae
    description: str = ""
    compute: Callable | None = None  # (SampleSet) -> float | dict of this metric and its extras; None: the VAE's
    extras: tuple[str, ...] = ()  # further values it yields, e.g. kid_std
    reported: bool = True  # reported by periodic evaluation during training (and so a sweep may optimise it)


METRICS: dict[str, Metric] = {}


def register_metric(name: str, better: str, column: str, fmt: str = "{:.3f}", requires=(), description: str = "",
                    extras=(), reported: bool = True):
    """Register a metric. Used as a decorator on its compute function (SampleSet → value, or a
    dict holding the value and its extras), or called on its own with `compute=None` for metrics
    computed elsewhere (the VAE's reconstruction metrics)."""
    if not re.fullmatch(r"[a-z][a-z_]*[a-z]", name):
        raise ValueError(f"metric names are lower-case words joined by '_': {name!r}")

    def add(fn):
        if name in METRICS:
            raise ValueError(f"metric {name!r} is registered twice")
        METRICS[name] = Metric(name, better, column, fmt, frozenset(requires), description, fn, tuple(extras), reported)
        return fn

    return add


@dataclass
class SampleSet:
    """Generated images' features (and class probabilities) against one real split."""

    real: object  # metrics.features.RealStats
    feats: torch.Tensor
    probs: torch.Tensor | None
    seed: int = 0
    requested: torch.Tensor | None = None  # the classes a conditional model was asked for

    @cached_property
    def knn(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same number of real and generated points (`knn_count`): coverage (Naeem et al. 2020)
        and, less, precision and recall (Kynkäänniemi et al. 2019) assume equal sets. With 5,000
        real against 1,000 samples of the same distribution coverage read 0.59 (0.97 at 1,000 a
        side). Prepared rows are stored shuffled, and samples come from random seeds, so the first
        n of each side are a random subset."""
        n = knn_count(len(self.real.features), len(self.feats))
        return self.real.features[:n], self.feats[:n]

    @cached_property
    def precision_recall(self) -> tuple[float, float]:
        return precision_recall(*self.knn, k=3)

    @cached_property
    def density_coverage(self) -> tuple[float, float]:
        return density_coverage(*self.knn, k=5)

    @cached_property
    def predicted(self) -> torch.Tensor:
        return self.probs.argmax(1)

    def has(self, requirement: str) -> bool:
        if requirement == "probs":
            return self.probs is not None
        if requirement == "labels":
            share = self.real.class_share
            return self.probs is not None and share is not None and self.probs.shape[1] == len(share)
        if requirement == "conditional":
            return self.requested is not None
        return False  # "vae": not a distribution metric


@register_metric("fid", "min", "FID ↓", "{:.1f}", description="Fréchet distance between Gaussian fits of the features")
def _fid(s: SampleSet) -> float:
    mu, sigma = gaussian_stats(s.feats)
    return frechet_distance(mu, sigma, s.real.mu.numpy(), s.real.sigma.numpy())


@register_metric("kid", "min", "KID ↓", "{:.2f}", extras=("kid_std",),
                 description="kernel (polynomial MMD) distance, unbiased; mean and std over subsets")
def _kid(s: SampleSet) -> dict:
    kid, std = kernel_inception_distance(s.real.features, s.feats, seed=s.seed,
                                         subset_size=min(1000, len(s.feats), len(s.real.features)))
    return {"kid": kid, "kid_std": std}


@register_metric("precision", "max", "precision ↑",
                 description=f"share of samples inside the real k-NN manifold (k=3; equal counts, at most {MAX_KNN:,} per side: knn_samples)")
def _precision(s: SampleSet) -> float:
    return s.precision_recall[0]


@register_metric("recall", "max", "recall ↑",
                 description=f"share of real images inside the samples' k-NN manifold (k=3; equal counts, at most {MAX_KNN:,} per side)")
def _recall(s: SampleSet) -> float:
    return s.precision_recall[1]


@register_metric("density", "max", "density ↑", description=f"how many real k-NN balls hold each sample (k=5; equal counts, at most {MAX_KNN:,} per side)")
def _density(s: SampleSet) -> float:
    return s.density_coverage[0]


@register_metric("coverage", "max", "coverage ↑",
                 description=f"share of real k-NN balls (k=5) holding a sample (equal counts, at most {MAX_KNN:,} per side)")
def _coverage(s: SampleSet) -> float:
    return s.density_coverage[1]


@register_metric("inception_score", "max", "IS ↑", "{:.2f}", requires=("probs",), extras=("inception_score_std",),
                 description="exp E[KL(p(y|x) || p(y))] of the backbone's class probabilities")
def _inception_score(s: SampleSet) -> dict:
    value, std = inception_score(s.probs)
    return {"inception_score": value, "inception_score_std": std}


@register_metric("class_coverage", "max", "class cov. ↑", "{:.2f}", requires=("labels",),
                 description="share of the dataset's classes among the samples' predicted classes")
def _class_coverage(s: SampleSet) -> float:
    return class_coverage(s.predicted, s.real.class_share)


@register_metric("label_kl", "min", "label KL ↓", requires=("labels",),
                 description="KL divergence of the samples' predicted class shares from the real ones")
def _label_kl(s: SampleSet) -> float:
    return label_kl(s.predicted, s.real.class_share)


@register_metric("class_accuracy", "max", "cond. acc. ↑", requires=("labels", "conditional"),
                 description="share of a conditional model's images classified as the class they were asked for")
def _class_accuracy(s: SampleSet) -> float:
    return float((s.predicted == s.requested.cpu()).float().mean())


# The VAE's reconstruction of the validation split (metrics.evaluate.vae_reconstruction_metrics).
for _name, _better, _column, _fmt, _reported, _desc in (
    ("recon_psnr", "max", "recon PSNR ↑", "{:.1f}", True, "PSNR of the posterior-mean reconstruction (dB)"),
    ("recon_ssim", "max", "recon SSIM ↑", "{:.3f}", True, "SSIM of the posterior-mean reconstruction"),
    ("val_neg_elbo", "min", "−ELBO ↓", "{:.1f}", True, "negative ELBO per image (nats)"),
    ("recon_mse", "min", "recon MSE ↓", "{:.4f}", False, "MSE of the posterior-mean reconstruction on [0, 1] pixels"),
    ("val_nll", "min", "NLL ↓", "{:.1f}", False, "reconstruction term of the −ELBO (nats)"),
    ("val_kl", "min", "KL ↓", "{:.1f}", False, "KL term of the −ELBO (nats)"),
):
    register_metric(_name, _better, _column, _fmt, requires=("vae",), description=_desc, reported=_reported)(None)


def distribution_values(s: SampleSet) -> dict:
    """Every registered distribution metric whose requirements `s` meets (bare names, extras too)."""
    out: dict = {}
    for m in METRICS.values():
        if m.compute is None or not all(s.has(r) for r in m.requires):
            continue
        value = m.compute(s)
        out.update(value if isinstance(value, dict) else {m.name: value})
    return out


# ---- derived views (what used to be kept by hand) ----
REPORTED_METRICS: dict[str, str] = {m.name: m.better for m in METRICS.values() if m.reported}  # sweepable
VAE_ONLY_METRICS = tuple(m.name for m in METRICS.values() if "vae" in m.requires)
LABELLED_DATA_METRICS = tuple(m.name for m in METRICS.values() if {"probs", "labels"} & m.requires)
CONDITIONAL_MODEL_METRICS = tuple(m.name for m in METRICS.values() if "conditional" in m.requires)


# ---- protocols ----
def _count(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def backbone_tag(backbone: str) -> str:
    """'lf-classifier@3f2a9c1b0d4e' → 'lfclassifier'; 'torchvision-inception-v3-clean@…' → 'inceptionv3clean'."""
    name = backbone.split("@", 1)[0].removeprefix("torchvision-")
    return re.sub(r"[^a-z0-9]", "", name.lower())


def protocol_suffix(samples: int, reference: str, backbone: str) -> str:
    """'5k_train_lfclassifier': the sample count, the real split, the backbone."""
    return f"{_count(samples)}_{reference}_{backbone_tag(backbone)}"


def reconstruction_suffix(images: int) -> str:
    """'500_val': the VAE's reconstruction metrics, over this many validation images."""
    return f"{_count(images)}_val"


def protocol_key(name: str, suffix: str) -> str:
    """'fid' + '5k_train_lfclassifier' → 'fid5k_train_lfclassifier'."""
    return f"{name}{suffix}"


def metric_values(result: dict) -> dict:
    """A result of `latentforge evaluate` (protocol-named keys) → {bare name: value}, for code
    that has already checked the protocol (`result["protocol"]`) and wants the numbers."""
    out = {}
    for suffix in (result.get("protocol"), result.get("reconstruction_protocol")):
        if not suffix:
            continue
        for key, value in result.items():
            if key.endswith(suffix) and len(key) > len(suffix):
                out[key[: -len(suffix)]] = value
    return out


def check_metric(name: str) -> Metric:
    """The registered metric called `name`.

    Raises:
        ValueError: an unknown name, with every valid one listed.
    """
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of: {', '.join(METRICS)}")
    return METRICS[name]
