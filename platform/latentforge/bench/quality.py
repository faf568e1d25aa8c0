"""`latentforge bench quality`: train every mnist preset for a fixed budget and tabulate
FID, KID, precision, recall, coverage, class coverage (and PSNR for VAEs) in docs/quality.md."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from latentforge.config import load_experiment, parse_override
from latentforge.metrics.evaluate import evaluate
from latentforge.metrics.features import ensure_feature_net
from latentforge.metrics.registry import METRICS, metric_values
from latentforge.storage import atomic_write_text
from latentforge.train.local import train_local
from latentforge.bench import mnist5k_unless

MNIST_PRESETS = ("dcgan-mnist", "sngan-hinge-mnist", "wgangp-mnist", "cdcgan-mnist", "resnet-mnist",
                 "resnet-diffaug-mnist", "vae-mnist", "cvae-mnist", "resnet-vae-mnist")
# the metrics a quality row shows; headings and formats come from the metric registry
SHOWN = ("fid", "kid", "precision", "recall", "coverage", "class_coverage", "inception_score", "class_accuracy",
         "recon_psnr", "val_neg_elbo")
COLUMNS = [(name, METRICS[name].column, METRICS[name].fmt) for name in SHOWN]


def parse_variant(spec: str) -> tuple[str, dict]:
    """'resnet-diffaug-mnist@gan.ema_decay=0,gan.r1_weight=1' → (preset, overrides): ablations of
    one ingredient, side by side with the preset itself.

    Raises:
        ConfigError: an override without '='.
    """
    preset, _, rest = spec.partition("@")
    return preset, dict(parse_override(item) for item in rest.split(",") if item)


def bench_quality(data_dir: str | None, steps: int, samples: int = 5000, presets=MNIST_PRESETS,
                  out: str = "quality.md", modes=("fp32",), seeds=(0,), log=print) -> list[dict]:
    """Train each preset (or `preset@key=value,...` variant) with `--workers 0` for `steps` steps in
    each precision/layout mode and seed, evaluate, and write the table, rewritten after every row
    so a long benchmark shows its results as they come."""
    from latentforge.bench.train_bench import with_mode

    data_dir = mnist5k_unless(data_dir)
    variants = [parse_variant(p) for p in presets]
    for preset, overrides in variants:  # fail on a bad name, field or mode before hours of training
        for mode in modes:
            load_experiment(preset, {"train.steps": steps, **with_mode(mode, overrides)})
    net = ensure_feature_net(data_dir, log=log)
    real = evaluate_real_floor(data_dir, net, samples)
    n_floor = real["samples"]
    columns = table_columns(samples, n_floor)
    command = (f"latentforge bench quality --steps {steps} --samples {samples} --presets {' '.join(presets)}"
               + (f" --modes {','.join(modes)}" if modes != ("fp32",) else "")
               + (f" --seeds {','.join(map(str, seeds))}" if len(seeds) > 1 else ""))
    rows = []
    for (preset, overrides), spec, mode, seed in [(v, p, m, s) for v, p in zip(variants, presets) for m in modes for s in seeds]:
        cfg = load_experiment(preset, {"train.steps": steps, "train.tracking": "none", "train.log_every": max(1, steps // 4),
                                       "train.checkpoint_every": steps, "train.sample_every": steps, "train.seed": seed,
                                       **with_mode(mode, overrides)})
        run = Path(tempfile.mkdtemp(prefix=f"lf-quality-{preset}-"))
        t0 = time.time()
        train_local(cfg, data_dir, run, log=log)
        seconds = time.time() - t0
        scored = evaluate(run, data_dir, samples=samples, net=net, log=log)
        result = {**{k: v for k, v in scored.items() if k in ("samples", "protocol", "backbone")}, **metric_values(scored)}
        if samples != n_floor:  # FID is biased by the sample count: score the floor's count too, like for like
            result["fid_at_floor"] = metric_values(evaluate(run, data_dir, samples=n_floor, net=net, log=log))["fid"]
        label = spec if modes == ("fp32",) else f"{spec} ({mode})"
        label += f", seed {seed}" if len(seeds) > 1 else ""
        images = steps * cfg.train.global_batch_size * (cfg.gan.n_critic if cfg.algorithm == "gan" else 1)
        rows.append({"preset": label, "base_preset": spec, "mode": mode, "seed": seed, "steps": steps,
                     "images": images, "train_seconds": seconds, **result})
        log(f"{label}: FID {result['fid']:.1f}, precision {result.get('precision', float('nan')):.3f}, "
            f"recall {result['recall']:.3f} ({seconds:.0f}s)")
        _write_table(out, command, rows, presets, modes, seeds, net, real, complete=len(rows) == len(variants) * len(modes) * len(seeds),
                     dataset=data_dir, columns=columns)
    log(f"wrote {out}")
    return rows


def table_columns(samples: int, n_floor: int) -> list[tuple[str, str, str]]:
    """COLUMNS, plus FID at the real floor's sample count after FID when the models are scored
    with a different count (FID falls as the sample count grows, so only equal counts compare)."""
    if samples == n_floor:
        return COLUMNS
    return COLUMNS[:1] + [("fid_at_floor", f"FID, {n_floor:,} samples ↓", "{:.1f}")] + COLUMNS[1:]


def _write_table(out, command, rows, presets, modes, seeds, net, real, complete: bool, dataset,
                 columns=COLUMNS) -> None:
    from latentforge.data.dataset import PreparedDataset

    ds = PreparedDataset(dataset)
    c, h, w = ds.image_shape
    lines = [
        f"# Sample quality on {ds.manifest.get('source', Path(dataset).name)} ({h}x{w}, {c} channel{'s' if c > 1 else ''})",
        "",
        f"Made by `{command}` on {time.strftime('%Y-%m-%d', time.gmtime())}: every row trained from seed "
        f"{', '.join(map(str, seeds))} for the steps shown (global batch 64 unless the preset says otherwise; "
        "images = steps x batch x D updates per step) in one process (`--workers 0`), then "
        f"{rows[0].get('samples', '?') if rows else '?'} samples scored against the training split."
        + ("" if complete else " **Incomplete: the benchmark is still running or was stopped.**"),
        "",
        f"Protocol: `{rows[0]['protocol'] if rows else '?'}` (sample count, real split, backbone; "
        "`latentforge evaluate --json` names every metric with it, e.g. `fid` + that suffix). "
        f"Backbone: `{net.backbone}`, the dataset's own classifier (validation accuracy "
        f"{net.val_accuracy:.1%}); these numbers compare runs on this dataset, not with papers "
        "(use `latentforge evaluate --inception WEIGHTS` for that).",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; wall times include contention "
        "from anything else running.",
        "",
        "| preset | images | train time | " + " | ".join(c[1] for c in columns) + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in columns) + " |",
    ]
    shown = list(rows)
    if len(seeds) > 1 and complete:  # GAN metrics move with the seed: the mean over seeds is what compares modes
        for preset, mode in [(p, m) for p in presets for m in modes]:
            group = [r for r in rows if r.get("base_preset") == preset and r["mode"] == mode]
            mean = {c[0]: sum(r[c[0]] for r in group) / len(group) for c in columns if all(c[0] in r for r in group)}
            label = preset if modes == ("fp32",) else f"{preset} ({mode})"
            shown.append({"preset": f"**{label}, mean of {len(group)} seeds**", "mode": mode, "seed": None,
                          "images": group[0]["images"],
                          "train_seconds": sum(r["train_seconds"] for r in group) / len(group), **mean})
    for r in shown:
        cells = [c[2].format(r[c[0]]) if c[0] in r else "—" for c in columns]
        lines.append(f"| {r['preset']} | {r['images']:,} | {r['train_seconds'] / 60:.1f} min | " + " | ".join(cells) + " |")
    n_real, n_fake = real["samples"], rows[0].get("samples", "?") if rows else "?"
    split_column = any(c[0] == "fid_at_floor" for c in columns)
    lines += ["", (f"Real validation images scored the same way give the floor for this backbone. The split has {n_real:,}, "
                   f"against the models' {n_fake} samples; FID falls as the sample count grows, so the floor compares with "
                   f"the models' `FID, {n_real:,} samples` column (as many samples of their own), not with their "
                   f"{n_fake}-sample FID:") if split_column else
              f"{n_real:,} real validation images, as many as the models' samples, scored the same way give the floor for "
              "this backbone:", ""]
    floor = {**real, "fid_at_floor": real["fid"]}
    if split_column:
        floor.pop("fid")
    lines.append("| real val split | — | — | " + " | ".join(c[2].format(floor[c[0]]) if c[0] in floor else "—" for c in columns) + " |")
    atomic_write_text(out, "\n".join(lines) + "\n")


def evaluate_real_floor(data_dir, net, samples: int) -> dict:
    """The real validation split scored like a model: `samples` images of it (a seeded subset) when
    it has that many, else all of it (then the table adds an FID column at that count)."""
    from latentforge.data.dataset import PreparedDataset
    from latentforge.images import to_model_range
    from latentforge.metrics.evaluate import distribution_metrics

    images = PreparedDataset(data_dir).load("val").images
    if len(images) > samples:
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:samples]]
    images = to_model_range(images)
    return {**distribution_metrics(images, net, "train"), "samples": len(images)}
