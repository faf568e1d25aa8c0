"""What `train --resume` checks before it continues a run, on either backend (no Ray imports).

- the checkpoint to resume from is the newest one that is whole: a checkpoint cut short (a crash
  or power loss while it was written, a partial copy) is skipped with a line saying so, rather
  than blocking the resume;
- the run still has steps to train: a resume that would train nothing says so and names `--steps`;
- the data is the data the run trained on: the saved data position points into that dataset's
  epochs, so another dataset (or the same one prepared again differently) is refused by name;
- folders a killed checkpoint write left behind are removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from latentforge.checkpoint import CONFIG, TRAINING_STATE, WEIGHTS, find_checkpoints, load_training_state
from latentforge.data.spec import DataSpec
from latentforge.errors import CheckpointError, ConfigError
from latentforge.storage import read_json


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot resume a run (missing, empty or unreadable files), or None."""
    from safetensors import safe_open

    for name in (CONFIG, WEIGHTS, TRAINING_STATE):
        f = folder / name
        if not f.is_file() or f.stat().st_size == 0:
            return f"{name} is missing or empty"
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as weights:
            weights.keys()
        load_training_state(folder)
    except Exception as e:  # noqa: BLE001 - any failure to read is the reason to skip it
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


def latest_resumable(run_dir: str | Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint of a run folder that can resume it; None when it has none at all.

    Raises:
        CheckpointError: it has checkpoints, and every one is damaged.
    """
    found = find_checkpoints(run_dir)
    for folder in reversed(found):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        # left where it is: Ray's record of the run lists it (a missing folder stops Ray's resume),
        # the run writes that step again in its place, and a read error of the moment must not
        # cost a good checkpoint
        log(f"skipping damaged checkpoint {folder.name} ({problem}); resuming from an earlier one")
    if found:
        raise CheckpointError(f"every checkpoint in {run_dir} is damaged ({len(found)} checked); the run cannot "
                              "resume: start a new run")
    return None


def check_resume(checkpoint: Path, cfg, spec: DataSpec, data_dir: str | Path, run_data: str | None = None) -> None:
    """Refuse a resume that would train nothing or continue on other data than the run's.

    Args:
        checkpoint: the folder `latest_resumable` chose.
        cfg: the experiment the resume runs (the run's config and this call's overrides).
        spec: the data the resume was given.
        data_dir: where that data is (for the message).
        run_data: the dataset folder the run was started on (run.json), for the message.

    Raises:
        ConfigError: naming the problem and the fix.
    """
    saved = read_json(checkpoint / CONFIG)
    step = int(saved["step"])
    if step >= cfg.train.steps:
        raise ConfigError(f"the run is already at step {step} ({checkpoint.name}) and train.steps is "
                          f"{cfg.train.steps}: nothing to train; pass --steps N with N above {step} to train on")
    trained_on = DataSpec.from_json(saved["data"]).content_hash
    if trained_on and spec.content_hash and trained_on != spec.content_hash:
        where = f" ({run_data})" if run_data else ""
        raise ConfigError(
            f"--data {data_dir} is not the dataset this run trained on{where}: its content hash is "
            f"{spec.content_hash[:12]}, the run's {trained_on[:12]}. The saved data position counts batches of "
            "the run's own dataset: resume with that --data, or start a new run on this one")


def resume_point(run_dir: str | Path, cfg, spec: DataSpec, data_dir: str | Path, run_data: str | None = None,
                 log: Callable[[str], None] = print) -> Path | None:
    """Everything `--resume` does before training, on either backend: clear a killed write's
    leftovers, choose the newest whole checkpoint (None: the run has none yet), and refuse a
    resume with nothing to train or on other data (`check_resume`)."""
    remove_stale_writes(run_dir)
    found = latest_resumable(run_dir, log)
    if found is not None:
        check_resume(found, cfg, spec, data_dir, run_data)
    return found


def remove_stale_writes(run_dir: str | Path) -> list[Path]:
    """Delete the temporary folders of checkpoint writes a killed process left in the run folder
    (`.NAME.partial-*` and `.NAME.old-*`, see `storage.staged_dir`): each is a whole checkpoint's
    worth of disk, and nothing reads them. An `.old-*` whose checkpoint is missing (killed between
    the two renames) is the only copy: it is put back. Returns what was removed."""
    removed = []
    for old in Path(run_dir).glob(".*.old-*"):  # killed between staged_dir's two renames: the only copy
        final = old.with_name(old.name[1:].rsplit(".old-", 1)[0])
        if old.is_dir() and not final.exists():
            os.replace(old, final)
    for stale in list(Path(run_dir).glob(".*.partial-*")) + list(Path(run_dir).glob(".*.old-*")):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed
