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
from pathlib import Path
from typing import Callable

import torch

from latentforge.data.spec import DataSpec
from latentforge.builders import check_compatible
from latentforge.config import experiment_to_dict, parse_experiment
from latentforge.data.dataset import PreparedDataset
from latentforge.errors import ConfigError
from latentforge.storage import is_uri, join_uri, read_bytes_uri, write_bytes_uri
from latentforge.train.batches import InMemoryBatches
from latentforge.train.loop import WorkerContext, run_training
from latentforge.train.run_files import RUN_FILE, RunFiles, new_run_name, run_file_json
from latentforge.train.tracking import NullTracker, make_tracker

WORKER_ENV = {"WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true",
              "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


# Ray Train V2 reads these in the driver and propagates them: no print patching (it printed
# every progress line twice), no structured worker logging (it echoed every report at INFO).
RAY_DRIVER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                  "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0"}


def ray_init(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (`address`) or start a local one sized for this machine.

    Locally, more logical CPUs than cores are declared: Train workers and Ray Data tasks would
    otherwise wait on each other forever on a 2-core machine.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")  # set for drivers of `ray job submit`
    for key, value in RAY_DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    runtime_env = {"env_vars": WORKER_ENV}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        cpus = num_cpus or max(4, (os.cpu_count() or 2) + 2)
        # The dashboard hosts the state API that Ray Train's controller and cleaner poll.
        ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=runtime_env,
                 object_store_memory=512 * 1024 * 1024, log_to_driver=True)


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


def worker_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    cfg = parse_experiment(config["experiment"], "run config")
    spec = DataSpec.from_json(config["spec"])
    device = ray.train.torch.get_device()
    run_uri = config["run_uri"]
    write_bytes_uri(join_uri(run_uri, "workers", f"rank_{rank}.json"), json.dumps({
        "rank": rank, "world_size": world, "pid": os.getpid(), "hostname": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(), "device": str(device), "started_unix": time.time(),
    }).encode())

    def wrap(module):
        if cfg.train.sync_batchnorm and device.type == "cuda":
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return ray.train.torch.prepare_model(module)  # DDP when world > 1, the module itself otherwise

    local_batch = cfg.train.global_batch_size // world
    if config["data_loader"] == "ray":
        from latentforge.data.ray_reader import ShardBatches

        stream = ShardBatches(ray.train.get_dataset_shard("train"), local_batch, config["train_rows"] // world,
                              labelled=spec.num_classes > 0, device=device, seed=cfg.train.seed)
    else:
        stream = InMemoryBatches(PreparedDataset(config["data_dir"]).load("train"), cfg.train.global_batch_size,
                                 cfg.train.seed, rank, world, device)

    files = tracker = metrics = None
    if rank == 0:
        local_dir = run_uri if not is_uri(run_uri) else tempfile.mkdtemp(prefix="lf-wandb-")
        tracker = make_tracker(cfg.train.tracking, config["run_name"], cfg.model_dump(mode="json"), local_dir, resume=True)
        files = RunFiles(run_uri, tracker)
        from latentforge.train.ray_metrics import TrainMetrics

        metrics = TrainMetrics(config["run_name"], cfg.algorithm)
    sink = RaySink(rank, files, metrics)
    evaluate = None
    if rank == 0 and cfg.train.eval_every:
        from latentforge.metrics.periodic import make_periodic_evaluator
        from latentforge.train.local import vae_sigma

        evaluate = make_periodic_evaluator(config["data_dir"], cfg.train.eval_samples, cfg.train.seed, device, vae_sigma(cfg))
    wctx = WorkerContext(rank=rank, world_size=world, device=device, wrap=wrap, reduce_mean=_reduce_mean(world))
    log = print if rank == 0 else (lambda *_: None)
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                run_training(cfg, spec, stream, wctx, sink, resume_from=folder, log=log, evaluate=evaluate)
        else:
            run_training(cfg, spec, stream, wctx, sink, resume_from=config.get("resume_from"), log=log,
                         evaluate=evaluate)
    finally:
        (tracker or NullTracker()).finish()


def _resolve_run(out: str | None, storage: str | None, resume: str | None, cfg_name: str) -> tuple[str, str, str]:
    """(storage_path, run name, run URI) for a fresh or resumed run."""
    if resume:
        run_uri = resume.rstrip("/")
        if read_bytes_uri(join_uri(run_uri, RUN_FILE)) is None:
            raise ConfigError(f"{resume} is not a run folder (no {RUN_FILE}); give the folder a previous train wrote")
        storage_path, _, name = run_uri.rpartition("/")
        if not is_uri(run_uri):
            storage_path, name = str(Path(run_uri).resolve().parent), Path(run_uri).name
        return storage_path, name, join_uri(storage_path, name)
    storage_path = storage or "runs"
    if storage_path.startswith("file://"):
        storage_path = storage_path[len("file://"):]
    if not is_uri(storage_path):
        storage_path = str(Path(storage_path).resolve())
    name = out or new_run_name(cfg_name)
    if "/" in name:
        raise ConfigError(f"--out {out!r} must be a run name (no '/'); use --storage for where runs go")
    run_uri = join_uri(storage_path, name)
    if read_bytes_uri(join_uri(run_uri, RUN_FILE)) is not None:
        raise ConfigError(f"run {run_uri} already exists; choose another --out, or pass --resume {run_uri} to continue it")
    return storage_path, name, run_uri


def train_ray(cfg, data_dir: str | Path, workers: int, use_gpu: bool = False, out: str | None = None,
              storage: str | None = None, max_failures: int = 2, resume: str | None = None,
              address: str | None = None, data_loader: str = "ray", log=print) -> dict:
    """Train `cfg` data-parallel on `workers` Ray Train workers.

    Args:
        cfg: validated experiment config.
        data_dir: prepared dataset folder (readable from every node).
        workers: Ray Train workers (≥ 1).
        use_gpu: one GPU per worker, NCCL backend.
        out: run name (default: unique).
        storage: where runs go: a path or pyarrow URI (default ./runs).
        max_failures: worker-group failures to recover from (restart from the latest checkpoint).
        resume: a run folder/URI to continue.
        address: an existing cluster's address (default: start a local cluster).
        data_loader: 'ray' (Ray Data shards) or 'memory' (deterministic in-memory global batches).

    Returns:
        The final record plus `run_dir` and `checkpoint`.
    """
    if workers < 1:
        raise ConfigError("--workers must be ≥ 1 for Ray training (0 trains in this process)")
    ds = PreparedDataset(data_dir)
    spec = DataSpec.from_dataset(ds)
    check_compatible(cfg.model, spec)
    if cfg.train.global_batch_size % workers:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by --workers {workers}")
    train_rows = ds.manifest["splits"]["train"]["count"]
    if train_rows // workers < cfg.train.global_batch_size // workers:
        raise ConfigError(f"the training split ({train_rows} images) is too small for global batch {cfg.train.global_batch_size}")
    storage_path, name, run_uri = _resolve_run(out, storage, resume, cfg.name)
    if cfg.train.eval_every:
        from latentforge.metrics.features import ensure_feature_net

        ensure_feature_net(data_dir, log=log)
    if not resume:
        write_bytes_uri(join_uri(run_uri, RUN_FILE), run_file_json(name, cfg, str(Path(data_dir).resolve()), "ray", workers))
    ray_init(address)
    resume_from = None
    if resume and not is_uri(run_uri):
        from latentforge.checkpoint import find_checkpoints

        found = find_checkpoints(run_uri)
        resume_from = str(found[-1]) if found else None
    log(f"run {name}: {workers} worker(s), storage {storage_path}, data loader {data_loader}")
    trainer = make_trainer(cfg, data_dir, workers, storage_path, name, run_uri, use_gpu=use_gpu,
                           max_failures=max_failures, data_loader=data_loader, resume_from=resume_from)
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    return {**metrics, "run_dir": run_uri, "checkpoint": result.checkpoint.path if result.checkpoint else None}


def make_trainer(cfg, data_dir: str | Path, workers: int, storage_path: str, name: str, run_uri: str, *,
                 use_gpu: bool = False, max_failures: int = 2, data_loader: str = "ray",
                 resume_from: str | None = None, callbacks: list | None = None):
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
    return TorchTrainer(
        worker_loop,
        train_loop_config={
            "experiment": experiment_to_dict(cfg), "spec": DataSpec.from_dataset(ds).to_json(), "run_uri": run_uri,
            "run_name": name, "data_dir": str(Path(data_dir).resolve()), "data_loader": data_loader,
            "threads": threads, "train_rows": ds.manifest["splits"]["train"]["count"], "resume_from": resume_from,
        },
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks or None,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
        ),
        datasets=datasets or None,
    )
