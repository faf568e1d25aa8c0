"""Checks of a run against its data and hardware, made by the driver before any worker starts
(no Ray). Every problem is reported together; a setting that could not take effect is an error,
never a silent no-op."""

from __future__ import annotations

import functools
from pathlib import Path

from latentforge.builders import check_compatible
from latentforge.data.spec import DataSpec
from latentforge.errors import ConfigError


def check_buildable(cfg, spec: DataSpec) -> None:
    """Build the networks once on the 'meta' device (no memory, no compute), so that what only a
    constructor can check (an attention side the resolution lacks, a plug-in's own arguments)
    fails here as a ConfigError instead of in every Ray worker."""
    import torch

    from latentforge.builders import build_gan, build_vae

    with torch.device("meta"):
        build_gan(cfg.model, spec) if cfg.algorithm == "gan" else build_vae(cfg.model, spec)


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
    check_buildable(cfg, spec)
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


def inference_data_loader(cfg, data_dir: str | Path):
    """What `run_training(inference_data=...)` reads on the chief: for a VAE with a fitted prior, a
    seeded sample of `vae.prior_images` training images, read once on first use; else None."""
    if cfg.algorithm != "vae" or cfg.vae.prior != "gmm":
        return None
    from latentforge.data.dataset import PreparedDataset

    return functools.cache(lambda: PreparedDataset(data_dir).sample("train", cfg.vae.prior_images, seed=cfg.train.seed))
