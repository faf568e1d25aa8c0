"""Image → latent: the VAE's encoder, or optimisation-based projection for GANs (and VAEs when
only part of the image is observed).

Projection: Adam on z from several seeded random starts, minimising pixel MSE on the observed
pixels (+ a feature loss with the dataset's feature network when the whole image is observed)
+ a Gaussian prior term λ·||z||²/D; the best start per image wins.

In W (a `editing.space.WSpace` model) the first start is the mean w, as in StyleGAN2's projector
(Karras et al. 2020), the others are mapped random z, and the prior pulls towards the mean w:
λ·||w − w̄||²/D. `plus=True` optimises one w per layer (W+: Abdal et al. 2019, Image2StyleGAN),
which fits images closer at the cost of leaving the space the generator was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.errors import LatentForgeError


@dataclass
class Inversion:
    latent: torch.Tensor  # (N, D), or (N, num_ws, D) for a W+ projection
    reconstruction: torch.Tensor  # (N, C, H, W) in [-1, 1]
    error: torch.Tensor  # (N,) MSE on the observed pixels, [-1, 1] units
    steps: int  # optimisation steps per start (0 for an encoder)
    candidates: torch.Tensor | None = None  # (R, N, C, H, W) every start's decoding (projection only)
    candidate_errors: torch.Tensor | None = None  # (R, N)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _back(inv: Inversion, device: torch.device) -> Inversion:
    """An inversion's tensors on the caller's device (that of the images it was given)."""
    return replace(inv, **{f.name: v.to(device) for f in fields(inv) if isinstance(v := getattr(inv, f.name), torch.Tensor)})


@torch.no_grad()
def encode_vae(vae: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None) -> Inversion:
    """Posterior means and their reconstructions, computed on the VAE's device and handed back on
    the images' device."""
    vae.eval()
    device = _model_device(vae)
    x = images.to(device)
    mu, _ = vae.encode(x, _to(labels, device))
    recon = vae.decode(mu, _to(labels, device))
    return _back(Inversion(mu, recon, (recon - x).pow(2).flatten(1).mean(1), 0), images.device)


class ProjectionStopped(LatentForgeError):
    """`project` was told to stop (its `should_stop()` turned true) before finishing."""


def project(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None,
            mask: torch.Tensor | None = None, feature_net: nn.Module | None = None, steps: int = 200,
            restarts: int = 4, lr: float = 0.05, prior_weight: float = 1e-3, feature_weight: float = 0.1,
            seed: int = 0, init: torch.Tensor | None = None, should_stop=None, plus: bool = False) -> Inversion:
    """Find latents whose decoded images match `images` where `mask` is 1.

    Args:
        model: a plain generator (GAN) or VAE (its decoder is used), frozen.
        images: (N, C, H, W) in [-1, 1].
        labels: (N,) for conditional models.
        mask: (N, 1 or C, H, W), 1 = observed; None = all observed.
        feature_net: a FeatureClassifier for the perceptual term (used only without a mask), on
            the model's device.
        steps: Adam steps per start.
        restarts: random starts per image (the best one wins).
        lr: Adam learning rate on z.
        prior_weight: weight of ||z||²/D (keeps z where the generator was trained).
        feature_weight: weight of the feature-space MSE.
        seed: seeds the starts.
        init: (N, D) a starting latent (e.g. an encoder's guess) used as the first start.
        should_stop: called before every step; when it returns true, `ProjectionStopped` is raised
            (a server's deadline, or a client that went away).
        plus: W+ (one w per layer) for a model in W; latents come back as (N, num_ws, D).

    Returns:
        The best latent per image, its decoding and its observed-pixel MSE, on the images' device
        (the optimisation runs on the model's: a GPU's, with the images on the CPU).
    """
    from latentforge.editing.space import random_latents

    if plus and not hasattr(model, "num_ws"):
        raise LatentForgeError("W+ projection needs a model with a W space (a StyleGAN-style generator)")
    model.eval()
    n = images.shape[0]
    d = model.z_dim
    caller, device = images.device, _model_device(model)
    images, labels, mask, init = (_to(t, device) for t in (images, labels, mask, init))
    gen = torch.Generator().manual_seed(seed)
    center = getattr(model, "prior_center", None)  # W: the mean w; z: the origin
    z0 = random_latents(model, restarts * n, gen, None if labels is None else labels.repeat(restarts))
    z0 = z0.view(restarts, n, d).to(device)
    if center is not None:
        center = center.detach().float().to(device)
        z0[0] = center  # StyleGAN2's projector starts at the mean w
    if init is not None:
        z0[0] = init
    z = z0.reshape(restarts * n, d)
    if plus:
        z = z[:, None].repeat(1, model.num_ws, 1)
    z = z.clone().requires_grad_(True)
    x = images.repeat(restarts, 1, 1, 1)
    y = None if labels is None else labels.repeat(restarts)
    m = None if mask is None else mask.float().repeat(restarts, 1, 1, 1)
    target_feats = None
    if feature_net is not None and mask is None:
        if next(feature_net.parameters()).device != device:
            raise LatentForgeError(f"the feature network is on {next(feature_net.parameters()).device} and the model on "
                                   f"{device}: the perceptual term needs both on one device")
        with torch.no_grad():
            target_feats = feature_net.features(x)
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    opt = torch.optim.Adam([z], lr=lr)
    try:
        for _ in range(steps):
            if should_stop is not None and should_stop():  # a server's deadline passed, or its client left
                raise ProjectionStopped("projection stopped before its last step")
            out = model.decode(z, y)
            diff = (out - x).pow(2)
            pix = _observed_mse(diff, m)
            dev = z if center is None else z - center
            loss = pix + prior_weight * dev.pow(2).flatten(1).mean(1)
            if target_feats is not None:
                loss = loss + feature_weight * F.mse_loss(feature_net.features(out), target_feats, reduction="none").mean(1)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
    finally:
        for p, r in zip(params, requires):
            p.requires_grad_(r)
    with torch.no_grad():
        out = model.decode(z, y)
        diff = (out - x).pow(2)
        err = _observed_mse(diff, m)
        best = err.view(restarts, n).argmin(0)  # (N,)
        idx = best * n + torch.arange(n, device=device)
        return _back(Inversion(z[idx].detach(), out[idx], err[idx], steps, candidates=out.view(restarts, n, *out.shape[1:]),
                               candidate_errors=err.view(restarts, n)), caller)


def _observed_mse(diff: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per image, the mean of `diff` (B, C, H, W) over observed pixels: a (B, 1, H, W) mask counts
    once per channel, so an RGB image's error is in the same units as without a mask."""
    if mask is None:
        return diff.flatten(1).mean(1)
    mask = mask.expand_as(diff)
    return (diff * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)


def invert(model: nn.Module, algorithm: str, images: torch.Tensor, labels: torch.Tensor | None = None,
           feature_net: nn.Module | None = None, **kwargs) -> Inversion:
    """The default inversion: the encoder for VAEs, projection for GANs."""
    if algorithm == "vae":
        return encode_vae(model, images, labels)
    return project(model, images, labels, feature_net=feature_net, **kwargs)
