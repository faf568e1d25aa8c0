"""The written model interface: what training, sampling, editing, checkpoints and Serve may ask of
a network. Nothing outside `latentforge.models` reaches into a model's attributes beyond these.

Constructor contract (what `builders` passes; a plug-in must accept the same keywords):

    Generator(*, z_dim, channels, resolution, width, norm, num_classes, embed_dim, **g_options)
    Discriminator(*, channels, resolution, width, norm, num_classes, **d_options)
    VAE(*, z_dim, channels, resolution, width, num_classes, embed_dim, likelihood, **options)

Every module stores its constructor keywords in `init_args` (JSON values only): a checkpoint
records them and rebuilds the module from them.

Editing capabilities are optional methods. A generator without them still trains, samples,
serves and edits along supervised directions; only the directions that need them are skipped:

    first_layer(z, labels) -> (N, F)   activations of the first layer (GANSpace PCA)
    first_layer_weight() -> (F, z_dim)  the linear map from z to them (SeFa)

A generator with an intermediate latent space W (StyleGAN-style) also has `w_dim`,
`mapping(z, labels) -> w` and `synthesis(w) -> images`.

A generator that draws random numbers of its own in training (noise maps, style mixing) names
them, so that training draws them for the global batch and N workers equal one:

    random_inputs() -> {name: ("normal" | "uniform", per-sample shape)}
    forward(z, labels, randomness=None)   randomness: {name: (B, *shape)}; in training, all of them
    path_lengths(z, labels, y, randomness=None)   where it has the path-length regulariser
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Generator(Protocol):
    """z (B, z_dim) [+ labels (B,)] → images (B, C, H, W) in [-1, 1]."""

    z_dim: int
    num_classes: int  # 0 for an unconditional model
    init_args: dict

    def __call__(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latents → images in [-1, 1] (the same as calling the generator)."""


@runtime_checkable
class Discriminator(Protocol):
    """images (B, C, H, W) [+ labels (B,)] → logits (B,)."""

    num_classes: int
    init_args: dict

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class VAE(Protocol):
    """Encoder q(z|x) and decoder p(x|z); `forward` returns (decoder output, mu, logvar)."""

    z_dim: int
    num_classes: int
    likelihood: str  # 'bernoulli' | 'gaussian'
    init_args: dict
    # optional: `decoder_log_sigma` (C,), a learned per-channel Gaussian decoder std used by the loss
    # instead of the configured vae.decoder_sigma (algorithms.vae.decoder_sigma)

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode_raw(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class FirstLayerEditable(Protocol):
    """A latent model whose first layer is linear in z (SeFa and GANSpace directions)."""

    def first_layer(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor: ...

    def first_layer_weight(self) -> torch.Tensor: ...


@runtime_checkable
class StyleEditable(Protocol):
    """A generator with an intermediate latent space W (StyleGAN-style); editing works in W
    (`editing.space.WSpace`).

    mapping(z, labels, truncation_psi) -> w (B, w_dim); synthesis(ws) -> images for ws (B, w_dim)
    or W+ (B, num_ws, w_dim); w_avg (w_dim,) the mean w; style_weight() -> (S, w_dim) the stacked
    affine maps from w to every layer's styles.
    """

    w_dim: int
    num_ws: int

    def mapping(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                truncation_psi: float = 1.0) -> torch.Tensor: ...

    def synthesis(self, ws: torch.Tensor) -> torch.Tensor: ...

    def style_weight(self) -> torch.Tensor: ...


ROLES = {"generator": Generator, "discriminator": Discriminator, "vae": VAE}


def missing_members(obj, role: str) -> list[str]:
    """Names the interface of `role` requires that `obj` (a class or instance) lacks."""
    proto = ROLES[role]
    needed = [n for n in proto.__protocol_attrs__ if n != "__call__"] if hasattr(proto, "__protocol_attrs__") else []
    if not needed:  # Python < 3.12 keeps them elsewhere
        from typing import _get_protocol_attrs  # type: ignore[attr-defined]

        needed = [n for n in _get_protocol_attrs(proto) if n != "__call__"]
    if isinstance(obj, type):  # attributes set in __init__ are not visible on the class
        needed = [n for n in needed if n not in ("z_dim", "num_classes", "init_args", "likelihood")]
    return sorted(n for n in needed if not hasattr(obj, n))
