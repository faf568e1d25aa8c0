"""VAE training math: the ELBO with KL annealing (beta-VAE when beta > 1)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.algorithms.batch import Batch, grad_norm, no_sync_unless, unwrap
from latentforge.algorithms.noise import GlobalNoise
from latentforge.algorithms.optim import adam
from latentforge.algorithms.precision import FP32, Precision


@dataclass
class VAEState:
    """A VAE run's trainable state; `vae` may be DDP-wrapped."""

    vae: nn.Module
    opt: torch.optim.Optimizer


@dataclass
class VAEStepMetrics:
    loss: float  # the optimised objective: nll + beta_t * kl, nats per image
    nll: float  # reconstruction negative log-likelihood, nats per image
    kl: float  # KL(q(z|x) || N(0, I)), nats per image
    elbo: float  # -(nll + kl), nats per image (beta = 1)
    beta_t: float  # the annealed KL weight used this step
    grad_norm: float  # gradient norm before clipping

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def make_vae_state(vae: nn.Module, cfg, wrap=lambda m: m) -> VAEState:
    opt = adam(vae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    return VAEState(vae=wrap(vae), opt=opt)


def decoder_sigma(vae: nn.Module, fixed: float) -> float | torch.Tensor:
    """The Gaussian decoder's std: a VAE's learned per-channel `decoder_log_sigma` (shaped to
    broadcast over (B, C, H, W)) when it has one, else the configured fixed value."""
    log_sigma = getattr(vae, "decoder_log_sigma", None)
    if log_sigma is None:
        return fixed
    return log_sigma.float().exp()[None, :, None, None]


def reconstruction_nll(raw: torch.Tensor, x: torch.Tensor, likelihood: str, sigma: float | torch.Tensor) -> torch.Tensor:
    """Per-image −log p(x|z) (B,), summed over pixels.

    Args:
        raw: decoder output: logits (bernoulli) or mean in [-1, 1] (gaussian), (B, C, H, W).
        x: targets in [-1, 1].
        likelihood: 'bernoulli' (targets mapped to [0, 1]) or 'gaussian' (fixed std `sigma`).
    """
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(raw, (x + 1) / 2, reduction="none").flatten(1).sum(1)
    sigma = torch.as_tensor(sigma, dtype=raw.dtype, device=raw.device)
    per_pixel = 0.5 * ((x - raw) / sigma).pow(2) + torch.log(sigma) + 0.5 * math.log(2 * math.pi)
    return per_pixel.flatten(1).sum(1)


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-image KL(N(mu, exp(logvar)) || N(0, I)) (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)


def kl_weight(step: int, beta: float, warmup_steps: int) -> float:
    """Linear KL annealing: beta * min(1, (step+1)/warmup)."""
    return beta if warmup_steps <= 0 else beta * min(1.0, (step + 1) / warmup_steps)


def vae_step(state: VAEState, batch: Batch, noise: GlobalNoise, cfg, step: int,
             precision: Precision = FP32, accumulate: int = 1) -> VAEStepMetrics:
    """One VAE update on this worker's share of a global batch.

    Args:
        state: the VAE and its optimiser.
        batch: images in [-1, 1] and labels (needed when the VAE is conditional).
        noise: the worker's `GlobalNoise` (reparameterisation noise).
        cfg: `VAEConfig`.
        step: the global step (0-based).
        precision: how the forward pass runs (bf16 autocast, channels_last); the ELBO stays fp32.
        accumulate: micro-batches, each backpropagated alone (DDP all-reduces on the last).
    """
    plain = unwrap(state.vae)
    b = len(batch)
    if b % accumulate:
        raise ValueError(f"a worker batch of {b} images cannot be split into {accumulate} equal micro-batches")
    mb = b // accumulate
    eps_all = noise.normal(step, GlobalNoise.REPARAM, b, plain.z_dim).to(batch.images.device)
    beta_t = kl_weight(step, cfg.beta, cfg.kl_warmup_steps)
    state.opt.zero_grad(set_to_none=True)
    nlls, kls, losses = [], [], []
    for m in range(accumulate):
        sl = slice(m * mb, (m + 1) * mb)
        x, y = precision.images(batch.images[sl]), None if batch.labels is None else batch.labels[sl]
        last = m == accumulate - 1
        with no_sync_unless(state.vae, last):
            with precision.autocast():
                raw, mu, logvar = state.vae(x, y, noise=eps_all[sl])
            raw, mu, logvar = raw.float(), mu.float(), logvar.float()
            nll = reconstruction_nll(raw, x, plain.likelihood, decoder_sigma(plain, cfg.decoder_sigma))
            kl = kl_standard_normal(mu, logvar)
            loss = (nll + beta_t * kl).mean()
            (loss / accumulate).backward()
        nlls.append(nll.detach()), kls.append(kl.detach()), losses.append(loss.detach())
    nll, kl, loss = torch.cat(nlls), torch.cat(kls), torch.stack(losses).mean()
    params = list(state.vae.parameters())
    gn = grad_norm(params)
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    state.opt.step()
    with torch.no_grad():
        nll_m, kl_m = nll.mean(), kl.mean()
        values = torch.stack([loss.detach(), nll_m, kl_m, -(nll_m + kl_m), gn.to(nll_m.device)]).tolist()
    return VAEStepMetrics(loss=values[0], nll=values[1], kl=values[2], elbo=values[3], beta_t=beta_t, grad_norm=values[4])


@torch.no_grad()
def vae_negative_elbo(vae: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, sigma: float = 0.1,
                      seed: int = 0, batch_size: int = 500) -> dict[str, float]:
    """Mean −ELBO, NLL and KL (nats per image) of a plain VAE on data, one seeded posterior sample.

    Args:
        vae: an unwrapped VAE (evaluated in eval mode).
        images: (N, C, H, W) in [-1, 1].
        labels: (N,) or None.
        sigma: Gaussian decoder std (ignored for bernoulli, and where the VAE learns its own).
        seed: seeds the reparameterisation noise, so repeated calls agree.
    """
    was_training = vae.training
    vae.eval()
    gen = torch.Generator().manual_seed(seed)
    device = next(vae.parameters()).device
    nll_sum = kl_sum = 0.0
    try:
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device)
            y = None if labels is None else labels[i : i + batch_size].to(device)
            eps = torch.randn(len(x), vae.z_dim, generator=gen).to(device)
            raw, mu, logvar = vae(x, y, noise=eps)
            nll_sum += reconstruction_nll(raw, x, vae.likelihood, decoder_sigma(vae, sigma)).sum().item()
            kl_sum += kl_standard_normal(mu, logvar).sum().item()
    finally:
        vae.train(was_training)
    n = len(images)
    return {"neg_elbo": (nll_sum + kl_sum) / n, "nll": nll_sum / n, "kl": kl_sum / n}


@torch.no_grad()
def posterior_means(vae: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor | None,
                    batch_size: int = 500) -> torch.Tensor:
    """(N, z_dim) posterior means of uint8 images, on the VAE's device (eval mode, fp32; the mode is restored)."""
    from latentforge.images import to_model_range

    was_training = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    out = []
    try:
        for i in range(0, len(images_uint8), batch_size):
            x = to_model_range(images_uint8[i : i + batch_size]).to(device)
            y = None if labels is None or not vae.num_classes else labels[i : i + batch_size].to(device)
            out.append(vae.encode(x, y)[0].float())
    finally:
        vae.train(was_training)
    return torch.cat(out) if out else torch.empty(0, vae.z_dim, device=device)


def fit_latent_prior(vae: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor | None, components: int,
                     seed: int):
    """Fit a `models.prior.GaussianMixturePrior` to the posterior means of training images (ex-post
    density estimation, Ghosh et al. 2020): what the VAE's samples are then drawn from.

    Returns:
        a `models.prior.PriorFit`.

    Raises:
        ValueError: no images, or means that are not finite (a diverged model).
    """
    from latentforge.models.prior import fit_gaussian_mixture

    return fit_gaussian_mixture(posterior_means(vae, images_uint8, labels), components, seed=seed)
