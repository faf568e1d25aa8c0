"""Seeded generation from a loaded checkpoint (GAN: EMA generator; VAE: decoder from its fitted prior, or N(0, I))."""

from __future__ import annotations

import torch
from torch import nn

from latentforge.algorithms.precision import Precision, inference_precision
from latentforge.checkpoint import LoadedCheckpoint
from latentforge.editing.space import edit_model, latents_from_noise, noise_dim
from latentforge.errors import LatentForgeError
from latentforge.models.prior import component_uniforms

MAX_GENERATE = 4096  # images per call; larger requests are split by the caller


def sample_latents(n: int, z_dim: int, seed: int, truncation: float | None = None) -> torch.Tensor:
    """(n, z_dim) standard normal latents from a seed, on the CPU (device-independent).

    Drawn one row at a time, so that the first k latents of a seed are the same whatever n is
    (asking for 1 image and for 16 with the same seed gives the same first image).

    Args:
        truncation: if set, entries with |z| > truncation are redrawn (the truncation trick).
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        z = torch.randn(z_dim, generator=gen)
        if truncation is not None:
            for _ in range(100):
                bad = z.abs() > truncation
                if not bad.any():
                    break
                z[bad] = torch.randn(int(bad.sum()), generator=gen)
            z = z.clamp(-truncation, truncation)
        rows.append(z)
    return torch.stack(rows) if rows else torch.empty(0, z_dim)


def default_labels(ckpt: LoadedCheckpoint, n: int, label: int | None) -> torch.Tensor | None:
    """Labels for a conditional model: `label` for all, or cycling through the classes."""
    if not ckpt.inference_generator().num_classes:
        if label is not None:
            raise LatentForgeError("this model is not class-conditional: do not pass a label")
        return None
    k = ckpt.inference_generator().num_classes
    if label is None:
        return torch.arange(n) % k
    if not 0 <= label < k:
        raise LatentForgeError(f"label {label} is out of range; this model has classes 0..{k - 1}")
    return torch.full((n,), label, dtype=torch.long)


@torch.no_grad()
def decode_latents(net: nn.Module, z: torch.Tensor, labels: torch.Tensor | None = None, chunk: int = 1000,
                   precision: str = "fp32") -> torch.Tensor:
    """Latents → images: the one inference path from latents to pixels (generation, evaluation,
    training sample grids, editing, serving).

    Args:
        net: a plain (unwrapped) GAN generator or VAE; anything with `decode(z, labels)`.
        z: (N, z_dim) latents, on any device (moved to the network's).
        labels: (N,) class labels for conditional models, else None.
        chunk: latents per forward pass.
        precision: 'fp32', or 'bf16' to run the forward passes under bf16 autocast (the images
            come back as fp32; they differ from fp32's by about 1e-2 at most).

    Returns:
        (N, C, H, W) float images in [-1, 1] on the CPU. The network runs in eval mode, under
        no_grad; its mode is restored afterwards.
    """
    device = next(net.parameters()).device
    autocast = Precision(precision, device.type).autocast()
    was_training = net.training
    net.eval()
    try:
        out = []
        for i in range(0, len(z), chunk):
            y = None if labels is None else labels[i : i + chunk].to(device)
            with autocast:
                out.append(net.decode(z[i : i + chunk].to(device), y).float().cpu())
        return torch.cat(out)
    finally:
        net.train(was_training)


def share_labels(n: int, share: torch.Tensor, seed: int) -> torch.Tensor:
    """`n` labels whose class counts follow `share` (K,) as closely as whole numbers allow (largest
    remainders), in a seeded order: what a conditional model is asked for when it is scored
    against a split with those class shares. Cycling through the classes asks for them equally,
    which no generator can match to an imbalanced split (crawl-tiles' classes hold 10-36%)."""
    share = share.double().clamp_min(0)
    exact = share / share.sum() * n
    counts = exact.floor().long()
    counts[torch.argsort(exact - counts, descending=True)[: n - int(counts.sum())]] += 1
    labels = torch.repeat_interleave(torch.arange(len(share)), counts)
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def evaluation_labels(model: nn.Module, n: int, share: torch.Tensor | None, seed: int) -> torch.Tensor | None:
    """The labels a model is scored with: None for an unconditional model, the split's class
    shares where they are known for its classes (`share_labels`), else cycling."""
    k = getattr(model, "num_classes", 0)
    if not k:
        return None
    if share is not None and len(share) == k and float(share.sum()) > 0:
        return share_labels(n, share, seed)
    return torch.arange(n) % k


def generate(ckpt: LoadedCheckpoint, n: int, seed: int, label: int | None = None,
             truncation: float | None = None, max_n: int | None = MAX_GENERATE, precision: str | None = None,
             standard_prior: bool = False, labels: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Generate `n` images from `seed` (the same seed gives the same latents at any batch size).

    Args:
        max_n: refuse larger requests (None: no limit, for evaluation).
        precision: 'fp32' or 'bf16' forward passes (default: the precision the model trained in,
            fp32 where bf16 is only emulated).
        standard_prior: a VAE with a fitted prior samples N(0, I) instead (to compare).
        labels: a conditional model's label per image (evaluation's `evaluation_labels`), instead
            of `label` or cycling.

    Returns:
        images (n, C, H, W) in [-1, 1], the latents used (w for W models), and the labels used (or None).

    Raises:
        LatentForgeError: n out of range, or a label the model does not have.
    """
    if n < 1 or (max_n is not None and n > max_n):
        raise LatentForgeError(f"n must be between 1 and {max_n} (got {n})")
    net = edit_model(ckpt.inference_generator())
    labels = default_labels(ckpt, n, label) if labels is None else labels
    z = seeded_latents(net, n, seed, truncation, labels, None if standard_prior else ckpt.latent_prior)
    device = next(net.parameters()).device.type
    return decode_latents(net, z, labels, precision=precision or inference_precision(ckpt.precision, device)), z, labels


def seeded_latents(model: nn.Module, n: int, seed: int, truncation: float | None = None,
                   labels: torch.Tensor | None = None, prior: nn.Module | None = None) -> torch.Tensor:
    """A seed's `n` edit latents for `model` (an `editing.space.edit_model`): z drawn by
    `sample_latents` (truncation: redraw beyond ±truncation), or for a W model w mapped from that
    noise (truncation: StyleGAN's ψ towards the mean w). A VAE's fitted `prior`
    (`models.prior.GaussianMixturePrior`, `LoadedCheckpoint.latent_prior`) maps that same noise
    into its mixture."""
    if prior is not None:
        return prior.sample(sample_latents(n, model.z_dim, seed, truncation), component_uniforms(n, seed))
    if not hasattr(model, "latents_from_noise"):
        return sample_latents(n, model.z_dim, seed, truncation)
    return latents_from_noise(model, sample_latents(n, noise_dim(model), seed), labels, truncation)
