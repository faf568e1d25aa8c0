"""DCGAN-style generator and discriminator, optionally class-conditional.

Conditioning: the generator concatenates a learned label embedding to z; the discriminator is a
projection discriminator (Miyato & Koyama, 2018): logit = w·h + <embed(y), h>.
"""

from __future__ import annotations

import torch
from torch import nn

from latentforge.models.blocks import D_NORMS, G_NORMS, DownStack, UpStack, maybe_sn, projection_logit, with_label_embedding


class DCGANGenerator(nn.Module):
    """z (B, z_dim) [+ label (B,)] → image (B, C, H, W) in [-1, 1].

    Args:
        z_dim: latent size.
        channels: image channels (1 or 3).
        resolution: image side (8, 16, 28, 32, 64).
        width: channels at full resolution; doubles per halving up to 8x.
        norm: 'batch', 'layer' (batch-independent: exact data parallelism) or 'none'.
        num_classes: > 0 for a class-conditional generator.
        embed_dim: label embedding size (conditional only).
    """

    def __init__(self, *, z_dim: int, channels: int, resolution: int, width: int = 32, norm: str = "batch",
                 num_classes: int = 0, embed_dim: int = 32):
        super().__init__()
        if norm not in G_NORMS:
            raise ValueError(f"unknown generator norm {norm!r}; choose one of: {', '.join(G_NORMS)}")
        self.init_args = dict(z_dim=z_dim, channels=channels, resolution=resolution, width=width, norm=norm,
                              num_classes=num_classes, embed_dim=embed_dim)
        self.z_dim, self.num_classes = z_dim, num_classes
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        self.net = UpStack(in_dim=z_dim + (embed_dim if num_classes else 0), out_channels=channels,
                           resolution=resolution, width=width, norm=norm)

    def _input(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return with_label_embedding(z, self.embed, labels, "generator")

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(self.net(self._input(z, labels)))

    def first_layer(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Activations of the linear projection of z (GANSpace); conditional models cycle the labels."""
        if self.embed is not None and labels is None:
            labels = torch.arange(len(z), device=z.device) % self.num_classes
        return self.net.project(self._input(z, labels))

    def first_layer_weight(self) -> torch.Tensor:
        """The projection's columns that act on z (SeFa)."""
        return self.net.project.weight[:, : self.z_dim]

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latents → images in [-1, 1]: the name every latent-variable model shares (see
        `sampling.decode_latents`), so sampling, evaluation and editing need not know the family."""
        return self(z, labels)


class DCGANDiscriminator(nn.Module):
    """image (B, C, H, W) [+ label (B,)] → logit (B,).

    Args:
        channels: image channels.
        resolution: image side.
        width: channels at full resolution.
        norm: 'spectral', 'layer', 'instance' or 'none' (no BatchNorm: it breaks gradient penalties
            and differs between data-parallel and single-process training).
        num_classes: > 0 for a projection discriminator.
    """

    def __init__(self, *, channels: int, resolution: int, width: int = 32, norm: str = "spectral", num_classes: int = 0):
        super().__init__()
        if norm not in D_NORMS:
            raise ValueError(f"unknown discriminator norm {norm!r}; choose one of: {', '.join(D_NORMS)}")
        self.init_args = dict(channels=channels, resolution=resolution, width=width, norm=norm, num_classes=num_classes)
        self.num_classes = num_classes
        sn = norm == "spectral"
        self.features = DownStack(in_channels=channels, resolution=resolution, width=width, norm=norm)
        self.head = maybe_sn(nn.Linear(self.features.out_features, 1), sn)
        self.embed = maybe_sn(nn.Embedding(num_classes, self.features.out_features), sn) if num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return projection_logit(self.head, self.embed, self.features(x), labels)
