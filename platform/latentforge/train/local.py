"""Single-process training (`latentforge train ... --workers 0`): the same loop, no Ray."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

import torch

from latentforge import __version__
from latentforge.builders import DataSpec
from latentforge.checkpoint import find_checkpoints
from latentforge.config import experiment_to_dict, parse_experiment
from latentforge.data.dataset import PreparedDataset
from latentforge.errors import ConfigError
from latentforge.storage import atomic_write_bytes, atomic_write_json, read_json
from latentforge.train.batches import InMemoryBatches
from latentforge.train.loop import WorkerContext, run_training

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


def new_run_name(cfg_name: str) -> str:
    """A unique run name: preset, UTC time, random suffix (a fresh run never reuses a folder)."""
    return f"{cfg_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


class LocalRunSink:
    """Writes a run folder on local disk: metrics.jsonl, samples/, step_XXXXXX/ checkpoints."""

    def __init__(self, run_dir: Path, num_to_keep: int):
        self.run_dir, self.num_to_keep = Path(run_dir), num_to_keep

    def report(self, record: dict, checkpoint) -> None:
        if checkpoint is not None:
            name, write = checkpoint
            write(self.run_dir / name)
            for old in find_checkpoints(self.run_dir)[: -self.num_to_keep]:
                shutil.rmtree(old, ignore_errors=True)
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def artifact(self, relpath: str, data: bytes) -> None:
        atomic_write_bytes(self.run_dir / relpath, data)


def write_run_file(run_dir: Path, cfg, data_dir: str, backend: str, workers: int) -> None:
    atomic_write_json(run_dir / RUN_FILE, {
        "kind": "latentforge.run",
        "latentforge_version": __version__,
        "name": run_dir.name,
        "experiment": experiment_to_dict(cfg),
        "data": str(data_dir),
        "backend": backend,
        "workers": workers,
        "created_unix": int(time.time()),
    })


def read_run_config(run_dir: str | Path):
    """The experiment config a run was started with (for --resume)."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no {RUN_FILE}); give the folder a previous train wrote")
    return parse_experiment(read_json(run_dir / RUN_FILE)["experiment"], str(run_dir / RUN_FILE))


def prepare_run_dir(out: str | Path | None, cfg, resume: bool, runs_root: str | Path = "runs") -> Path:
    """Create (or, when resuming, reuse) a run folder.

    Raises:
        ConfigError: a fresh run would reuse a non-empty folder.
    """
    run_dir = Path(out) if out else Path(runs_root) / new_run_name(cfg.name)
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"run folder {run_dir} already exists and is not empty; choose another --out, or pass "
            f"--resume {run_dir} to continue that run"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train_local(cfg, data_dir: str | Path, run_dir: Path, resume: bool = False,
                log: Callable[[str], None] = print, device: str = "cpu", evaluate=None, eval_every: int = 0) -> dict:
    """Train in this process (no Ray): the `--workers 0` path and the reference for tests.

    Returns:
        The last log record.
    """
    ds = PreparedDataset(data_dir)
    spec = DataSpec.from_dataset(ds)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    resume_from = None
    if resume:
        found = find_checkpoints(run_dir)
        if found:
            resume_from = found[-1]
    else:
        write_run_file(run_dir, cfg, str(data_dir), "local", 1)
    stream = InMemoryBatches(ds.load("train"), cfg.train.global_batch_size, cfg.train.seed, device=device)
    ctx = WorkerContext(device=torch.device(device))
    return run_training(cfg, spec, stream, ctx, LocalRunSink(run_dir, cfg.train.num_to_keep),
                        resume_from=resume_from, log=log, evaluate=evaluate, eval_every=eval_every)
