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
            **project_kwargs) -> tuple[torch.Tensor, Inversion | None]:
    """Fill the pixels where `mask` is 0.

    Args:
        model, algorithm: a generator ('gan') or VAE ('vae').
        images: (N, C, H, W) in [-1, 1]; values under the mask are ignored.
        mask: (N, 1 or C, H, W), 1 = observed, 0 = missing.
        method: 'optimize' (find z matching the observed pixels + a prior, then paste) or, for
            VAEs, 'chain' (encode → decode → restore the observed pixels, repeated).
        chain_steps: iterations of the chain.

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
    inv = project(model, algorithm, images, labels, mask=mask, **project_kwargs)
    return paste(images, inv.reconstruction, mask), inv


def denoise(model: nn.Module, algorithm: str, noisy: torch.Tensor, labels: torch.Tensor | None = None,
            **project_kwargs) -> torch.Tensor:
    """Project a noisy image onto the model: encode/decode (VAE) or projection (GAN)."""
    if algorithm == "vae":
        return encode_vae(model, noisy.clamp(-1, 1), labels).reconstruction
    return project(model, algorithm, noisy.clamp(-1, 1), labels, **project_kwargs).reconstruction
