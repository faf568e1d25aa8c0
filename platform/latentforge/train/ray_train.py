"""Ray Train wiring: `latentforge train ... --workers N`.

The driver validates everything it can before any worker starts (config against the data,
batch divisibility, run folder), then runs a Ray Train V2 `TorchTrainer` whose workers call the
same `run_training` loop as a single-process run. What is Ray-specific lives here:
DDP wrapping (`prepare_model`), Ray Data shards, `ray.train.report` with checkpoints,
resume from `ray.train.get_checkpoint()`, chief-only tracking and Ray metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from latentforge.algorithms.precision import resolved_config
from latentforge.config import DATA_LOADERS, GANExperiment, VAEExperiment
from latentforge.data.dataset import PreparedDataset
from latentforge.data.spec import DataSpec
from latentforge.errors import ConfigError
from latentforge.models.plugins import allow_plugins, allowed_modules
from latentforge.ray_cluster import check_gpus_for, ray_init
from latentforge.storage import is_uri, join_uri, write_bytes_uri
from latentforge.train.batches import InMemoryBatches
from latentforge.train.loop import WorkerContext, run_training
from latentforge.train.run_dir import RunDir, read_run_data, resolve_run_dir, write_run_file
from latentforge.train.run_files import RunFiles
from latentforge.train.setup import check_training_setup, inference_data_loader
from latentforge.train.tracking import NullTracker, make_tracker




@dataclass(frozen=True)
class TrainLaunch:
    """Everything the driver hands each Ray Train worker, checked when it is made (on the driver,
    before any worker starts) so a worker never finds a missing or mistyped field."""

    experiment: GANExperiment | VAEExperiment  # the validated config
    spec: DataSpec  # the data the models are built for
    run_uri: str  # the run folder (path or URI) the chief writes records and samples to
    run_name: str  # the run's name (tracking, metrics tags)
    data_dir: str  # the prepared dataset, absolute (every node reads it)
    data_loader: str  # one of DATA_LOADERS
    threads: int  # torch threads per worker
    train_rows: int  # images in the training split
    resume_from: str | None = None  # a checkpoint folder to start from when Ray holds none of this run
    data_source: str | None = None  # a worker whose node lacks data_dir prepares this source there (jobs)
    plugins: tuple[str, ...] = field(default_factory=lambda: tuple(allowed_modules()))  # the driver's allowed plug-in modules

    def __post_init__(self):
        if not isinstance(self.experiment, (GANExperiment, VAEExperiment)):
            raise TypeError(f"experiment must be a validated config, got {type(self.experiment).__name__}")
        if not isinstance(self.spec, DataSpec):
            raise TypeError(f"spec must be a DataSpec, got {type(self.spec).__name__}")
        if self.data_loader not in DATA_LOADERS:
            raise ConfigError(f"unknown data loader {self.data_loader!r}; choose one of: {', '.join(DATA_LOADERS)}")
        if self.threads < 1:
            raise ConfigError(f"threads must be at least 1 (got {self.threads})")
        if self.train_rows < self.experiment.train.global_batch_size:
            raise ConfigError(f"the training split ({self.train_rows} images) is smaller than the global batch "
                              f"({self.experiment.train.global_batch_size})")
        if not (is_uri(self.data_dir) or Path(self.data_dir).is_absolute()):
            raise ConfigError(f"data_dir must be absolute (workers run elsewhere), got {self.data_dir}")


class RaySink:
    """Run outputs on a Ray Train worker: every rank reports (a barrier); the chief also writes the
    run folder, the tracker, Ray metrics, and the checkpoint."""

    def __init__(self, rank: int, files: RunFiles | None, metrics=None):
        self.rank, self.files, self.metrics = rank, files, metrics

    def report(self, record: dict, checkpoint) -> None:
        import ray.train

        if self.files is not None:
            self.files.record(record)
        if self.metrics is not None:
            self.metrics.update(record)
        if checkpoint is None:
            ray.train.report(record)
            return
        name, write = checkpoint
        if self.rank != 0:
            ray.train.report(record, checkpoint_dir_name=name)
            return
        tmp = Path(tempfile.mkdtemp(prefix="lf-ckpt-"))
        try:
            write(tmp / name)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(str(tmp / name)),
                             checkpoint_dir_name=name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def artifact(self, relpath: str, data: bytes) -> None:
        if self.files is not None:
            self.files.artifact(relpath, data)


def _reduce_mean(world: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce(t: torch.Tensor) -> torch.Tensor:
        if world == 1:
            return t
        import torch.distributed as dist

        dist.all_reduce(t)
        return t / world

    return reduce


def newer_checkpoint(ray_folder: str, resume_from: str | None) -> str:
    """Of Ray's restored checkpoint and the run folder's newest whole one, the one at the later
    step (the run folder's only where this worker can read it); Ray's own record also lists a
    checkpoint cut short, which the driver skipped."""
    from latentforge.checkpoint import CONFIG
    from latentforge.storage import read_json
    from latentforge.train.resume import checkpoint_problem

    def step(folder) -> int:
        try:
            return int(read_json(Path(folder) / CONFIG)["step"])
        except Exception:  # noqa: BLE001 - unreadable here: not a candidate
            return -1

    if resume_from and (step(resume_from) > step(ray_folder) or checkpoint_problem(Path(ray_folder)) is not None):
        return resume_from  # later, or Ray's is the damaged one the driver skipped
    return ray_folder


def worker_loop(config: dict) -> None:
    """Runs on every Ray Train worker; `config["launch"]` is the driver's `TrainLaunch`."""
    import ray.train
    import ray.train.torch

    launch: TrainLaunch = config["launch"]
    allow_plugins(launch.plugins)  # exactly what the driver allowed
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(launch.threads)
    cfg, spec = launch.experiment, launch.spec
    device = ray.train.torch.get_device()
    run_uri = launch.run_uri
    write_bytes_uri(join_uri(run_uri, "workers", f"rank_{rank}.json"), json.dumps({
        "rank": rank, "world_size": world, "pid": os.getpid(), "hostname": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(), "device": str(device), "started_unix": time.time(),
    }).encode())

    def wrap(module):
        if cfg.train.sync_batchnorm and device.type == "cuda":
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return ray.train.torch.prepare_model(module)  # DDP when world > 1, the module itself otherwise

    local_batch = cfg.train.global_batch_size // world
    if launch.data_source and launch.data_loader != "ray":
        from latentforge.data.prepare import ensure_prepared

        ensure_prepared(launch.data_dir, launch.data_source, spec.content_hash, log=lambda m: print(f"[rank {rank}] {m}"))
    if launch.data_loader == "stream":
        from latentforge.data.stream import StreamBatches

        stream = StreamBatches(launch.data_dir, "train", cfg.train.global_batch_size, cfg.train.seed, rank, world, device,
                               window_bytes=cfg.train.shuffle_window_mb << 20)
    elif launch.data_loader == "ray":
        from latentforge.data.ray_reader import ShardBatches

        stream = ShardBatches(ray.train.get_dataset_shard("train"), local_batch, launch.train_rows // world,
                              labelled=spec.num_classes > 0, device=device, seed=cfg.train.seed)
    else:
        stream = InMemoryBatches(PreparedDataset(launch.data_dir).load("train"), cfg.train.global_batch_size,
                                 cfg.train.seed, rank, world, device)

    files = tracker = metrics = None
    if rank == 0:
        local_dir = run_uri if not is_uri(run_uri) else tempfile.mkdtemp(prefix="lf-wandb-")
        tracked = resolved_config(cfg, device.type).model_dump(mode="json")  # never 'auto'
        tracker = make_tracker(cfg.train.tracking, launch.run_name, tracked, local_dir, resume=True)
        files = RunFiles(run_uri, tracker)
        from latentforge.train.ray_metrics import TrainMetrics

        metrics = TrainMetrics(launch.run_name, cfg.algorithm)
    sink = RaySink(rank, files, metrics)
    evaluate = None
    if rank == 0 and cfg.train.eval_every:
        from latentforge.metrics.periodic import make_periodic_evaluator
        from latentforge.train.local import vae_sigma

        evaluate = make_periodic_evaluator(launch.data_dir, cfg.train.eval_samples, cfg.train.seed, device,
                                           vae_sigma(cfg), cfg.train.precision)
    inference_data = inference_data_loader(cfg, launch.data_dir) if rank == 0 else None
    wctx = WorkerContext(rank=rank, world_size=world, device=device, wrap=wrap, reduce_mean=_reduce_mean(world))
    log = print if rank == 0 else (lambda *_: None)
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                # Ray keeps its own record of a run's checkpoints and restores the latest it knows; a
                # `--workers 0` resume may have trained further in the same folder since
                run_training(cfg, spec, stream, wctx, sink, resume_from=newer_checkpoint(folder, launch.resume_from),
                             log=log, evaluate=evaluate, inference_data=inference_data)
        else:
            run_training(cfg, spec, stream, wctx, sink, resume_from=launch.resume_from, log=log,
                         evaluate=evaluate, inference_data=inference_data)
    finally:
        (tracker or NullTracker()).finish()


def train_ray(cfg, data_dir: str | Path, workers: int, use_gpu: bool = False, out: str | None = None,
              storage: str | None = None, max_failures: int = 2, resume: str | None = None,
              address: str | None = None, data_loader: str = "stream", data_source: str | None = None,
              log=print) -> dict:
    """Train `cfg` data-parallel on `workers` Ray Train workers.

    Args:
        cfg: validated experiment config.
        data_dir: prepared dataset folder (readable from every node).
        workers: Ray Train workers (≥ 1).
        use_gpu: one GPU per worker, NCCL backend.
        out, storage, resume: the run folder, as `train/run_dir.py` resolves them (the same rule
            as single-process runs).
        max_failures: worker-group failures to recover from (restart from the latest checkpoint).
        address: an existing cluster's address (default: start a local cluster).
        data_loader: 'stream' (exact seeded epochs from Parquet row groups), 'memory' (the split in
            memory) or 'ray' (Ray Data shards, not exact).
        data_source: the `data prepare` SOURCE of `data_dir`: a worker on a node without the folder
            prepares it there (checked against the driver's content hash) instead of failing.

    Returns:
        The final record plus `run_dir` and `checkpoint`.
    """
    if workers < 1:
        raise ConfigError("--workers must be ≥ 1 for Ray training (0 trains in this process)")
    ds = PreparedDataset(data_dir)
    check_training_setup(cfg, DataSpec.from_dataset(ds), workers, ds.manifest["splits"]["train"]["count"], use_gpu)
    run = resolve_run_dir(out, storage, resume, cfg.name)
    resume_from = None
    if resume and run.is_local:  # checked before a cluster starts: a refused resume changes nothing
        from latentforge.train.resume import resume_point

        found = resume_point(run.path, cfg, DataSpec.from_dataset(ds), data_dir, read_run_data(run), log)
        resume_from = str(found) if found is not None else None
    if cfg.train.eval_every:
        from latentforge.metrics.features import ensure_feature_net

        ensure_feature_net(data_dir, log=log)
    ray_init(address)
    if use_gpu:  # before the run folder is written: a refused run leaves nothing behind
        check_gpus_for(workers, address, log=log)
    write_run_file(run, cfg, str(Path(data_dir).resolve()), "ray", workers, resumed=bool(resume))
    log(f"run {run.name}: {workers} worker(s), folder {run.uri}, data loader {data_loader}")
    trainer = make_trainer(cfg, data_dir, workers, run, use_gpu=use_gpu, max_failures=max_failures,
                           data_loader=data_loader, resume_from=resume_from, data_source=data_source)
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    return {**metrics, "run_dir": run.uri, "checkpoint": result.checkpoint.path if result.checkpoint else None}


def make_trainer(cfg, data_dir: str | Path, workers: int, run: RunDir, *,
                 use_gpu: bool = False, max_failures: int = 2, data_loader: str = "stream",
                 resume_from: str | None = None, callbacks: list | None = None, data_source: str | None = None):
    """A `TorchTrainer` running `worker_loop` for `cfg` (used by `train_ray` and by sweep trials).

    Args:
        resume_from: a checkpoint folder to start from when Ray has no checkpoint of this run
            (a `--resume`, or a PBT exploit's warm start).
        callbacks: Ray Train `UserCallback`s (the sweep forwards reports to Tune with one).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ds = PreparedDataset(data_dir)
    threads = cfg.train.threads or max(1, (os.cpu_count() or 2) // workers)
    datasets = {}
    if data_loader == "ray":
        from latentforge.data.ray_reader import read_prepared

        datasets["train"] = read_prepared(data_dir, "train")
    launch = TrainLaunch(experiment=cfg, spec=DataSpec.from_dataset(ds), run_uri=run.uri, run_name=run.name,
                         data_dir=str(Path(data_dir).resolve()), data_loader=data_loader, threads=threads,
                         train_rows=ds.manifest["splits"]["train"]["count"], resume_from=resume_from,
                         data_source=data_source)
    return TorchTrainer(
        worker_loop,
        train_loop_config={"launch": launch},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(
            name=run.name, storage_path=run.parent, callbacks=callbacks or None,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
        ),
        datasets=datasets or None,
    )
