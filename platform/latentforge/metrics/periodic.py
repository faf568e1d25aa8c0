"""Periodic evaluation during training (chief only): a small sample scored against the
dataset's stored real statistics, reported with the training metrics so that Tune's stoppers
and the dashboards can read FID, recall and class coverage while a run is still going."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from latentforge.algorithms.precision import resolve_precision
from latentforge.checkpoint import LATENT_PRIOR
from latentforge.data.dataset import PreparedDataset
from latentforge.metrics.evaluate import distribution_metrics, split_class_share, vae_reconstruction_metrics
from latentforge.metrics.features import load_feature_net
from latentforge.metrics.registry import REPORTED_METRICS
from latentforge.sampling import decode_latents, evaluation_labels, seeded_latents

REPORTED = tuple(REPORTED_METRICS)


def make_periodic_evaluator(dataset_dir: str | Path, samples: int, seed: int = 0, device="cpu",
                            vae_sigma: float = 0.1, precision: str = "fp32") -> Callable:
    """A function (program, step) → {metric: value} for `run_training(evaluate=...)`.

    The latents are fixed (from `seed`) so successive evaluations differ only by the model.
    """
    precision = resolve_precision(precision, torch.device(device).type)
    net = load_feature_net(dataset_dir, device=device)
    ds = PreparedDataset(dataset_dir)
    share = split_class_share(ds, "train")

    def evaluate(program, step: int) -> dict:
        t0 = time.time()
        modules = program.modules()
        generator = modules["generator_ema"] if program.algorithm == "gan" else modules["vae"]
        labels = evaluation_labels(generator, samples, share, seed)
        z = seeded_latents(generator, samples, seed, labels=labels, prior=modules.get(LATENT_PRIOR))  # what generate draws
        images = decode_latents(generator, z, labels, precision=precision)
        out = distribution_metrics(images, net, "train", seed, labels)
        if program.algorithm == "vae":
            out.update(vae_reconstruction_metrics(generator, ds, vae_sigma, max_images=1000))
        result = {k: float(out[k]) for k in REPORTED if k in out}
        result["eval_samples"] = samples
        result["eval_seconds"] = time.time() - t0
        return result

    return evaluate
