"""The chief's view of a run folder (local path or storage URI): metrics.jsonl, samples/,
workers/, run.json, and the tracker that mirrors them."""

from __future__ import annotations

import json
import time
import uuid

from latentforge import __version__
from latentforge.config import experiment_to_dict
from latentforge.storage import append_line_uri, join_uri, write_bytes_uri
from latentforge.train.tracking import NullTracker

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


def new_run_name(cfg_name: str) -> str:
    """A unique run name: preset, UTC time, random suffix (a fresh run never reuses a folder)."""
    return f"{cfg_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def run_file_json(name: str, cfg, data_dir: str, backend: str, workers: int) -> bytes:
    return json.dumps({
        "kind": "latentforge.run",
        "latentforge_version": __version__,
        "name": name,
        "experiment": experiment_to_dict(cfg),
        "data": str(data_dir),
        "backend": backend,
        "workers": workers,
        "created_unix": int(time.time()),
    }, indent=2, sort_keys=True).encode()


class RunFiles:
    """Writes a run's records and artefacts (chief only) and mirrors them to a tracker."""

    def __init__(self, run_uri: str, tracker=None):
        self.run_uri = str(run_uri)
        self.tracker = tracker or NullTracker()

    def record(self, record: dict) -> None:
        append_line_uri(join_uri(self.run_uri, METRICS_FILE), json.dumps(record, sort_keys=True))
        self.tracker.log(record, int(record["step"]))

    def artifact(self, relpath: str, data: bytes) -> None:
        write_bytes_uri(join_uri(self.run_uri, relpath), data)
        if relpath.startswith("samples/") and relpath.endswith(".png"):
            step = int(relpath.rsplit("_", 1)[-1].split(".")[0])
            self.tracker.image("samples", data, step)
