"""Job entrypoints for `ray job submit` (jobs/*.py are thin wrappers over `main`).

A job takes one YAML spec, writes to a storage path or URI, logs progress to standard output
(what `ray job logs` shows) and exits non-zero with the reason on standard error when it fails.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from latentforge.config import DATA_LOADERS, StrictConfig, load_yaml_model
from latentforge.errors import LatentForgeError
from latentforge.metrics.registry import MAX_SAMPLES, MIN_SAMPLES
from latentforge.serve.config import ServeConfig


class JobData(StrictConfig):
    source: str = "mnist5k"  # a data prepare SOURCE, used when `dir` holds no prepared dataset yet
    dir: str  # the prepared dataset folder (readable from every node)


class TrainJob(StrictConfig):
    kind: Literal["train"] = "train"
    preset: str  # preset name or YAML path
    data: JobData
    overrides: dict[str, Any] = {}  # dotted config overrides
    workers: int = Field(2, ge=1)
    gpus: bool = False
    storage: str = "runs"  # path or URI (s3://, gs://, file://)
    name: str | None = None  # run folder under storage, or a whole path/URI (default: a unique name under storage)
    max_failures: int = Field(2, ge=0)
    data_loader: Literal[DATA_LOADERS] = "stream"  # config.DATA_LOADERS


class TuneJob(StrictConfig):
    kind: Literal["tune"] = "tune"
    sweep: str  # sweep YAML path
    data: JobData
    out: str | None = None  # sweep folder
    registry: str | None = "registry"  # promote the best trial here (None: no promotion)
    gpus: bool = False  # one GPU per Ray Train worker of every trial (or the sweep YAML's gpus: true)
    resume: bool = False  # continue the sweep in `out` (a resubmitted job after a cluster loss)

    @model_validator(mode="after")
    def _resume_needs_out(self):
        if self.resume and not self.out:
            raise ValueError("resume: true continues the sweep folder in out; set out")
        return self


class EvaluateJob(StrictConfig):
    kind: Literal["evaluate"] = "evaluate"
    target: str  # checkpoint/run folder or images
    data: JobData
    samples: int = Field(5000, ge=MIN_SAMPLES, le=MAX_SAMPLES)
    out: str | None = None  # write the JSON result here too


class DeployJob(StrictConfig):
    kind: Literal["deploy"] = "deploy"
    serve: ServeConfig = ServeConfig()  # registry, limits, batching, autoscaling, the API key's source...
    host: str = "0.0.0.0"
    port: int = 8000
    allow_unauthenticated: bool = False  # serve on a non-loopback host without an API key


JOBS = {"train": TrainJob, "tune": TuneJob, "evaluate": EvaluateJob, "deploy": DeployJob}


def load_spec(kind: str, path: str):
    """Read and validate a job spec.

    Raises:
        ConfigError: unreadable file or invalid fields (all listed).
    """
    return load_yaml_model(path, JOBS[kind], f"{kind} job spec")


def _dataset(spec: JobData) -> str:
    from latentforge.data.prepare import ensure_prepared

    ensure_prepared(spec.dir, spec.source)
    return spec.dir


def run(kind: str, spec) -> dict:
    """Run a validated job spec on the cluster this process is connected to."""
    if kind == "train":
        from latentforge.config import load_experiment
        from latentforge.train.ray_train import train_ray

        from latentforge.storage import is_uri

        cfg = load_experiment(spec.preset, spec.overrides)
        full_name = spec.name is not None and (is_uri(spec.name) or Path(spec.name).is_absolute())
        # a name that is a whole location needs no storage root, unless the spec gives one on purpose
        storage = None if full_name and "storage" not in spec.model_fields_set else spec.storage
        return train_ray(cfg, _dataset(spec.data), workers=spec.workers, use_gpu=spec.gpus, out=spec.name,
                         storage=storage, max_failures=spec.max_failures, data_loader=spec.data_loader,
                         data_source=spec.data.source)
    if kind == "tune":
        from latentforge.tune.space import load_sweep
        from latentforge.tune.sweep import run_sweep

        return run_sweep(load_sweep(spec.sweep), _dataset(spec.data), out=spec.out, registry=spec.registry, gpus=spec.gpus,
                         resume=spec.resume)
    if kind == "evaluate":
        from latentforge.metrics.evaluate import evaluate
        from latentforge.storage import atomic_write_json

        result = evaluate(spec.target, _dataset(spec.data), samples=spec.samples)
        if spec.out:
            atomic_write_json(spec.out, result)
        return result
    from latentforge.serve.runner import start_serve

    url = start_serve(spec.serve, spec.host, spec.port, allow_unauthenticated=spec.allow_unauthenticated)
    return {"url": url}


def check(kind: str, spec) -> None:
    """What a spec names besides its own fields, read before the job starts: a bad sweep YAML or
    experiment override is a bad spec (exit 2), not a failed job.

    Raises:
        LatentForgeError: naming the problem.
    """
    if kind == "tune":
        from latentforge.tune.space import load_sweep

        load_sweep(spec.sweep)
    elif kind == "train":
        from latentforge.config import load_experiment

        load_experiment(spec.preset, spec.overrides)
    elif kind == "deploy":  # a key file that is not there (a Secret not mounted) is the spec's problem
        from latentforge.serve.runner import check_exposure

        check_exposure(spec.serve, spec.host, spec.allow_unauthenticated)


def main(kind: str, argv: list[str] | None = None) -> int:
    """`python jobs/<kind>.py SPEC.yaml`: 0 on success, 2 for a bad spec, 1 for a failed job."""
    import json

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python jobs/{kind}.py SPEC.yaml", file=sys.stderr)
        return 2
    try:
        spec = load_spec(kind, argv[0])
        check(kind, spec)
    except LatentForgeError as e:
        print(f"latentforge {kind} job: bad spec: {e}", file=sys.stderr)
        return 2
    print(f"latentforge {kind} job: {spec.model_dump_json()}")
    try:
        result = run(kind, spec)
    except LatentForgeError as e:
        print(f"latentforge {kind} job failed: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the reason must reach `ray job logs`
        traceback.print_exc()
        print(f"latentforge {kind} job failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    from latentforge.storage import finite_json

    print(json.dumps(finite_json(result), default=str, sort_keys=True))
    return 0
