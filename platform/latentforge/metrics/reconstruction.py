"""Reconstruction quality: MSE, PSNR and SSIM on images in [-1, 1] (computed on [0, 1])."""

from __future__ import annotations

import torch


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error on [0, 1] pixels (N,)."""
    return (_unit(a) - _unit(b)).pow(2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on [0, 1] pixels (N,); capped at 100 dB for identical images."""
    return (10 * torch.log10(1.0 / mse(a, b).clamp_min(1e-10))).clamp(max=100.0)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, Gaussian window) on [0, 1] pixels (N,), computed by
    torchmetrics' reference implementation; the window shrinks to fit small (8 px) images."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    size = min(window, a.shape[-1], a.shape[-2])
    if size % 2 == 0:
        size -= 1
    return structural_similarity_index_measure(_unit(a), _unit(b), data_range=1.0, kernel_size=size,
                                               sigma=min(sigma, size / 4), reduction="none")
