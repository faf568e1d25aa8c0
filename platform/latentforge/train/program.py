"""Config → a `TrainingProgram`: the algorithm-specific pieces the training loop drives.

The loop knows nothing about GANs or VAEs; it asks the program for the step function, the
modules to checkpoint, the optimisers to save and a fixed-noise sample grid. Adding an
algorithm means adding a builder to `PROGRAM_BUILDERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from latentforge.algorithms.augment import AdaState, Augmenter
from latentforge.algorithms.batch import Batch, unwrap
from latentforge.algorithms.ema import STANDING_SEED_OFFSET, standing_batchnorm_stats
from latentforge.algorithms.gan import NO_PATH_LENGTH, PathLength, gan_step, make_gan_state
from latentforge.algorithms.losses import get_loss
from latentforge.algorithms.noise import GlobalNoise
from latentforge.algorithms.optim import match_parameter_layouts
from latentforge.algorithms.precision import Precision, precision_for
from latentforge.algorithms.vae import fit_latent_prior, make_vae_state, vae_step
from latentforge.checkpoint import LATENT_PRIOR
from latentforge.data.dataset import Split
from latentforge.data.spec import DataSpec
from latentforge.devices import set_tf32
from latentforge.models.prior import component_uniforms
from latentforge.sampling import decode_latents
from latentforge.builders import build_gan, build_vae
from latentforge.errors import ConfigError


@dataclass
class TrainingProgram:
    algorithm: str  # 'gan' | 'vae'
    batches_per_step: int  # batches consumed by one step (n_critic for GANs)
    step: Callable[[list[Batch], int], dict[str, float]]  # (batches, global step) → metrics
    modules: Callable[[], dict[str, nn.Module]]  # plain modules to checkpoint, by name
    optimizers: dict[str, torch.optim.Optimizer]
    sample: Callable[[], torch.Tensor]  # a fixed-noise sample grid (N, C, H, W) in [-1, 1]
    hyperparameters: dict[str, dict]  # optimiser name -> {"lr": ..., "betas": ...} from the config
    state_dict: Callable[[], dict] = dict  # algorithm state beyond weights and optimisers (ADA's p), checkpointed
    load_state_dict: Callable[[dict], None] = lambda state: None
    # readies the modules that sample (a GAN's EMA copy, a VAE's fitted prior) before a sample grid,
    # an evaluation or a checkpoint; changes nothing that training reads. May return a line to log.
    prepare_inference: Callable[[], str | None] = lambda: None
    # called on every worker before a checkpoint (a collective): makes the state rank 0 saves the
    # global one (ADA's partial sum of signs is each worker's own between adjustments)
    sync_state: Callable[[], None] = lambda: None

    def apply_hyperparameters(self) -> None:
        """Set the configured learning rates and betas on every optimiser: after loading optimiser
        state from a checkpoint (which carries the old ones), e.g. when PBT warm-starts a trial
        from another trial's checkpoint with mutated hyperparameters. How the optimiser runs
        (fused, foreach) stays as built: a checkpoint from before the fused Adam carries neither.
        The loaded moments take their parameters' memory layout (`match_parameter_layouts`)."""
        for name, opt in self.optimizers.items():
            for group in opt.param_groups:
                group.update(self.hyperparameters[name])
                group.update({k: opt.defaults[k] for k in ("fused", "foreach") if k in opt.defaults})
            match_parameter_layouts(opt)


def _grid_inputs(spec: DataSpec, z_dim: int, n: int, seed: int, device, conditional: bool):
    gen = torch.Generator().manual_seed(seed + 12345)
    z = torch.randn(n, z_dim, generator=gen).to(device)
    labels = torch.arange(n, device=device) % spec.num_classes if conditional else None
    return z, labels


def _place(module: nn.Module, device, precision: Precision) -> nn.Module:
    """Move a freshly built module to its device and memory layout (before wrapping or copying)."""
    module = module.to(device)
    return module.to(memory_format=torch.channels_last) if precision.channels_last else module


def make_augmenter(cfg, reduce_mean) -> Augmenter:
    """The run's augmentation of D's inputs; ADA's p moves on the all-reduced r_t, so it is the same
    on every worker."""
    g = cfg.gan
    ada = None
    if g.augment == "ada":
        ada = AdaState(p=g.ada_p_init, target=g.ada_target, interval=g.ada_interval, kimg=g.ada_kimg,
                       images_per_update=cfg.train.global_batch_size, reduce_mean=reduce_mean)
    return Augmenter(g.augment, tuple(g.diffaugment_policy), ada)


def build_gan_program(cfg, spec: DataSpec, noise: GlobalNoise, device, wrap, reduce_mean,
                      inference_data: Callable[[], Split] | None = None) -> TrainingProgram:
    # inference_data is unused: the EMA generator's standing statistics come from its own latents
    precision = precision_for(cfg.train, device)
    augment = make_augmenter(cfg, reduce_mean)
    g, d = build_gan(cfg.model, spec)
    path_length = NO_PATH_LENGTH
    if cfg.gan.pl_weight > 0:
        if not callable(getattr(g, "path_lengths", None)):
            raise ConfigError(f"gan.pl_weight needs a generator with a W space and `path_lengths` (model.arch "
                              f"stylegan2); {cfg.model.arch!r} has none: set gan.pl_weight=0")
        path_length = PathLength(cfg.gan.pl_weight, cfg.gan.pl_interval, cfg.gan.pl_decay, reduce_mean)
    state = make_gan_state(_place(g, device, precision), _place(d, device, precision), cfg.gan, wrap=wrap)
    if cfg.train.compile:
        # In place (the modules, their DDP wrappers and checkpoint keys stay as they are); the EMA
        # copy, used for sample grids and evaluation only, stays eager. torch.compile cannot
        # differentiate twice (WGAN-GP and R1 take the gradient of D's input gradient), so D is
        # compiled only when no penalty needs that.
        unwrap(state.g).compile()
        if not (get_loss(cfg.gan.loss).needs_gradient_penalty or cfg.gan.r1_weight > 0):
            unwrap(state.d).compile()
    z, labels = _grid_inputs(spec, cfg.model.z_dim, cfg.train.sample_count, cfg.train.seed, device, cfg.model.conditional)
    return TrainingProgram(
        algorithm="gan",
        batches_per_step=cfg.gan.n_critic,
        step=lambda batches, step: gan_step(state, batches, noise, cfg.gan, step, precision, cfg.train.accumulate,
                                            augment, path_length).as_dict(),
        modules=lambda: {"generator": unwrap(state.g), "discriminator": unwrap(state.d), "generator_ema": state.g_ema},
        optimizers={"generator": state.opt_g, "discriminator": state.opt_d},
        sample=lambda: decode_latents(state.g_ema, z, labels, precision=precision.name),
        hyperparameters={"generator": {"lr": cfg.gan.lr_g, "betas": (cfg.gan.beta1, cfg.gan.beta2)},
                         "discriminator": {"lr": cfg.gan.lr_d, "betas": (cfg.gan.beta1, cfg.gan.beta2)}},
        state_dict=lambda: _gan_algorithm_state(augment, path_length),
        load_state_dict=lambda st: _load_gan_algorithm_state(st, augment, path_length),
        prepare_inference=lambda: standing_batchnorm_stats(state.g_ema, seed=cfg.train.seed + STANDING_SEED_OFFSET),
        sync_state=lambda: augment.ada.sync(device) if augment.ada is not None else None,
    )


def _gan_algorithm_state(augment: Augmenter, path_length: PathLength) -> dict:
    """What a GAN run keeps besides weights and optimisers: ADA's p, the running mean path length."""
    st = {}
    if augment.ada is not None:
        st["ada"] = augment.ada.state_dict()
    if path_length.weight > 0:
        st["path_length"] = path_length.state_dict()
    return st


def _load_gan_algorithm_state(st: dict, augment: Augmenter, path_length: PathLength) -> None:
    if augment.ada is not None and "ada" in st:
        augment.ada.load_state_dict(st["ada"])
    if path_length.weight > 0 and "path_length" in st:
        path_length.load_state_dict(st["path_length"])


def build_vae_program(cfg, spec: DataSpec, noise: GlobalNoise, device, wrap, reduce_mean,
                      inference_data: Callable[[], Split] | None = None) -> TrainingProgram:
    precision = precision_for(cfg.train, device)
    vae = _place(build_vae(cfg.model, spec), device, precision)
    state = make_vae_state(vae, cfg.vae, wrap=wrap)
    if cfg.train.compile:
        unwrap(state.vae).compile()
    z, labels = _grid_inputs(spec, cfg.model.z_dim, cfg.train.sample_count, cfg.train.seed, device, cfg.model.conditional)
    grid_uniforms = component_uniforms(cfg.train.sample_count, cfg.train.seed + 12345)
    fitted: dict[str, nn.Module] = {}  # LATENT_PRIOR -> the prior fitted for the current weights

    def prepare_inference() -> str | None:
        """Fit the prior that samples are drawn from to the current weights (chief only)."""
        if inference_data is None or cfg.vae.prior != "gmm":
            return None
        data = inference_data()
        try:
            fit = fit_latent_prior(unwrap(state.vae), data.images, data.labels, cfg.vae.prior_components,
                                   seed=cfg.train.seed)
        except ValueError as e:  # a diverged model: sample N(0, I) rather than stop training
            fitted.clear()
            return f"latent prior not fitted ({e}); samples come from N(0, I)"
        fitted[LATENT_PRIOR] = fit.prior
        return (f"latent prior: a {fit.prior.components}-component Gaussian mixture fitted to {fit.samples:,} "
                f"training images' posterior means in {fit.iterations} EM iterations (mean log-likelihood "
                f"{fit.log_likelihood:.1f} nats against {fit.standard_log_likelihood:.1f} under N(0, I))")

    def sample() -> torch.Tensor:
        prior = fitted.get(LATENT_PRIOR)
        zz = z if prior is None else prior.sample(z, grid_uniforms)
        return decode_latents(unwrap(state.vae), zz, labels, precision=precision.name)

    return TrainingProgram(
        algorithm="vae",
        batches_per_step=1,
        step=lambda batches, step: vae_step(state, batches[0], noise, cfg.vae, step, precision,
                                            cfg.train.accumulate).as_dict(),
        modules=lambda: {"vae": unwrap(state.vae), **fitted},
        optimizers={"vae": state.opt},
        sample=sample,
        hyperparameters={"vae": {"lr": cfg.vae.lr, "betas": (cfg.vae.beta1, cfg.vae.beta2)}},
        prepare_inference=prepare_inference,
    )


PROGRAM_BUILDERS = {"gan": build_gan_program, "vae": build_vae_program}


def build_program(cfg, spec: DataSpec, noise: GlobalNoise, device="cpu", wrap=lambda m: m,
                  reduce_mean=lambda t: t, inference_data: Callable[[], Split] | None = None) -> TrainingProgram:
    """Build the program for `cfg.algorithm`.

    `reduce_mean` averages a tensor over the workers (state that must agree everywhere, e.g. ADA).
    `inference_data` gives a sample of training images that readying a model for inference may
    read (a VAE fits its latent prior to them; None: it samples N(0, I)). Only the chief calls it.

    Weights are initialised from `cfg.train.seed`, so every worker builds identical networks.
    """
    torch.manual_seed(cfg.train.seed)
    if torch.device(device).type == "cuda":
        set_tf32(cfg.train.tf32)
    return PROGRAM_BUILDERS[cfg.algorithm](cfg, spec, noise, torch.device(device), wrap, reduce_mean, inference_data)
