"""`latentforge bench quality`: train every mnist preset for a fixed budget and tabulate
FID, KID, precision, recall, coverage, class coverage (and PSNR for VAEs) in docs/quality.md."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from latentforge.config import load_experiment
from latentforge.metrics.evaluate import evaluate
from latentforge.metrics.features import ensure_feature_net
from latentforge.storage import atomic_write_text
from latentforge.train.local import train_local
from latentforge.bench import mnist5k_unless

MNIST_PRESETS = ("dcgan-mnist", "sngan-hinge-mnist", "wgangp-mnist", "cdcgan-mnist", "vae-mnist", "cvae-mnist")
COLUMNS = [("fid", "FID ↓", "{:.1f}"), ("kid", "KID ↓", "{:.2f}"), ("precision", "precision ↑", "{:.3f}"),
           ("recall", "recall ↑", "{:.3f}"), ("coverage", "coverage ↑", "{:.3f}"),
           ("class_coverage", "class cov. ↑", "{:.2f}"), ("inception_score", "IS ↑", "{:.2f}"),
           ("class_accuracy", "cond. acc. ↑", "{:.3f}"), ("recon_psnr", "recon PSNR ↑", "{:.1f}"),
           ("val_neg_elbo", "−ELBO ↓", "{:.1f}")]


def bench_quality(data_dir: str | None, steps: int, samples: int = 5000, presets=MNIST_PRESETS,
                  out: str = "docs/quality.md", modes=("fp32",), seeds=(0,), log=print) -> list[dict]:
    """Train each preset with `--workers 0` for `steps` steps (seed 0) in each precision/layout
    mode (`bench.train_bench.MODES`), evaluate, write a table."""
    from latentforge.bench.train_bench import MODES

    data_dir = mnist5k_unless(data_dir)
    net = ensure_feature_net(data_dir, log=log)
    rows = []
    for preset, mode, seed in [(p, m, s) for p in presets for m in modes for s in seeds]:
        cfg = load_experiment(preset, {"train.steps": steps, "train.tracking": "none", "train.log_every": max(1, steps // 4),
                                       "train.checkpoint_every": steps, "train.sample_every": steps, "train.seed": seed,
                                       **MODES[mode]})
        run = Path(tempfile.mkdtemp(prefix=f"lf-quality-{preset}-"))
        t0 = time.time()
        train_local(cfg, data_dir, run, log=log)
        seconds = time.time() - t0
        result = evaluate(run, data_dir, samples=samples, net=net, log=log)
        label = preset if modes == ("fp32",) else f"{preset} ({mode})"
        label += f", seed {seed}" if len(seeds) > 1 else ""
        rows.append({"preset": label, "base_preset": preset, "mode": mode, "seed": seed, "steps": steps,
                     "train_seconds": seconds, **result})
        log(f"{label}: FID {result['fid']:.1f}, recall {result['recall']:.3f} ({seconds:.0f}s)")
    lines = [
        "# Sample quality on mnist5k",
        "",
        f"Made by `latentforge bench quality --steps {steps} --samples {samples}"
        + (f" --modes {','.join(modes)}" if modes != ("fp32",) else "")
        + (f" --seeds {','.join(map(str, seeds))}" if len(seeds) > 1 else "") + "` on "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}: every preset trained from seed "
        f"{', '.join(map(str, seeds))} for {steps} steps "
        f"(global batch 64; a WGAN-GP step is 5 critic updates) in one process (`--workers 0`), then "
        f"{samples} samples scored against the training split.",
        "",
        f"Backbone: `{net.backbone}`, the dataset's own classifier (validation accuracy "
        f"{net.val_accuracy:.1%}); these numbers compare runs on this dataset, not with papers "
        "(use `latentforge evaluate --inception WEIGHTS` for that).",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; wall times include contention "
        "from anything else running.",
        "",
        "| preset | train time | " + " | ".join(c[1] for c in COLUMNS) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in COLUMNS) + " |",
    ]
    if len(seeds) > 1:  # GAN metrics move with the seed: the mean over seeds is what compares modes
        for preset, mode in [(p, m) for p in presets for m in modes]:
            group = [r for r in rows if r.get("base_preset") == preset and r["mode"] == mode]
            mean = {c[0]: sum(r[c[0]] for r in group) / len(group) for c in COLUMNS if all(c[0] in r for r in group)}
            label = preset if modes == ("fp32",) else f"{preset} ({mode})"
            rows.append({"preset": f"**{label}, mean of {len(group)} seeds**", "mode": mode, "seed": None,
                         "train_seconds": sum(r["train_seconds"] for r in group) / len(group), **mean})
    for r in rows:
        cells = [c[2].format(r[c[0]]) if c[0] in r else "—" for c in COLUMNS]
        lines.append(f"| {r['preset']} | {r['train_seconds'] / 60:.1f} min | " + " | ".join(cells) + " |")
    lines += ["", "Real validation images scored the same way give the floor for this backbone:", ""]
    real = evaluate_real_floor(data_dir, net)
    lines.append("| real val split | — | " + " | ".join(c[2].format(real[c[0]]) if c[0] in real else "—" for c in COLUMNS) + " |")
    atomic_write_text(out, "\n".join(lines) + "\n")
    log(f"wrote {out}")
    return rows


def evaluate_real_floor(data_dir, net) -> dict:
    from latentforge.data.dataset import PreparedDataset
    from latentforge.images import to_model_range
    from latentforge.metrics.evaluate import distribution_metrics

    return distribution_metrics(to_model_range(PreparedDataset(data_dir).load("val").images), net, "train")
