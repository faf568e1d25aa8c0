"""The latent space that editing works in.

A model's edit latent is z for most generators and VAEs. A generator with an intermediate space W
(`models.interface.StyleEditable`: StyleGAN-style) is edited in W instead, as the StyleGAN papers
do: `edit_model` wraps it in a `WSpace`, a module with the latent-model interface (`z_dim`,
`decode`, `first_layer_weight`, ...) whose latents are w. Everything downstream (projection,
directions, interpolation, Serve) then works in W without knowing it:

- inversion optimises w from the mean w (and W+, one w per layer, with `project(..., plus=True)`);
- SeFa factorises the stacked style affine weights (Shen & Zhou 2021, their StyleGAN variant);
  GANSpace takes the principal components of the styles of sampled w (Härkönen et al. 2020 use W);
- interpolation is linear (W is not Gaussian: slerp's premise does not hold there);
- truncation is StyleGAN's ψ: w_avg + ψ(w − w_avg).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.models.interface import StyleEditable


class WSpace(nn.Module):
    """A W-space generator seen as a latent model whose latents are w (B, w_dim), or W+ latents
    (B, num_ws, w_dim) for `decode`.

    Attributes:
        z_dim: the edit latent's size (w_dim); `noise_dim` is the generator's z size.
        interpolation: 'lerp'.
    """

    interpolation = "lerp"

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator
        self.z_dim, self.noise_dim = generator.w_dim, generator.z_dim
        self.num_classes, self.num_ws = generator.num_classes, generator.num_ws
        self.init_args = dict(generator.init_args)
        self.train(generator.training)  # a view of a loaded (eval) generator must not flip it to training

    def latents_from_noise(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                           truncation: float | None = None) -> torch.Tensor:
        """z (N, noise_dim) → w (N, w_dim) with truncation ψ (None: 1, no truncation)."""
        return self.generator.mapping(z, labels, 1.0 if truncation is None else truncation)

    @property
    def prior_center(self) -> torch.Tensor:
        return self.generator.w_avg

    def decode(self, w: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """w or W+ → images in [-1, 1]; labels are already in w (the mapping took them)."""
        return self.generator.synthesis(w).clamp(-1, 1)

    forward = decode

    def first_layer_weight(self) -> torch.Tensor:
        return self.generator.style_weight()

    def first_layer(self, w: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(w, self.generator.style_weight())


def edit_model(model: nn.Module) -> nn.Module:
    """The module editing works with: a `WSpace` view for generators with W, the model otherwise."""
    return WSpace(model) if isinstance(model, StyleEditable) and not isinstance(model, WSpace) else model


def latent_space(model: nn.Module) -> str:
    """'w' for a `WSpace` view (or a generator with W), 'z' otherwise: what an API's latents are."""
    return "w" if isinstance(edit_model(model), WSpace) else "z"


def noise_dim(model: nn.Module) -> int:
    """Size of the standard-normal noise that `latents_from_noise` maps to latents."""
    return getattr(model, "noise_dim", model.z_dim)


@torch.no_grad()
def latents_from_noise(model: nn.Module, z: torch.Tensor, labels: torch.Tensor | None = None,
                       truncation: float | None = None) -> torch.Tensor:
    """Standard-normal noise → the model's edit latents (identity for z-space models, whose
    truncation is applied when the noise is drawn: `sampling.sample_latents`)."""
    if not hasattr(model, "latents_from_noise"):
        return z
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        return model.latents_from_noise(z.to(device), None if labels is None else labels.to(device), truncation).float().cpu()
    finally:
        model.train(was)


def random_latents(model: nn.Module, n: int, generator: torch.Generator,
                   labels: torch.Tensor | None = None) -> torch.Tensor:
    """(n, z_dim) latents from the model's prior: N(0, I) in z, mapped noise in W."""
    return latents_from_noise(model, torch.randn(n, noise_dim(model), generator=generator), labels)


def default_interpolation(model: nn.Module, algorithm: str) -> str:
    """slerp for Gaussian GAN latents, lerp for VAEs' posterior means and for W."""
    return getattr(model, "interpolation", "slerp" if algorithm == "gan" else "lerp")
