"""Checks of a run against its data and hardware, made by the driver before any worker starts
(no Ray). Every problem is reported together; a setting that could not take effect is an error,
never a silent no-op."""

from __future__ import annotations

import functools
from pathlib import Path

from latentforge.builders import check_compatible
from latentforge.data.spec import DataSpec
from latentforge.errors import ConfigError


def check_buildable(cfg, spec: DataSpec):
    """Build the networks once on the 'meta' device (no memory, no compute), so that what only a
    constructor can check (an attention side the resolution lacks, a plug-in's own arguments)
    fails here as a ConfigError instead of in every Ray worker; then run one forward pass there, so
    that a network whose output has the wrong shape (a plug-in's generator drawing another size, a
    discriminator with several logits per image) is named here, not found inside a loss at step 0.

    Returns:
        The networks, on the meta device: (generator, discriminator) or the VAE.
    """
    import torch

    from latentforge.builders import build_gan, build_vae

    with torch.device("meta"):
        nets = build_gan(cfg.model, spec) if cfg.algorithm == "gan" else build_vae(cfg.model, spec)
    if cfg.algorithm == "gan":
        _check_random_inputs(cfg, nets[0])
    _check_output_shapes(cfg, spec, nets)
    return nets


def _takes_randomness(fn) -> bool:
    import inspect

    params = inspect.signature(fn).parameters.values()
    return any(p.name == "randomness" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _check_random_inputs(cfg, g) -> None:
    """A generator's `random_inputs()` (docs/models.md, 'Your own architecture'): a spec training
    can draw, and a `forward` (and `path_lengths`, where the path-length regulariser calls it) that
    takes `randomness=`."""
    spec_fn = getattr(g, "random_inputs", None)
    if spec_fn is None:
        return
    name, see = type(g).__name__, "(the model interface: docs/models.md, 'Your own architecture')"
    form = "{name: ('normal' | 'uniform', per-sample shape)}"
    if not callable(spec_fn):
        raise ConfigError(f"{name}.random_inputs must be a method returning {form} {see}")
    spec = spec_fn()
    for key, value in (spec.items() if isinstance(spec, dict) else [(None, None)]):
        ok = (isinstance(value, (tuple, list)) and len(value) == 2 and value[0] in ("normal", "uniform")
              and isinstance(value[1], (tuple, list)) and all(isinstance(n, int) and n > 0 for n in value[1]))
        if not ok:
            got = f"{key!r}: {value!r}" if key is not None else type(spec).__name__
            raise ConfigError(f"{name}.random_inputs() must return {form}, e.g. {{'noise': ('normal', (1, 8, 8))}}; "
                              f"got {got} {see}")
    if not spec:
        return
    if not _takes_randomness(g.forward):
        raise ConfigError(f"{name}.random_inputs() names random inputs, but {name}.forward takes no `randomness`: "
                          f"add `randomness=None` to forward(z, labels, randomness=None) {see}")
    if cfg.gan.pl_weight > 0 and callable(getattr(g, "path_lengths", None)) and not _takes_randomness(g.path_lengths):
        raise ConfigError(f"{name}.random_inputs() names random inputs, but {name}.path_lengths takes no `randomness` "
                          f"(gan.pl_weight calls it): add `randomness=None` to it {see}")


def _check_output_shapes(cfg, spec: DataSpec, nets) -> None:
    import torch

    shape = tuple(spec.image_shape)
    labels = torch.zeros(2, dtype=torch.long, device="meta") if cfg.model.conditional and spec.num_classes else None
    arch = cfg.model.arch
    try:
        with torch.no_grad():
            if cfg.algorithm == "gan":
                g, d = nets
                images = g(torch.zeros(2, g.z_dim, device="meta"), labels)
                logits = d(torch.zeros(2, *shape, device="meta"), labels)
                outputs = [("generator", images, (2, *shape), "images (B, C, H, W) of the data's shape"),
                           ("discriminator", logits, (2,), "one logit per image, (B,)")]
            else:
                raw = nets(torch.zeros(2, *shape, device="meta"), labels)[0]
                outputs = [("vae", raw, (2, *shape), "a reconstruction (B, C, H, W) of the data's shape")]
    except (NotImplementedError, RuntimeError, TypeError, ValueError, AttributeError, IndexError):
        # an operation without a meta kernel (a plug-in's custom op): the shapes are checked at the
        # first step instead. Built-in families all run here (tests/unit/models/test_families.py).
        return
    for role, out, want, what in outputs:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(f"the {role} of model.arch {arch!r} returns {got} for a batch of 2; it must return {what}: "
                              f"{want} for this dataset (the model interface: docs/models.md)")


def check_training_setup(cfg, spec: DataSpec, workers: int, train_rows: int, use_gpu: bool = False) -> None:
    """Raise ConfigError listing every way `cfg` cannot run as asked.

    Args:
        cfg: the validated experiment config.
        spec: the data the models are built for.
        workers: data-parallel processes (1 for a single-process run).
        train_rows: images in the training split.
        use_gpu: whether the workers train on GPUs.
    """
    check_compatible(cfg.model, spec, cfg.algorithm)
    nets = check_buildable(cfg, spec)
    t = cfg.train
    problems = []
    if t.global_batch_size % workers:
        problems.append(f"train.global_batch_size={t.global_batch_size} is not divisible by {workers} workers; "
                        "choose a multiple of the worker count")
    elif t.per_worker_batch_size is not None and t.per_worker_batch_size != t.global_batch_size // workers:
        problems.append(
            f"train.per_worker_batch_size={t.per_worker_batch_size} does not match global batch "
            f"{t.global_batch_size} / {workers} workers = {t.global_batch_size // workers}; the per-worker batch "
            "is derived from the global one: set train.global_batch_size instead, or remove per_worker_batch_size")
    elif (t.global_batch_size // workers) % t.accumulate:
        problems.append(f"train.accumulate={t.accumulate} does not divide the per-worker batch "
                        f"({t.global_batch_size} / {workers} workers = {t.global_batch_size // workers}); choose an "
                        "accumulate that divides it, so every micro-batch has the same size")
    elif cfg.algorithm == "gan":
        problems += _minibatch_std_problems(nets[1], t.global_batch_size // workers // t.accumulate,
                                            3 if cfg.gan.loss == "wgan-gp" else 2)
    if train_rows < t.global_batch_size:
        problems.append(f"train.global_batch_size={t.global_batch_size} is larger than the training split "
                        f"({train_rows} images)")
    if t.sync_batchnorm and not use_gpu:
        problems.append("train.sync_batchnorm needs GPU workers (--gpus): SyncBatchNorm does not run on CPU. "
                        "For exact data parallelism on CPU use a batch-independent norm (model.g_norm: layer), "
                        "or set train.sync_batchnorm=false")
    if t.tf32 and not use_gpu:
        problems.append("train.tf32 applies to CUDA GPUs only (--gpus); on CPU use train.precision=bf16 for speed")
    if problems:
        raise ConfigError("config does not fit this run: " + "; ".join(problems))


def _minibatch_std_problems(d, micro: int, parts: int) -> list[str]:
    """The discriminator sees reals, fakes (and WGAN-GP's mixes) of `micro` images each in one
    batch; a minibatch-std group (Karras et al. 2018) straddling two of them would make the real
    logits, and R1, depend on the fakes. stylegan2-ada-pytorch never mixes them (it runs D on each
    separately and requires its per-GPU batch to split into whole groups)."""
    from latentforge.models.stylegan2 import mbstd_group_size

    group = getattr(d, "mbstd_group", 0)
    if not group:
        return []
    g = mbstd_group_size(parts * micro, group)
    if micro % g == 0:
        return []
    fits = [k for k in range(1, group + 1) if micro % k == 0][-1]
    return [f"model.d_options.mbstd_group={group} does not split the discriminator's micro-batch of {micro} images per "
            f"worker into whole groups, so a group would hold real and generated images together; set "
            f"train.global_batch_size so that the per-worker micro-batch is a multiple of {group}, or set "
            f"model.d_options.mbstd_group={fits}"]


def inference_data_loader(cfg, data_dir: str | Path):
    """What `run_training(inference_data=...)` reads on the chief: for a VAE with a fitted prior, a
    seeded sample of `vae.prior_images` training images, read once on first use; else None."""
    if cfg.algorithm != "vae" or cfg.vae.prior != "gmm":
        return None
    from latentforge.data.dataset import PreparedDataset

    return functools.cache(lambda: PreparedDataset(data_dir).sample("train", cfg.vae.prior_images, seed=cfg.train.seed))
