"""`train --resume` as a user meets it: a second resume keeps the first one's overrides, a resume
that would train nothing or on other data is refused by name, a damaged latest checkpoint is
skipped, a killed write's leftovers are cleared, and a changed batch size resumes after the
images already seen."""

import json
import shutil

import pytest
import torch

from latentforge.checkpoint import find_checkpoints, load_checkpoint
from latentforge.cli import main
from latentforge.data import prepare_dataset
from latentforge.data.sources import SourceOptions
from latentforge.train.loop import rescale_position

TINY = ["--set", "model.g_width=8", "--set", "model.d_width=8", "--set", "train.tracking=none",
        "--set", "train.global_batch_size=16", "--set", "train.checkpoint_every=3", "--set", "train.sample_every=100",
        "--workers", "0"]


def train(*args) -> int:
    return main(["train", *args, *TINY])


def test_a_second_resume_keeps_the_first_resumes_overrides(mnist_dir, tmp_path, capsys):
    run = tmp_path / "r"
    assert train("dcgan-mnist", "--steps", "3", "--data", str(mnist_dir), "--out", str(run)) == 0
    assert train("--resume", str(run), "--steps", "6", "--set", "gan.lr_g=1e-4", "--data", str(mnist_dir)) == 0
    recorded = json.loads((run / "run.json").read_text())
    assert recorded["experiment"]["train"]["steps"] == 6 and recorded["experiment"]["gan"]["lr_g"] == 1e-4
    assert len(recorded["resumes"]) == 1
    capsys.readouterr()
    # Before, run.json kept the first launch's 3 steps: this resume "trained" nothing and said done.
    assert train("--resume", str(run), "--data", str(mnist_dir)) == 2
    err = capsys.readouterr().err
    assert "already at step 6" in err and "--steps N with N above 6" in err
    assert train("--resume", str(run), "--steps", "9") == 0  # --data defaults to the run's own
    assert f"data: {mnist_dir} (the run's own)" in capsys.readouterr().out
    ckpt = load_checkpoint(run)
    assert ckpt.step == 9 and ckpt.config["experiment"]["gan"]["lr_g"] == 1e-4  # the first resume's lr still holds
    assert len(json.loads((run / "run.json").read_text())["resumes"]) == 2


def test_resuming_on_another_dataset_is_refused_and_changes_nothing(mnist_dir, tmp_path, capsys):
    run = tmp_path / "r"
    assert train("dcgan-mnist", "--steps", "3", "--data", str(mnist_dir), "--out", str(run)) == 0
    other = tmp_path / "digits"
    prepare_dataset("digits", other, SourceOptions(count=120, size=28, channels=1), log=lambda *_: None)
    before = (run / "run.json").read_bytes()
    capsys.readouterr()
    assert train("--resume", str(run), "--steps", "6", "--data", str(other)) == 2
    err = capsys.readouterr().err
    assert "not the dataset this run trained on" in err and str(mnist_dir) in err
    assert (run / "run.json").read_bytes() == before and load_checkpoint(run).step == 3


def test_a_damaged_latest_checkpoint_is_skipped_and_leftovers_are_removed(mnist_dir, tmp_path, capsys):
    run = tmp_path / "r"
    assert train("dcgan-mnist", "--steps", "6", "--data", str(mnist_dir), "--out", str(run)) == 0
    latest = find_checkpoints(run)[-1]
    state = latest / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # cut short, as a crash mid-write or a partial copy leaves it
    stale = run / ".step_000009.partial-1a2b3c4d"
    shutil.copytree(latest.parent / "step_000003", stale)  # a killed checkpoint write's temporary folder
    capsys.readouterr()
    assert train("--resume", str(run), "--steps", "9", "--data", str(mnist_dir)) == 0
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint step_000006" in out and "resumed from" in out and "step_000003" in out
    assert load_checkpoint(run).step == 9 and not stale.exists()


def test_a_damaged_training_state_says_damaged_not_unsafe(mnist_dir, tmp_path):
    from latentforge.checkpoint import load_training_state
    from latentforge.errors import CheckpointError

    run = tmp_path / "r"
    assert train("dcgan-mnist", "--steps", "3", "--data", str(mnist_dir), "--out", str(run)) == 0
    state = find_checkpoints(run)[-1] / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_training_state(state.parent)


@pytest.mark.parametrize("rows,old,new", [(100, 30, 20), (100, 20, 30), (4500, 64, 48), (97, 16, 16)])
def test_a_changed_batch_size_resumes_after_the_images_already_seen(rows, old, new):
    """Each epoch visits the same order whatever the batch size and drops its last rows % batch:
    the resumed position is in the same epoch, after the images that epoch already gave."""
    for consumed in range(0, 4 * (rows // old) + 1):
        epoch, within = divmod(consumed, rows // old)
        seen = within * old  # images of the current epoch already trained on
        pos = rescale_position(consumed, old, new, rows)
        new_epoch, new_within = divmod(pos, rows // new)
        assert new_epoch == epoch, (consumed, pos)
        assert seen - new < new_within * new <= seen  # at most one new batch of images repeated, none skipped
    # the old rule, which ignores the images each epoch drops, fell an epoch behind here
    assert 6 * 30 // 20 == 9 and rescale_position(6, 30, 20, 100) == 10


def test_ray_resumes_from_the_later_of_its_own_and_the_run_folders_checkpoint(mnist_dir, tmp_path):
    from latentforge.train.ray_train import newer_checkpoint

    run = tmp_path / "r"
    assert train("dcgan-mnist", "--steps", "6", "--data", str(mnist_dir), "--out", str(run)) == 0
    early, late = (str(p) for p in find_checkpoints(run))
    assert newer_checkpoint(early, late) == late  # a --workers 0 resume trained on past Ray's record
    assert newer_checkpoint(late, early) == late
    assert newer_checkpoint(early, None) == early and newer_checkpoint(early, str(tmp_path / "gone")) == early


def test_ray_does_not_resume_from_the_damaged_checkpoint_the_driver_skipped(mnist_dir, tmp_path):
    """Ray's own record lists every checkpoint it took, the one cut short included: the worker
    takes the driver's choice then, or every retry fails on the same file."""
    from latentforge.train.ray_train import newer_checkpoint
    from latentforge.train.resume import latest_resumable

    run = tmp_path / "r"
    assert train("dcgan-mnist", "--steps", "6", "--data", str(mnist_dir), "--out", str(run)) == 0
    early, late = find_checkpoints(run)
    state = late / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    ray_copy = tmp_path / "ray" / late.name  # what Ray restores: its record of the latest report
    shutil.copytree(late, ray_copy)
    chosen = latest_resumable(run, log=lambda *_: None)
    assert chosen.name == early.name
    assert newer_checkpoint(str(ray_copy), str(chosen)) == str(chosen)
    # the damaged one stays where Ray's record of the run expects it (a missing one stops Ray's resume)
    assert [p.name for p in find_checkpoints(run)] == [early.name, late.name]
    assert newer_checkpoint(str(late), str(chosen)) == str(chosen)


def test_a_checkpoint_killed_between_its_two_renames_is_put_back(mnist_dir, tmp_path):
    from latentforge.train.resume import remove_stale_writes

    run = tmp_path / "r"
    assert train("dcgan-mnist", "--steps", "3", "--data", str(mnist_dir), "--out", str(run)) == 0
    only = find_checkpoints(run)[-1]
    only.rename(run / f".{only.name}.old-0a1b2c3d")  # staged_dir moved it aside, then the process died
    remove_stale_writes(run)
    assert [p.name for p in find_checkpoints(run)] == [only.name] and load_checkpoint(run).step == 3


def test_pruning_keeps_the_resume_source_beside_a_damaged_later_checkpoint(mnist_dir, tmp_path, capsys):
    """num_to_keep=1 and a damaged step_000009 (the resume skips it): the checkpoints the resumed
    run writes at steps 4 and 5 sort below it. Pruning counted it, so it deleted the resume's
    source and each new checkpoint as soon as it was written, and the next resume found only the
    damaged one."""
    run = tmp_path / "r"
    keep1 = ["--set", "train.num_to_keep=1"]
    assert train("dcgan-mnist", "--steps", "3", "--data", str(mnist_dir), "--out", str(run), *keep1) == 0
    damaged = run / "step_000009"
    shutil.copytree(run / "step_000003", damaged)
    cfg = json.loads((damaged / "config.json").read_text())
    (damaged / "config.json").write_text(json.dumps({**cfg, "step": 9}))
    (damaged / "training_state.pt").write_bytes(b"cut")
    assert train("--resume", str(run), "--steps", "5", *keep1, "--set", "train.checkpoint_every=1") == 0
    assert sorted(p.name for p in run.glob("step_*")) == ["step_000005", "step_000009"]
    assert load_checkpoint(run / "step_000005").step == 5


def test_pruning_leaves_the_checkpoints_ray_trains_record_lists(mnist_dir, tmp_path):
    """A run trained with Ray, then resumed with --workers 0: the folders Ray's snapshot lists stay
    (Ray refuses to resume a run whose snapshot names a missing folder)."""
    run = tmp_path / "r"
    keep1 = ["--set", "train.num_to_keep=1"]
    assert train("dcgan-mnist", "--steps", "3", "--data", str(mnist_dir), "--out", str(run), *keep1) == 0
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "step_000003", "metrics": {}}],
                "latest_checkpoint_result": {"checkpoint_dir_name": "step_000003", "metrics": {}},
                "validated_checkpoint_dir_names": []}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    assert train("--resume", str(run), "--steps", "9", *keep1) == 0
    assert sorted(p.name for p in run.glob("step_*")) == ["step_000003", "step_000009"]


def test_a_resume_read_in_another_order_starts_the_next_epoch(mnist_dir, tmp_path, capsys):
    """The saved data position is a count of batches; the epoch's order also depends on the
    shuffle window. Resumed with another window mid-epoch, some images of the epoch came again and
    others never (82 of 168 in the review's case): the resume now starts the next epoch, and says so."""
    run = tmp_path / "r"
    small = ["--set", "train.shuffle_window_mb=1"]  # 4,500 digits in windows of 1,337
    assert train("dcgan-mnist", "--steps", "3", "--data", str(mnist_dir), "--out", str(run), *small) == 0
    state = torch.load(run / "step_000003" / "training_state.pt", weights_only=False)
    assert state["data"]["order"] == "windows-of-1337" and state["data"]["batches_consumed"] == 3
    capsys.readouterr()
    # the run keeps its overrides on resume: a window that holds the whole split is asked for
    assert train("--resume", str(run), "--steps", "6", "--set", "train.shuffle_window_mb=256") == 0
    out = capsys.readouterr().out
    assert "resumes at the start of the next epoch (batch 281, not 3)" in out
    state = torch.load(run / "step_000006" / "training_state.pt", weights_only=False)
    assert state["data"]["batches_consumed"] == 284 and state["data"]["order"] == "whole-split"
    capsys.readouterr()
    assert train("--resume", str(run), "--steps", "9") == 0  # the same order: no move
    assert "next epoch" not in capsys.readouterr().out
