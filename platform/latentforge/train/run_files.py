"""What the chief writes into a run folder while it trains (local path or storage URI):
metrics.jsonl, samples/, and the tracker that mirrors them. Naming and creating run folders is
`train/run_dir.py`'s job."""

from __future__ import annotations

import json

from latentforge.storage import append_line_uri, finite_json, join_uri, write_bytes_uri
from latentforge.train.tracking import NullTracker

METRICS_FILE = "metrics.jsonl"


class RunFiles:
    """Writes a run's records and artefacts (chief only) and mirrors them to a tracker."""

    def __init__(self, run_uri: str, tracker=None):
        self.run_uri = str(run_uri)
        self.tracker = tracker or NullTracker()

    def record(self, record: dict) -> None:
        # a diverged run's NaN losses as null: each line stays JSON that jq or a browser reads
        append_line_uri(join_uri(self.run_uri, METRICS_FILE), json.dumps(finite_json(record), sort_keys=True))
        self.tracker.log(record, int(record["step"]))

    def artifact(self, relpath: str, data: bytes) -> None:
        write_bytes_uri(join_uri(self.run_uri, relpath), data)
        if relpath.startswith("samples/") and relpath.endswith(".png"):
            step = int(relpath.rsplit("_", 1)[-1].split(".")[0])
            self.tracker.image("samples", data, step)
