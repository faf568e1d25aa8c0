"""Adversarial losses and regularisers (pure PyTorch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AdversarialLoss:
    """A GAN objective: discriminator and generator losses over logits (means over the batch)."""

    d_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (real logits, fake logits) → scalar
    g_loss: Callable[[torch.Tensor], torch.Tensor]  # fake logits → scalar
    needs_gradient_penalty: bool = False


LOSSES: dict[str, AdversarialLoss] = {
    # Non-saturating (Goodfellow et al. 2014): D minimises BCE, G maximises log D(G(z)).
    "ns": AdversarialLoss(
        d_loss=lambda r, f: F.softplus(-r).mean() + F.softplus(f).mean(),
        g_loss=lambda f: F.softplus(-f).mean(),
    ),
    # Hinge (Lim & Ye 2017; SNGAN, BigGAN).
    "hinge": AdversarialLoss(
        d_loss=lambda r, f: F.relu(1.0 - r).mean() + F.relu(1.0 + f).mean(),
        g_loss=lambda f: -f.mean(),
    ),
    # Wasserstein critic (Gulrajani et al. 2017) with the gradient penalty added by the step.
    "wgan-gp": AdversarialLoss(
        d_loss=lambda r, f: f.mean() - r.mean(),
        g_loss=lambda f: -f.mean(),
        needs_gradient_penalty=True,
    ),
}


def get_loss(name: str) -> AdversarialLoss:
    """The loss called `name`.

    Raises:
        ValueError: unknown name, with the valid names.
    """
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}") from None


def _input_grad_sq_norm(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Per-sample ||∂ logits / ∂ inputs||² (B,), with a graph so the penalty can be trained."""
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return grad.pow(2).flatten(1).sum(1)


def gradient_penalty(logits_mix: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: E[(||∇D(x̂)||₂ − 1)²] at interpolates x̂ between real and fake."""
    return (_input_grad_sq_norm(logits_mix, mix).add(1e-12).sqrt() - 1.0).pow(2).mean()


def r1_penalty(logits_real: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): E[||∇D(x)||₂²] on real data; the step scales it by γ/2."""
    return _input_grad_sq_norm(logits_real, real).mean()
