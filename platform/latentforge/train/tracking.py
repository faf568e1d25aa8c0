"""Experiment tracking: wandb on the chief worker only, offline unless the user opts in.

Ray Train V2's `setup_wandb` does not see V2 worker ranks (every rank would log), so the chief
calls `wandb.init` itself. Nothing depends on wandb: the same records go to metrics.jsonl.
"""

from __future__ import annotations

import io
import os


class NullTracker:
    def log(self, record: dict, step: int) -> None:
        pass

    def image(self, name: str, png: bytes, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    """Logs records and sample grids to wandb (`WANDB_MODE` defaults to offline: no account)."""

    def __init__(self, run_name: str, config: dict, local_dir: str, resume: bool = False):
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self._wandb = wandb
        os.makedirs(local_dir, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "latentforge"), name=run_name, id=run_name,
                              config=config, dir=local_dir, resume="allow" if resume else None, reinit="finish_previous")

    def log(self, record: dict, step: int) -> None:
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def image(self, name: str, png: bytes, step: int) -> None:
        from PIL import Image

        self.run.log({name: self._wandb.Image(Image.open(io.BytesIO(png)))}, step=step)

    def finish(self) -> None:
        self.run.finish()


def make_tracker(kind: str, run_name: str, config: dict, local_dir: str, resume: bool = False):
    """'wandb' or 'none'."""
    if kind == "wandb":
        return WandbTracker(run_name, config, local_dir, resume)
    return NullTracker()
