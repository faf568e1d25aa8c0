"""Single-process training (`latentforge train ... --workers 0`): the same loop, no Ray."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch

from latentforge.algorithms.precision import resolved_config
from latentforge.data.spec import DataSpec
from latentforge.checkpoint import find_checkpoints
from latentforge.data.dataset import PreparedDataset
from latentforge.data.stream import StreamBatches
from latentforge.train.loop import WorkerContext, run_training
from latentforge.train.resume import resume_point
from latentforge.train.run_dir import RunDir, read_run_data, write_run_file
from latentforge.train.run_files import RunFiles
from latentforge.train.setup import check_training_setup, inference_data_loader
from latentforge.train.tracking import make_tracker


def vae_sigma(cfg) -> float:
    """The Gaussian decoder std of a VAE config (unused for GANs)."""
    return cfg.vae.decoder_sigma if cfg.algorithm == "vae" else 0.1


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints (Ray 2.5x-2.60)


class LocalRunSink:
    """A run folder on local disk: checkpoints written in place (oldest pruned), records and
    samples through `RunFiles`."""

    def __init__(self, files: RunFiles, num_to_keep: int):
        self.files, self.run_dir, self.num_to_keep = files, Path(files.run_uri), num_to_keep

    def report(self, record: dict, checkpoint) -> None:
        if checkpoint is not None:
            name, write = checkpoint
            written = self.run_dir / name
            write(written)
            found = find_checkpoints(self.run_dir)
            # Only checkpoints up to the one just written are pruned: one at a later step is a
            # damaged one the resume skipped (or a longer earlier attempt's), and counting it would
            # delete the resume's source and this new checkpoint. Folders Ray Train's record of the
            # run lists stay: a Ray resume of this run stops before any worker when one is missing.
            up_to = found[: found.index(written) + 1] if written in found else found
            keep = ray_listed_checkpoints(self.run_dir)
            for old in up_to[: -self.num_to_keep]:
                if old.name not in keep:
                    shutil.rmtree(old, ignore_errors=True)
        self.files.record(record)

    def artifact(self, relpath: str, data: bytes) -> None:
        self.files.artifact(relpath, data)


def ray_listed_checkpoints(run_dir: Path) -> set[str]:
    """The checkpoint folder names in Ray Train's snapshot of a run (empty without one)."""
    import json

    try:
        snapshot = json.loads((run_dir / RAY_SNAPSHOT).read_text())
    except (OSError, ValueError):
        return set()
    names: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "checkpoint_dir_name" and isinstance(v, str):
                    names.add(v)
                elif k.endswith("checkpoint_dir_names") and isinstance(v, list):
                    names.update(x for x in v if isinstance(x, str))
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(snapshot)
    return names


def train_local(cfg, data_dir: str | Path, run_dir: Path, resume: bool = False,
                log: Callable[[str], None] = print, device: str = "cpu") -> dict:
    """Train in this process (no Ray): the `--workers 0` path and the reference for tests.

    Returns:
        The last log record.
    """
    ds = PreparedDataset(data_dir)
    spec = DataSpec.from_dataset(ds)
    check_training_setup(cfg, spec, 1, ds.manifest["splits"]["train"]["count"], use_gpu=device != "cpu")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(run_dir)
    run = RunDir(str(run_dir.resolve()))
    resume_from = resume_point(run_dir, cfg, spec, data_dir, read_run_data(run), log) if resume else None
    write_run_file(run, cfg, str(Path(data_dir).resolve()), "local", 1, resumed=resume)
    stream = StreamBatches(data_dir, "train", cfg.train.global_batch_size, cfg.train.seed, device=device,
                           window_bytes=cfg.train.shuffle_window_mb << 20)
    evaluate = None
    if cfg.train.eval_every:
        from latentforge.metrics.features import ensure_feature_net
        from latentforge.metrics.periodic import make_periodic_evaluator

        ensure_feature_net(data_dir, log=log)
        evaluate = make_periodic_evaluator(data_dir, cfg.train.eval_samples, cfg.train.seed, device, vae_sigma(cfg),
                                           cfg.train.precision)
    tracked = resolved_config(cfg, torch.device(device).type).model_dump(mode="json")  # never 'auto'
    tracker = make_tracker(cfg.train.tracking, run_dir.name, tracked, str(run_dir), resume)
    try:
        return run_training(cfg, spec, stream, WorkerContext(device=torch.device(device)),
                            LocalRunSink(RunFiles(str(run_dir), tracker), cfg.train.num_to_keep),
                            resume_from=resume_from, log=log, evaluate=evaluate,
                            inference_data=inference_data_loader(cfg, data_dir))
    finally:
        tracker.finish()
