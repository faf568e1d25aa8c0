"""`latentforge bench eval`: how long evaluating N samples takes, stage by stage."""

from __future__ import annotations

import time

import torch

from latentforge.metrics.distribution import (
    density_coverage,
    frechet_distance,
    gaussian_stats,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from latentforge.metrics.features import ensure_feature_net
from latentforge.bench import mnist5k_unless


def bench_eval(data_dir: str | None = None, samples: int = 5000, checkpoint: str | None = None, log=print) -> dict:
    """Time generation, feature extraction and each metric for `samples` images on mnist5k."""
    from latentforge.data.spec import DataSpec
    from latentforge.builders import build_gan
    from latentforge.config import load_experiment
    from latentforge.data.dataset import PreparedDataset
    from latentforge.sampling import decode_latents, sample_latents

    data_dir = mnist5k_unless(data_dir)
    net = ensure_feature_net(data_dir, log=log)
    if checkpoint:
        from latentforge.checkpoint import load_checkpoint

        g = load_checkpoint(checkpoint).inference_generator()
    else:
        cfg = load_experiment("dcgan-mnist")
        g, _ = build_gan(cfg.model, DataSpec.from_dataset(PreparedDataset(data_dir)))
    # untimed: the first forward passes pay one-off set-up (allocator, kernel selection)
    few = min(samples, 1000)  # the timed passes' batch shapes
    net.embed(decode_latents(g, sample_latents(few, g.z_dim, 1), torch.arange(few) % g.num_classes if g.num_classes else None))
    timings = {}
    t = time.perf_counter()
    z = sample_latents(samples, g.z_dim, 0)
    labels = torch.arange(samples) % g.num_classes if g.num_classes else None
    fake = decode_latents(g, z, labels)
    timings["generate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    feats, probs = net.embed(fake)
    timings["features_s"] = time.perf_counter() - t
    real = net.real["train"]
    t = time.perf_counter()
    frechet_distance(*gaussian_stats(feats), real.mu.numpy(), real.sigma.numpy())
    timings["fid_s"] = time.perf_counter() - t
    t = time.perf_counter()
    kernel_inception_distance(real.features, feats, subset_size=min(1000, samples))
    timings["kid_s"] = time.perf_counter() - t
    t = time.perf_counter()
    precision_recall(real.features[:5000], feats[:5000])
    density_coverage(real.features[:5000], feats[:5000])
    timings["knn_metrics_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if probs is not None:
        inception_score(probs)
    timings["is_s"] = time.perf_counter() - t
    total = sum(timings.values())
    out = {"samples": samples, "backbone": net.backbone, "threads": torch.get_num_threads(), **timings, "total_s": total}
    for k, v in timings.items():
        log(f"  {k[:-2]:<12} {v:7.2f} s")
    log(f"  {'total':<12} {total:7.2f} s for {samples} samples ({samples / total:.0f} samples/s, backbone {net.backbone})")
    return out
