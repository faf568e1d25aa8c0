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

from latentforge.algorithms.augment import NO_AUGMENT, Augmenter
from latentforge.algorithms.batch import Batch, grad_norm, no_sync_unless, unwrap
from latentforge.algorithms.ema import ema_decay_at, ema_update
from latentforge.algorithms.optim import adam
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


class PathLength:
    """Lazy path-length regularisation (StyleGAN2): every `interval` G updates, the penalty
    (|J_wᵀ y| − a)², with `a` the running mean of the lengths (EMA at rate `decay`, over the global
    batch: `reduce_mean` averages across workers so `a` is the same everywhere), weighted by
    `weight · interval`. Computed on every other sample (the reference's batch shrink of 2), in fp32."""

    def __init__(self, weight: float, interval: int, decay: float, reduce_mean=lambda t: t):
        self.weight, self.interval, self.decay, self.reduce_mean = weight, interval, decay, reduce_mean
        self.mean = 0.0

    def due(self, step: int) -> bool:
        return self.weight > 0 and step % self.interval == 0

    def penalty(self, g: nn.Module, z: torch.Tensor, labels: torch.Tensor | None, y: torch.Tensor,
                randomness: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        lengths = g.path_lengths(z, labels, y, **_as_kwargs(randomness))
        batch_mean = float(self.reduce_mean(lengths.detach().mean().reshape(1)).cpu()[0])
        self.mean = self.mean + self.decay * (batch_mean - self.mean)
        return (lengths - self.mean).square().mean()

    def state_dict(self) -> dict:
        return {"mean": self.mean}

    def load_state_dict(self, st: dict) -> None:
        self.mean = float(st["mean"])


NO_PATH_LENGTH = PathLength(0.0, 1, 0.01)


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
    r1: float  # R1 penalty (0 unless r1_weight > 0, and on updates lazy R1 skips)
    grad_norm_d: float  # D gradient norm before clipping (last critic update)
    grad_norm_g: float  # G gradient norm before clipping
    pl: float = 0.0  # path-length penalty (0 unless pl_weight > 0, and on updates lazy regularisation skips)
    aug_p: float = 0.0  # augmentation probability of D's inputs (ADA's p; 1 for DiffAugment; 0 without)

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
    opt_g = adam(g.parameters(), lr=cfg.lr_g, betas=betas)
    opt_d = adam(d.parameters(), lr=cfg.lr_d, betas=betas)
    return GANState(g=wrap(g), d=wrap(d), g_ema=g_ema, opt_g=opt_g, opt_d=opt_d)


def _clip(params, max_norm: float | None) -> torch.Tensor:
    params = list(params)
    norm = grad_norm(params)
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm


def random_inputs(g: nn.Module, noise: GlobalNoise, step: int, stream: int, local: int,
                  device: torch.device) -> dict[str, torch.Tensor] | None:
    """This worker's slice of the global batch's draws of a generator's own random inputs (its
    `random_inputs()` spec: StyleGAN2's noise maps and style mixing), for the pass whose latents use
    `stream`; None for a generator without any. Drawn like the latents, so N workers equal one."""
    spec = getattr(g, "random_inputs", None)
    spec = spec() if callable(spec) else {}
    out = {}
    for i, (name, (dist, shape)) in enumerate(spec.items()):
        if dist not in ("normal", "uniform"):
            raise ValueError(f"{type(g).__name__}.random_inputs() gives {name!r} the distribution {dist!r}; "
                             "use 'normal' or 'uniform'")
        draw = noise.normal if dist == "normal" else noise.uniform
        out[name] = draw(step, GlobalNoise.RANDOM_INPUTS * (i + 1) + stream, local, *shape).to(device)
    return out or None


def _as_kwargs(randomness: dict[str, torch.Tensor] | None, m: int = 0, size: int | None = None,
               every: int = 1) -> dict:
    """`randomness=` for a generator call (nothing for generators without random inputs), sliced to
    micro-batch `m` of `size` and then to every `every`-th sample."""
    if randomness is None:
        return {}
    return {"randomness": {k: (v if size is None else _micro(v, m, size))[::every] for k, v in randomness.items()}}


def _micro(t: torch.Tensor | None, m: int, size: int) -> torch.Tensor | None:
    return None if t is None else t[m * size : (m + 1) * size]


def gan_step(state: GANState, batches: list[Batch], noise: GlobalNoise, cfg, step: int,
             precision: Precision = FP32, accumulate: int = 1, augment: Augmenter = NO_AUGMENT,
             path_length: PathLength = NO_PATH_LENGTH) -> GANStepMetrics:
    """One GAN training step.

    Args:
        state: networks and optimisers.
        batches: `cfg.n_critic` batches (this worker's share), one per discriminator update;
            the last one's labels also condition the generator update.
        noise: the worker's `GlobalNoise`.
        cfg: `GANConfig` (loss, n_critic, penalties, EMA, clipping).
        step: the global step (0-based); seeds the noise.
        precision: how forward passes run (bf16 autocast, channels_last); losses stay fp32.
        accumulate: micro-batches per batch; each is forwarded and backpropagated alone with its
            loss scaled by 1/accumulate, and DDP all-reduces once, on the last. Noise and
            augmentation are drawn for the whole batch and sliced, so the update equals the
            unsplit one (up to summation order) for BatchNorm-free networks.
        augment: transforms of D's inputs (reals and fakes alike, in the D and the G pass).
        path_length: the lazy path-length regulariser of G (generators with W).

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
    n_aug = augment.n_params

    # 1. Discriminator updates.
    for k, batch in enumerate(batches):
        b = len(batch)
        if b % accumulate:
            raise ValueError(f"a worker batch of {b} images cannot be split into {accumulate} equal micro-batches")
        mb = b // accumulate
        d_update = step * cfg.n_critic + k
        use_r1 = cfg.r1_weight > 0 and d_update % cfg.r1_interval == 0  # lazy R1: every r1_interval updates
        z_all = noise.normal(step, GlobalNoise.LATENT_D + 10 * k, b, z_dim).to(device)
        r_all = random_inputs(g_plain, noise, step, GlobalNoise.LATENT_D + 10 * k, b, device)
        alpha_all = (noise.uniform(step, GlobalNoise.PENALTY_MIX + 10 * k, b, 1, 1, 1).to(device)
                     if loss.needs_gradient_penalty else None)
        u_real = noise.uniform(step, GlobalNoise.AUG_REAL + 10 * k, b, n_aug) if n_aug else None
        u_fake = noise.uniform(step, GlobalNoise.AUG_FAKE + 10 * k, b, n_aug) if n_aug else None
        state.opt_d.zero_grad(set_to_none=True)
        sums = torch.zeros(3, device=device)  # d_loss, gp, r1 (means over micro-batches)
        real_parts, fake_parts = [], []
        for m in range(accumulate):
            real, labels = precision.images(_micro(batch.images, m, mb)), _micro(batch.labels, m, mb)
            with torch.no_grad(), precision.autocast():
                fake = g_plain(_micro(z_all, m, mb), labels, **_as_kwargs(r_all, m, mb)).float()
            if use_r1:
                real = real.detach().requires_grad_(True)  # R1 is the gradient w.r.t. the un-augmented reals
            parts = [real, fake]
            if augment.active:
                parts = [augment(real, _micro(u_real, m, mb)), augment(fake, _micro(u_fake, m, mb))]
            if loss.needs_gradient_penalty:  # between the images D scores: augmented ones where augmentation is on
                alpha = _micro(alpha_all, m, mb)
                mix = (alpha * parts[0].detach() + (1 - alpha) * parts[1].detach()).requires_grad_(True)
                parts.append(mix)
            d_labels = None if labels is None else labels.repeat(len(parts))
            with no_sync_unless(state.d, m == accumulate - 1):
                with precision.autocast():
                    logits = state.d(torch.cat(parts), d_labels)  # one forward: DDP all-reduces D's grads
                logits = logits.float()
                real_logits, fake_logits = logits[:mb], logits[mb : 2 * mb]
                d_loss = loss.d_loss(real_logits, fake_logits)
                total = d_loss
                gp = r1 = zero
                if loss.needs_gradient_penalty:
                    gp = gradient_penalty(logits[2 * mb :], mix)
                    total = total + cfg.gp_weight * gp
                if use_r1:
                    r1 = r1_penalty(real_logits, real)
                    total = total + 0.5 * cfg.r1_weight * cfg.r1_interval * r1
                (total / accumulate).backward()
            sums += torch.stack([d_loss.detach(), gp.detach(), r1.detach()]) / accumulate
            real_parts.append(real_logits.detach())
            fake_parts.append(fake_logits.detach())
        gn_d = _clip(state.d.parameters(), cfg.grad_clip)
        state.opt_d.step()
        rl, fl = torch.cat(real_parts), torch.cat(fake_parts)
        if augment.ada is not None:
            augment.ada.observe(rl)

    # 2. Generator update: D frozen and unwrapped, so its gradients are neither computed nor reduced.
    last = batches[-1]
    b = len(last)
    mb = b // accumulate
    d_plain.requires_grad_(False)
    try:
        z_all = noise.normal(step, GlobalNoise.LATENT_G, b, z_dim).to(device)
        r_all = random_inputs(g_plain, noise, step, GlobalNoise.LATENT_G, b, device)
        u_g = noise.uniform(step, GlobalNoise.AUG_G, b, n_aug) if n_aug else None
        use_pl = path_length.due(step)
        if use_pl:
            _, c, h, w = last.images.shape
            y_all = noise.normal(step, GlobalNoise.PATH_LENGTH, b, c, h, w).to(device) / (h * w) ** 0.5
            r_pl = random_inputs(g_plain, noise, step, GlobalNoise.PATH_LENGTH, b, device)
        state.opt_g.zero_grad(set_to_none=True)
        g_loss_sum = torch.zeros((), device=device)
        pl_sum = torch.zeros((), device=device)
        for m in range(accumulate):
            labels = _micro(last.labels, m, mb)
            with no_sync_unless(state.g, m == accumulate - 1):
                with precision.autocast():
                    # through the wrapper: DDP all-reduces G's grads
                    fake = state.g(_micro(z_all, m, mb), labels, **_as_kwargs(r_all, m, mb))
                    if augment.active:
                        fake = augment(fake, _micro(u_g, m, mb))
                    fake_logits_g = d_plain(fake, labels)
                g_loss = loss.g_loss(fake_logits_g.float())
                total = g_loss
                if use_pl:  # every other sample: the same global samples however the batch is split
                    pl = path_length.penalty(g_plain, _micro(z_all, m, mb)[::2],
                                             None if labels is None else labels[::2], _micro(y_all, m, mb)[::2],
                                             **_as_kwargs(r_pl, m, mb, every=2))
                    total = total + path_length.weight * path_length.interval * pl
                    pl_sum += pl.detach() / accumulate
                (total / accumulate).backward()
            g_loss_sum += g_loss.detach() / accumulate
        gn_g = _clip(state.g.parameters(), cfg.grad_clip)
        state.opt_g.step()
    finally:
        d_plain.requires_grad_(True)
    ema_update(state.g_ema, g_plain, ema_decay_at(step, cfg.ema_decay))

    with torch.no_grad():
        acc = ((rl > 0).float().mean() + (fl < 0).float().mean()) / 2
        values = torch.stack([
            sums[0], g_loss_sum, torch.sigmoid(rl).mean(), torch.sigmoid(fl).mean(),
            rl.mean(), fl.mean(), acc, sums[1], sums[2], gn_d.to(device), gn_g.to(device), pl_sum,
        ]).tolist()  # one device sync for all metrics
    return GANStepMetrics(*values, aug_p=augment.probability)
