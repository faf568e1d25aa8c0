"""Distribution metrics on feature vectors (pure torch/numpy, no pretrained network here).

- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to real and fake features.
- KID (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel, over subsets.
- Inception Score (Salimans et al. 2016) with any classifier's probabilities.
- Precision/recall (Kynkäänniemi et al. 2019, k=3) and density/coverage (Naeem et al. 2020, k=5)
  from k-nearest-neighbour balls.
- Class coverage and label-histogram KL: where mode collapse shows.
"""

from __future__ import annotations

import numpy as np
import torch


def gaussian_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) in float64."""
    f = features.double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 − mu2||² + Tr(Σ1) + Tr(Σ2) − 2 Tr((Σ1 Σ2)^½).

    Tr((Σ1 Σ2)^½) is computed as Σ sqrt(eig(Σ1^½ Σ2 Σ1^½)): the same value as the usual
    `scipy.linalg.sqrtm(Σ1 Σ2)`, but from symmetric eigendecompositions, so singular covariances
    (dead ReLU features, fewer samples than dimensions) need no eps offset and give no warnings.
    """
    diff = mu1 - mu2
    s1 = _sqrt_psd(sigma1)
    eig = np.linalg.eigvalsh(s1 @ sigma2 @ s1)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 50, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD² with k(x, y) = (x·y / d + 1)³, averaged over random subsets: (mean, std)."""
    gen = torch.Generator().manual_seed(seed)
    real, fake = real.double(), fake.double()
    m = min(subset_size, len(real), len(fake))
    d = real.shape[1]
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=gen)[:m]]
        y = fake[torch.randperm(len(fake), generator=gen)[:m]]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - kxx.diagonal().sum()) + (kyy.sum() - kyy.diagonal().sum())) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd.item())
    v = np.asarray(values)
    return float(v.mean()), float(v.std())


def inception_score(probs: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over `splits` chunks: (mean, std)."""
    p = probs.double().clamp_min(1e-12)
    scores = []
    for chunk in p.chunk(splits):
        py = chunk.mean(0, keepdim=True)
        scores.append(torch.exp((chunk * (chunk.log() - py.log())).sum(1).mean()).item())
    s = np.asarray(scores)
    return float(s.mean()), float(s.std())


def _pairwise(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    return torch.cat([torch.cdist(a[i : i + chunk], b) for i in range(0, len(a), chunk)])


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (self excluded)."""
    d = _pairwise(features, features)
    return d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself (distance 0)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision (fakes inside the real manifold) and recall (reals inside the fake one)."""
    real, fake = real.float(), fake.float()
    r_real, r_fake = knn_radii(real, k), knn_radii(fake, k)
    d = _pairwise(fake, real)  # (F, R)
    precision = (d <= r_real[None, :]).any(1).float().mean().item()
    recall = (d.T <= r_fake[None, :]).any(1).float().mean().item()
    return precision, recall


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> tuple[float, float]:
    """Density (how many real balls hold each fake, / k) and coverage (reals whose ball holds a fake)."""
    real, fake = real.float(), fake.float()
    r_real = knn_radii(real, k)
    inside = _pairwise(real, fake) <= r_real[:, None]  # (R, F)
    density = inside.float().sum().item() / (k * fake.shape[0])
    coverage = inside.any(1).float().mean().item()
    return density, coverage


def class_histogram(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Share of each class (K,)."""
    return torch.bincount(labels.long(), minlength=num_classes).double() / max(1, len(labels))


def class_coverage(predicted: torch.Tensor, real_share: torch.Tensor, min_fraction: float = 0.2) -> float:
    """Share of classes whose generated share reaches `min_fraction` of their real share: 1.0 when
    every mode is produced, 1/K when a generator emits one class."""
    fake_share = class_histogram(predicted, len(real_share))
    present = real_share > 0
    return float((fake_share[present] >= min_fraction * real_share[present]).double().mean())


def label_kl(predicted: torch.Tensor, real_share: torch.Tensor) -> float:
    """KL(real label distribution || generated label distribution), add-one smoothed, in nats."""
    k = len(real_share)
    counts = torch.bincount(predicted.long(), minlength=k).double() + 1.0
    fake = counts / counts.sum()
    real = real_share.double()
    mask = real > 0
    return float((real[mask] * (real[mask].log() - fake[mask].log())).sum())
