"""GAN training math: one step = `n_critic` discriminator updates + one generator update.

Data-parallel rules (the same function runs in one process and on N Ray Train workers):
- G and D may each be wrapped in DistributedDataParallel. A forward through a wrapper means
  "this network's gradients are all-reduced in the next backward"; everything else goes through
  `unwrap`. In the D phase fakes come from the unwrapped G under no_grad; in the G phase D's
  parameters are frozen and called unwrapped, so no all-reduce happens for the network that is
  not being updated.
- The discriminator sees real, fake (and penalty inputs) in one concatenated forward, so a DDP
  wrapper runs exactly one forward per backward.
- All noise comes from `GlobalNoise`, so any split of the global batch sees the same numbers.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from latentforge.algorithms.batch import Batch, grad_norm, unwrap
from latentforge.algorithms.ema import ema_decay_at, ema_update
from latentforge.algorithms.losses import get_loss, gradient_penalty, r1_penalty
from latentforge.algorithms.noise import GlobalNoise
from latentforge.algorithms.precision import FP32, Precision


@dataclass
class GANState:
    """Everything a GAN run trains. `g` and `d` may be DDP-wrapped; `g_ema` never is."""

    g: nn.Module
    d: nn.Module
    g_ema: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer


@dataclass
class GANStepMetrics:
    d_loss: float  # discriminator loss of the last critic update (penalties excluded)
    g_loss: float  # generator loss
    d_real: float  # mean sigmoid(D(x)) on real images
    d_fake: float  # mean sigmoid(D(G(z))) on fakes in the D phase
    d_real_logit: float  # mean raw D(x)
    d_fake_logit: float  # mean raw D(G(z))
    d_acc: float  # fraction of real with D(x) > 0 and fakes with D(G(z)) < 0
    gp: float  # gradient penalty (0 unless wgan-gp)
    r1: float  # R1 penalty (0 unless r1_weight > 0)
    grad_norm_d: float  # D gradient norm before clipping (last critic update)
    grad_norm_g: float  # G gradient norm before clipping

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def make_gan_state(g: nn.Module, d: nn.Module, cfg, wrap=lambda m: m) -> GANState:
    """Adam optimisers (TTUR learning rates) and an EMA copy around freshly built G and D.

    Args:
        g, d: plain modules, already on their device.
        cfg: `GANConfig`.
        wrap: applied to G and D after the EMA copy is taken (DDP wrapping on Ray workers).
    """
    g_ema = copy.deepcopy(g).eval().requires_grad_(False)
    betas = (cfg.beta1, cfg.beta2)
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr_g, betas=betas)
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.lr_d, betas=betas)
    return GANState(g=wrap(g), d=wrap(d), g_ema=g_ema, opt_g=opt_g, opt_d=opt_d)


def _clip(params, max_norm: float | None) -> torch.Tensor:
    params = list(params)
    norm = grad_norm(params)
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm


def gan_step(state: GANState, batches: list[Batch], noise: GlobalNoise, cfg, step: int,
             precision: Precision = FP32) -> GANStepMetrics:
    """One GAN training step.

    Args:
        state: networks and optimisers.
        batches: `cfg.n_critic` batches (this worker's share), one per discriminator update;
            the last one's labels also condition the generator update.
        noise: the worker's `GlobalNoise`.
        cfg: `GANConfig` (loss, n_critic, penalties, EMA, clipping).
        step: the global step (0-based); seeds the noise.
        precision: how forward passes run (bf16 autocast, channels_last); losses stay fp32.

    Returns:
        Scalar metrics of the step (this worker's share).
    """
    if len(batches) != cfg.n_critic:
        raise ValueError(f"gan_step needs n_critic={cfg.n_critic} batches, got {len(batches)}")
    loss = get_loss(cfg.loss)
    g_plain, d_plain = unwrap(state.g), unwrap(state.d)
    device = batches[0].images.device
    z_dim = g_plain.z_dim
    zero = torch.zeros((), device=device)

    # 1. Discriminator updates.
    for k, batch in enumerate(batches):
        real, labels = precision.images(batch.images), batch.labels
        b = real.shape[0]
        z = noise.normal(step, GlobalNoise.LATENT_D + 10 * k, b, z_dim).to(device)
        with torch.no_grad(), precision.autocast():
            fake = g_plain(z, labels).float()
        parts = [real, fake]
        use_r1 = cfg.r1_weight > 0
        if use_r1:
            real = real.detach().requires_grad_(True)
            parts[0] = real
        if loss.needs_gradient_penalty:
            alpha = noise.uniform(step, GlobalNoise.PENALTY_MIX + 10 * k, b, 1, 1, 1).to(device)
            mix = (alpha * real.detach() + (1 - alpha) * fake).requires_grad_(True)
            parts.append(mix)
        d_labels = None if labels is None else labels.repeat(len(parts))
        with precision.autocast():
            logits = state.d(torch.cat(parts), d_labels)  # one forward: DDP all-reduces D's grads
        logits = logits.float()
        real_logits, fake_logits = logits[:b], logits[b : 2 * b]
        d_loss = loss.d_loss(real_logits, fake_logits)
        total = d_loss
        gp = r1 = zero
        if loss.needs_gradient_penalty:
            gp = gradient_penalty(logits[2 * b :], mix)
            total = total + cfg.gp_weight * gp
        if use_r1:
            r1 = r1_penalty(real_logits, real)
            total = total + 0.5 * cfg.r1_weight * r1
        state.opt_d.zero_grad(set_to_none=True)
        total.backward()
        gn_d = _clip(state.d.parameters(), cfg.grad_clip)
        state.opt_d.step()

    # 2. Generator update: D frozen and unwrapped, so its gradients are neither computed nor reduced.
    last = batches[-1]
    b = len(last)
    d_plain.requires_grad_(False)
    try:
        z = noise.normal(step, GlobalNoise.LATENT_G, b, z_dim).to(device)
        with precision.autocast():
            fake = state.g(z, last.labels)  # through the wrapper: DDP all-reduces G's grads
            fake_logits_g = d_plain(fake, last.labels)
        g_loss = loss.g_loss(fake_logits_g.float())
        state.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        gn_g = _clip(state.g.parameters(), cfg.grad_clip)
        state.opt_g.step()
    finally:
        d_plain.requires_grad_(True)
    ema_update(state.g_ema, g_plain, ema_decay_at(step, cfg.ema_decay))

    with torch.no_grad():
        rl, fl = real_logits.detach(), fake_logits.detach()
        acc = ((rl > 0).float().mean() + (fl < 0).float().mean()) / 2
        values = torch.stack([
            d_loss.detach(), g_loss.detach(), torch.sigmoid(rl).mean(), torch.sigmoid(fl).mean(),
            rl.mean(), fl.mean(), acc, gp.detach(), r1.detach(), gn_d.to(device), gn_g.to(device),
        ]).tolist()  # one device sync for all metrics
    return GANStepMetrics(*values)
