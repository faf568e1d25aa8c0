"""Inpainting and denoising by projecting onto what the model can generate."""

from __future__ import annotations

import torch
from torch import nn

from latentforge.editing.inversion import Inversion, encode_vae, project


def paste(observed: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Observed pixels where mask = 1, generated ones elsewhere (the unmasked pixels stay exact)."""
    m = mask.float().expand_as(observed)
    return m * observed + (1 - m) * generated


def inpaint(model: nn.Module, algorithm: str, images: torch.Tensor, mask: torch.Tensor,
            labels: torch.Tensor | None = None, method: str = "optimize", chain_steps: int = 30,
            average: int = 1, **project_kwargs) -> tuple[torch.Tensor, Inversion | None]:
    """Fill the pixels where `mask` is 0.

    Args:
        model, algorithm: a generator ('gan') or VAE ('vae').
        images: (N, C, H, W) in [-1, 1]; values under the mask are ignored.
        mask: (N, 1 or C, H, W), 1 = observed, 0 = missing.
        method: 'optimize' (find z matching the observed pixels + a prior, then paste) or, for
            VAEs, 'chain' (encode → decode → restore the observed pixels, repeated).
        chain_steps: iterations of the chain.
        average: with 'optimize', fill with the mean of the `average` starts that fit the observed
            pixels best (needs restarts ≥ average). Many completions agree with a large hole's
            border; their mean approximates the posterior mean, which is what minimises the
            expected squared error, where the single best fit commits to one guess.

    Returns:
        (inpainted images with the observed pixels restored exactly, the inversion or None)
    """
    if method == "chain":
        if algorithm != "vae":
            raise ValueError("the encode/decode chain needs a VAE; use method='optimize' for GANs")
        x = paste(images, torch.zeros_like(images), mask)
        for _ in range(chain_steps):
            x = paste(images, encode_vae(model, x, labels).reconstruction, mask)
        return x, None
    if method != "optimize":
        raise ValueError(f"unknown inpainting method {method!r}; choose one of: optimize, chain")
    if algorithm == "vae" and project_kwargs.get("init") is None:
        # start from the encoder's guess on a short chain's output instead of a random latent only
        warm, _ = inpaint(model, algorithm, images, mask, labels, method="chain", chain_steps=5)
        project_kwargs["init"] = encode_vae(model, warm, labels).latent
    if average > project_kwargs.get("restarts", 4):
        raise ValueError(f"average={average} needs at least as many restarts")
    inv = project(model, images, labels, mask=mask, **project_kwargs)
    fill = inv.reconstruction
    if average > 1:
        best = inv.candidate_errors.topk(average, dim=0, largest=False).indices  # (k, N)
        picked = torch.gather(inv.candidates, 0, best.view(*best.shape, 1, 1, 1).expand(-1, -1, *fill.shape[1:]))
        fill = picked.mean(0)
    return paste(images, fill, mask), inv


def estimate_noise_sigma(images: torch.Tensor) -> torch.Tensor:
    """Per-image noise standard deviation (in the images' units) by the median absolute deviation of
    the finest diagonal detail, which for white noise has the noise's own σ (Donoho & Johnstone)."""
    x = images
    detail = (x[..., :-1, :-1] - x[..., 1:, :-1] - x[..., :-1, 1:] + x[..., 1:, 1:]) / 2
    return detail.abs().flatten(1).median(1).values / 0.6745


def denoise(model: nn.Module, algorithm: str, noisy: torch.Tensor, labels: torch.Tensor | None = None,
            sigma: float | torch.Tensor | None = None, **project_kwargs) -> torch.Tensor:
    """Project a noisy image onto the model (encode/decode for VAEs, projection for GANs), then
    combine projection and observation by their estimated error variances.

    The projection alone loses whatever detail the model cannot represent, which at low noise costs
    more than the noise itself; weighting the two estimates by inverse variance (the model's error
    is read off the residual: E|y - x̂|² ≈ e² + σ²) makes light noise barely touched and heavy
    noise mostly replaced.

    Args:
        noisy: (N, C, H, W) in [-1, 1].
        sigma: the noise σ in [-1, 1] units (2× the σ on [0, 1] pixels); estimated per image when None.
    """
    y = noisy.clamp(-1, 1)
    if algorithm == "vae":
        x_hat = encode_vae(model, y, labels).reconstruction
    else:
        x_hat = project(model, y, labels, **project_kwargs).reconstruction
    n = y.shape[0]
    s = estimate_noise_sigma(y) if sigma is None else torch.as_tensor(sigma, dtype=y.dtype).expand(n)
    noise_var = s.to(y.device).pow(2).view(n, 1, 1, 1)
    resid = (y - x_hat).pow(2).flatten(1).mean(1).view(n, 1, 1, 1)
    model_var = (resid - noise_var).clamp_min(1e-6)
    w_obs = model_var / (model_var + noise_var)
    return (w_obs * y + (1 - w_obs) * x_hat).clamp(-1, 1)
