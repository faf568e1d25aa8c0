"""Convolutional VAE (plain, beta and class-conditional) with a Bernoulli or Gaussian decoder."""

from __future__ import annotations

import torch
from torch import nn

from latentforge.models.blocks import DownStack, UpStack, with_label_embedding

LIKELIHOODS = ("bernoulli", "gaussian")


class LatentVAE(nn.Module):
    """What every VAE family shares: label conditioning, the posterior head, the first layer of
    the decoder (for SeFa / PCA), decoding by likelihood and the reparameterised forward.

    A family sets `z_dim`, `num_classes`, `likelihood`, `embed` (or None) and `to_posterior`, and
    implements `encoder_features(x)` → (B, F), `latent_projection` (the decoder's first linear
    layer, from [z, label embedding]) and `from_projection(p)` → the decoder's pre-activation image.
    """

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def latent_projection(self) -> nn.Linear:
        raise NotImplementedError

    def from_projection(self, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _cond(self, v: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return with_label_embedding(v, self.embed, labels, "VAE")

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [-1, 1] → (mu, logvar), each (B, z_dim)."""
        mu, logvar = self.to_posterior(self._cond(self.encoder_features(x), labels)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def first_layer(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's linear projection of z (conditional models cycle the labels)."""
        if self.embed is not None and labels is None:
            labels = torch.arange(len(z), device=z.device) % self.num_classes
        return self.latent_projection(self._cond(z, labels))

    def first_layer_weight(self) -> torch.Tensor:
        return self.latent_projection.weight[:, : self.z_dim]

    def decode_raw(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, z_dim) → decoder output (B, C, H, W): logits (bernoulli) or mean in [-1, 1] (gaussian)."""
        out = self.from_projection(self.latent_projection(self._cond(z, labels)))
        return out if self.likelihood == "bernoulli" else torch.tanh(out)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z → the decoder's mean image in [-1, 1]."""
        out = self.decode_raw(z, labels)
        return torch.sigmoid(out) * 2 - 1 if self.likelihood == "bernoulli" else out

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        """Returns (decoder output, mu, logvar); `noise` (B, z_dim) fixes the reparameterisation."""
        mu, logvar = self.encode(x, labels)
        eps = torch.randn_like(mu) if noise is None else noise
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decode_raw(z, labels), mu, logvar


class ConvVAE(LatentVAE):
    """Encoder q(z|x[,y]) = N(mu, diag(exp(logvar))), decoder p(x|z[,y]).

    Args:
        z_dim: latent size.
        channels: image channels.
        resolution: image side.
        width: channels at full resolution.
        num_classes: > 0 for a class-conditional VAE (label embedding fed to encoder and decoder).
        embed_dim: label embedding size.
        likelihood: 'bernoulli' (decoder outputs logits over pixel intensities in [0, 1]) or
            'gaussian' (decoder outputs the mean in [-1, 1]; fixed scale set by the loss).
    """

    def __init__(self, *, z_dim: int, channels: int, resolution: int, width: int = 32, num_classes: int = 0,
                 embed_dim: int = 16, likelihood: str = "bernoulli"):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose one of: {', '.join(LIKELIHOODS)}")
        self.init_args = dict(z_dim=z_dim, channels=channels, resolution=resolution, width=width,
                              num_classes=num_classes, embed_dim=embed_dim, likelihood=likelihood)
        self.z_dim, self.num_classes, self.likelihood = z_dim, num_classes, likelihood
        cond = embed_dim if num_classes else 0
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        self.encoder = DownStack(in_channels=channels, resolution=resolution, width=width, norm="none")
        self.to_posterior = nn.Linear(self.encoder.out_features + cond, 2 * z_dim)
        self.decoder = UpStack(in_dim=z_dim + cond, out_channels=channels, resolution=resolution, width=width, norm="none")

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    @property
    def latent_projection(self) -> nn.Linear:
        return self.decoder.project

    def from_projection(self, p: torch.Tensor) -> torch.Tensor:
        return self.decoder.from_projection(p)
