"""Metric formulas on synthetic features, and against torchmetrics' reference implementations."""

import numpy as np
import pytest
import torch
from torch import nn

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
from latentforge.metrics.reconstruction import psnr, ssim


def test_frechet_distance_closed_forms():
    d = 16
    m = np.arange(d, dtype=float) / d
    assert frechet_distance(np.zeros(d), np.eye(d), m, np.eye(d)) == pytest.approx(m @ m, abs=1e-9)
    # isotropic: d (a - b)^2
    assert frechet_distance(np.zeros(d), 4 * np.eye(d), np.zeros(d), np.eye(d)) == pytest.approx(d * 1.0, abs=1e-9)
    # singular covariances (dead features) are fine
    s = np.diag([1.0] * 8 + [0.0] * 8)
    assert frechet_distance(np.zeros(d), s, np.zeros(d), s) == pytest.approx(0.0, abs=1e-9)


class _Identity(nn.Module):
    """torchmetrics feeds uint8 images; our features here are the raw pixels."""

    def forward(self, x):
        return x.float().flatten(1) / 255.0


def test_fid_and_kid_match_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    gen = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (400, 1, 4, 4), generator=gen, dtype=torch.uint8)
    fake = (real.float() * 0.7 + 30).clamp(0, 255).to(torch.uint8)
    fr, ff = _Identity()(real), _Identity()(fake)
    ours = frechet_distance(*gaussian_stats(ff), *gaussian_stats(fr))
    ref = FrechetInceptionDistance(feature=_Identity(), input_img_size=(1, 4, 4))
    ref.update(real, real=True)
    ref.update(fake, real=False)
    assert ours == pytest.approx(ref.compute().item(), rel=1e-3)

    kid_ref = KernelInceptionDistance(feature=_Identity(), subsets=20, subset_size=200)
    kid_ref.update(real, real=True)
    kid_ref.update(fake, real=False)
    ref_mean, _ = kid_ref.compute()
    ours_mean, _ = kernel_inception_distance(fr, ff, subsets=20, subset_size=200)
    assert ours_mean == pytest.approx(ref_mean.item(), rel=0.15)  # random subsets differ


def test_precision_recall_density_coverage_sanity():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(800, 8, generator=gen)
    same = torch.randn(800, 8, generator=gen)
    far = torch.randn(800, 8, generator=gen) + 10
    p, r = precision_recall(real, same)
    assert p > 0.8 and r > 0.8
    assert precision_recall(real, far) == (0.0, 0.0)
    d, c = density_coverage(real, same)
    assert 0.8 < d < 1.2 and c > 0.9
    assert density_coverage(real, far) == (0.0, 0.0)
    # one mode of the real data: precise but no recall
    narrow = real[real[:, 0] > 1.5]
    p, r = precision_recall(real, narrow)
    assert p > 0.8 and r < 0.5


def test_class_metrics_show_mode_collapse():
    share = torch.full((10,), 0.1, dtype=torch.float64)
    everything = torch.arange(1000) % 10
    one_digit = torch.full((1000,), 3)
    assert class_coverage(everything, share) == 1.0
    assert class_coverage(one_digit, share) == pytest.approx(0.1)
    assert label_kl(everything, share) < 0.01 < 1.0 < label_kl(one_digit, share)


def test_inception_score_bounds():
    k = 10
    confident_diverse = torch.eye(k).repeat(50, 1)
    uniform = torch.full((500, k), 1.0 / k)
    assert inception_score(confident_diverse)[0] == pytest.approx(k, rel=1e-3)
    assert inception_score(uniform)[0] == pytest.approx(1.0, rel=1e-6)


def test_psnr_and_ssim():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 28, 28, generator=gen) * 2 - 1
    noisy = (x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    assert psnr(x, x).min() == 100.0
    assert ssim(x, x).min() == pytest.approx(1.0, abs=1e-5)
    assert (ssim(x, noisy) < 0.97).all()
    smooth = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    assert (ssim(smooth, smooth + 0.3) < ssim(smooth, smooth + 0.1)).all()
    assert (psnr(x, noisy) < 25).all()
    assert ssim(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)).min() == pytest.approx(1.0)  # small images
