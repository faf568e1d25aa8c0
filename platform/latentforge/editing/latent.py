"""Paths in latent space."""

from __future__ import annotations

import torch


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Spherical interpolation between latents a, b (..., D) at fractions t in [0, 1].

    Gaussian latents concentrate near the sphere of radius sqrt(D); slerp stays near it where
    lerp cuts through the low-density interior (midpoint norm ≈ sqrt(D/2) for independent a, b).
    """
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    an, bn = a / na.clamp_min(1e-12), b / nb.clamp_min(1e-12)
    omega = torch.arccos((an * bn).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    out = (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b
    # nearly parallel vectors (sin ω → 0), or an end at the origin (no direction, e.g. the mean
    # latent 0): fall back to lerp
    flat = (so.abs() < 1e-6) | (na < 1e-8) | (nb < 1e-8)
    return torch.where(flat, (1 - t) * a + t * b, out)


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Linear interpolation (for latent spaces that are not Gaussian)."""
    return (1 - t) * a + t * b


INTERPOLATIONS = {"slerp": slerp, "lerp": lerp}


def interpolation_path(a: torch.Tensor, b: torch.Tensor, steps: int, method: str = "slerp") -> torch.Tensor:
    """`steps` latents from a to b inclusive: (steps, D) for a, b (D,).

    Raises:
        ValueError: unknown method or fewer than 2 steps.
    """
    if method not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {method!r}; choose one of: {', '.join(INTERPOLATIONS)}")
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (got {steps})")
    t = torch.linspace(0, 1, steps, dtype=a.dtype, device=a.device)[:, None]
    return INTERPOLATIONS[method](a[None].expand(steps, -1), b[None].expand(steps, -1), t)
