"""Run folders: the one place that names, resolves and creates them (no Ray).

One rule for every backend (`--workers 0` and `--workers N`, job specs, the demo, benchmarks):

    --out DIR           the run folder itself: a path (relative to the working directory) or a
                        storage URI (s3://, gs://, file://)
    --storage ROOT      where runs go: with --out, a relative DIR is placed under ROOT; without
                        --out, the run gets a fresh unique name under ROOT (default ./runs)
    --resume RUN        an existing run folder (it holds run.json)

A fresh run never reuses a folder that holds a run (or, locally, anything at all).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from latentforge import __version__
from latentforge.config import experiment_to_dict, parse_experiment
from latentforge.errors import ConfigError
from latentforge.storage import is_uri, join_uri, read_bytes_uri, write_bytes_uri

RUN_FILE = "run.json"
DEFAULT_STORAGE = "runs"


def new_run_name(cfg_name: str) -> str:
    """A unique run name: preset, UTC time, random suffix (a fresh run never reuses a folder)."""
    return f"{cfg_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def _normalise(location: str) -> str:
    """An absolute local path (file:// stripped) or a URI without a trailing '/'."""
    location = str(location)
    if location.startswith("file://"):
        location = location[len("file://"):]
    if is_uri(location):
        return location.rstrip("/")
    return str(Path(location).resolve())


@dataclass(frozen=True)
class RunDir:
    """Where a run lives."""

    uri: str  # the run folder: an absolute local path or a storage URI

    @property
    def name(self) -> str:
        """The folder's own name (Ray Train's run name)."""
        return self.uri.rstrip("/").rpartition("/")[2]

    @property
    def parent(self) -> str:
        """The folder holding it (Ray Train's storage_path)."""
        return self.uri.rstrip("/").rpartition("/")[0] or "/"

    @property
    def is_local(self) -> bool:
        return not is_uri(self.uri)

    @property
    def path(self) -> Path:
        """The local folder (local runs only)."""
        if not self.is_local:
            raise ConfigError(f"run {self.uri} is on remote storage, not a local folder")
        return Path(self.uri)

    def file(self, name: str) -> str:
        return join_uri(self.uri, name)

    def has_run(self) -> bool:
        return read_bytes_uri(self.file(RUN_FILE)) is not None


def resolve_run_dir(out: str | None = None, storage: str | None = None, resume: str | None = None,
                    cfg_name: str = "run") -> RunDir:
    """The run folder for a fresh run (`out`, `storage`) or a resumed one (`resume`).

    Raises:
        ConfigError: a resumed folder that holds no run, a fresh folder that already holds one,
            or an absolute/URI --out combined with --storage.
    """
    if resume:
        run = RunDir(_normalise(resume))
        if not run.has_run():
            raise ConfigError(f"{resume} is not a run folder (no {RUN_FILE}); give the folder a previous train wrote")
        return run
    if out and storage and (is_uri(out) or Path(out).is_absolute()):
        raise ConfigError(f"--out {out} is a full location; drop --storage {storage}, or give --out as a name under it")
    if out:
        run = RunDir(_normalise(join_uri(storage, out) if storage else out))
    else:
        run = RunDir(_normalise(join_uri(storage or DEFAULT_STORAGE, new_run_name(cfg_name))))
    if run.is_local and run.path.exists() and not run.path.is_dir():
        raise ConfigError(f"--out {run.uri} is a file, not a folder; choose another --out")
    if run.has_run() or (run.is_local and run.path.is_dir() and any(run.path.iterdir())):
        raise ConfigError(f"run folder {run.uri} already exists and is not empty; choose another --out, or pass "
                          f"--resume {run.uri} to continue that run")
    return run


def write_run_file(run: RunDir, cfg, data_dir: str, backend: str, workers: int, resumed: bool = False) -> None:
    """Write the run folder's `run.json`: what the run is. A run starts it; each resume rewrites its
    config with the resume's overrides (a later resume starts from them, rather than silently
    undoing an earlier `--steps` or `--set`) and appends the resume to `resumes`."""
    now = int(time.time())
    record = {"kind": "latentforge.run", "latentforge_version": __version__, "name": run.name, "created_unix": now}
    if resumed:
        try:
            old = json.loads(read_bytes_uri(run.file(RUN_FILE)) or b"{}")
            record.update({k: old[k] for k in ("created_unix", "resumes") if isinstance(old, dict) and k in old})
        except (ValueError, UnicodeDecodeError):
            pass  # a damaged run.json failed earlier (read_run_config); nothing of it is worth keeping
        record["resumes"] = [*record.get("resumes", []), {"unix": now, "backend": backend, "workers": workers}]
    record.update({"experiment": experiment_to_dict(cfg), "data": str(data_dir), "backend": backend,
                   "workers": workers})
    write_bytes_uri(run.file(RUN_FILE), json.dumps(record, indent=2, sort_keys=True).encode())


def read_run_data(run: RunDir) -> str | None:
    """The dataset folder run.json records, or None."""
    try:
        data = json.loads(read_bytes_uri(run.file(RUN_FILE)) or b"{}").get("data")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return data if isinstance(data, str) else None


def read_run_config(run: RunDir):
    """The experiment config a run was started with (for --resume).

    Raises:
        ConfigError: no run.json there.
    """
    raw = read_bytes_uri(run.file(RUN_FILE))
    if raw is None:
        raise ConfigError(f"{run.uri} is not a run folder (no {RUN_FILE}); give the folder a previous train wrote")
    try:
        experiment = json.loads(raw)["experiment"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{run.file(RUN_FILE)} is damaged ({type(e).__name__}: {e}), so the run's config is lost; "
                          "start a new run from the same preset, or restore run.json from a backup") from e
    return parse_experiment(experiment, run.file(RUN_FILE))
