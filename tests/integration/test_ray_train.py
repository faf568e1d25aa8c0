"""Ray Train wiring on a real local cluster: exactness, run folders, resume, fault tolerance."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny
from latentforge.checkpoint import find_checkpoints, load_checkpoint
from latentforge.errors import ConfigError
from latentforge.train.local import train_local
from latentforge.train.ray_train import train_ray

quiet = lambda *_: None  # noqa: E731


def _weights(run_dir, step):
    return load_file(Path(run_dir) / f"step_{step:06d}" / "model.safetensors")


def _initial_generator(cfg, mnist_dir) -> dict:
    """The generator's weights as training starts (built from the run's seed, as every worker does)."""
    from latentforge.builders import build_gan
    from latentforge.data import PreparedDataset
    from latentforge.data.spec import DataSpec

    torch.manual_seed(cfg.train.seed)
    return build_gan(cfg.model, DataSpec.from_dataset(PreparedDataset(mnist_dir)))[0].state_dict()


def test_ddp_matches_single_process(ray_cluster, mnist_dir, tmp_path):
    """2 workers x batch 8 == 1 process x batch 16 after k steps, for a BatchNorm-free preset.

    WGAN-GP is the hardest case: 5 critic updates per step and a gradient penalty whose double
    backward runs through the DDP-wrapped critic."""
    k = 3
    cfg = tiny("wgangp-mnist", train__steps=k, train__checkpoint_every=k)
    assert cfg.model.g_norm == "layer" and cfg.model.d_norm == "layer"
    train_local(cfg, mnist_dir, tmp_path / "single", log=quiet)
    train_ray(cfg, mnist_dir, workers=2, out="ddp", storage=str(tmp_path / "runs"), log=quiet)  # the default stream loader
    single, ddp = _weights(tmp_path / "single", k), _weights(tmp_path / "runs" / "ddp", k)
    assert single.keys() == ddp.keys()
    moved = 0
    worst = max((single[key] - ddp[key]).abs().max().item() for key in single)
    print(f"max |single - ddp| over {len(single)} tensors: {worst:.2e}")
    for key in single:
        assert torch.allclose(single[key], ddp[key], atol=1e-5, rtol=0), (key, (single[key] - ddp[key]).abs().max())
    # and training really moved the weights (the comparison is not between two initialisations)
    init = _initial_generator(cfg, mnist_dir)
    for key, value in init.items():
        if (single[f"generator.{key}"] - value).abs().max() > 1e-4:
            moved += 1
    assert moved >= len(init) // 2


def test_ddp_matches_single_process_with_resnet_ada_and_accumulation(ray_cluster, mnist_dir, tmp_path):
    """The same for a ResNet GAN with ADA, lazy R1 and 2 accumulation micro-batches: ADA's
    probability, moved by the all-reduced D outputs, ends the same on 2 workers as in 1 process.

    D without spectral norm here: its power-iteration vector is ill-conditioned (a 1e-5 change of
    the weights moved it by 6e-4), so comparing it would test conditioning, not the batch split."""
    from latentforge.checkpoint import load_training_state

    k = 3
    cfg = tiny("resnet-mnist", model__g_norm="layer", model__d_norm="none", gan__r1_weight=1.0, gan__r1_interval=2,
               gan__augment="ada", gan__ada_p_init=0.5, gan__ada_interval=1, gan__ada_kimg=0.2, train__accumulate=2,
               train__steps=k, train__checkpoint_every=k)
    train_local(cfg, mnist_dir, tmp_path / "single", log=quiet)
    train_ray(cfg, mnist_dir, workers=2, out="ddp", storage=str(tmp_path / "runs"), log=quiet)
    single, ddp = _weights(tmp_path / "single", k), _weights(tmp_path / "runs" / "ddp", k)
    assert single.keys() == ddp.keys()
    worst = max((single[key] - ddp[key]).abs().max().item() for key in single)
    print(f"max |single - ddp| over {len(single)} tensors: {worst:.2e}")
    for key in single:
        assert torch.allclose(single[key], ddp[key], atol=1e-5, rtol=0), (key, (single[key] - ddp[key]).abs().max())
    p_single = load_training_state(tmp_path / "single" / f"step_{k:06d}")["algorithm"]["ada"]
    p_ddp = load_training_state(tmp_path / "runs" / "ddp" / f"step_{k:06d}")["algorithm"]["ada"]
    assert p_single["updates"] == p_ddp["updates"] == k
    assert p_single["p"] == pytest.approx(p_ddp["p"], abs=1e-12) and p_single["p"] != 0.5


def test_ddp_matches_single_process_with_stylegan2(ray_cluster, mnist_dir, tmp_path):
    """The same for the StyleGAN2-style family with lazy R1, noise maps and style mixing: the tracked
    mean w is averaged over the global batch, so g_ema's w_avg matches too, and the maps and the
    mixing are drawn for the global batch and sliced like the latents."""
    k = 3
    cfg = tiny("stylegan2-mnist", model__g_options={"noise": True, "style_mixing": 0.9}, gan__r1_interval=2,
               train__steps=k, train__checkpoint_every=k)
    train_local(cfg, mnist_dir, tmp_path / "single", log=quiet)
    train_ray(cfg, mnist_dir, workers=2, out="ddp", storage=str(tmp_path / "runs"), log=quiet)
    single, ddp = _weights(tmp_path / "single", k), _weights(tmp_path / "runs" / "ddp", k)
    assert single.keys() == ddp.keys() and "generator_ema.mapping_net.w_avg" in single
    assert single["generator_ema.mapping_net.w_avg"].abs().sum() > 0
    # Tolerance: Adam with beta1 0 divides each step by |g|, so the all-reduce's fp32 summation
    # order (~1e-7 relative) reaches ~1e-5 of these N(0, 1) equalised-lr weights after 3 steps
    # (measured 1.1e-5 on an AVX2 CPU, below 1e-5 on AVX512). A wrong batch split differs by the
    # order of an update, lr x steps = 7.5e-3; the mapping's weights are stored x100 (learning-rate
    # multiplier 0.01), hence also a relative term.
    for key in single:
        assert torch.allclose(single[key], ddp[key], atol=5e-5, rtol=1e-6), (key, (single[key] - ddp[key]).abs().max())
    step = max((single[f"generator.{k}"] - v).abs().max().item() for k, v in _initial_generator(cfg, mnist_dir).items())
    assert step > 100 * 5e-5  # training moved the weights far more than the tolerance


def test_ray_data_run_writes_a_complete_run_folder(ray_cluster, mnist_dir, tmp_path):
    cfg = tiny("cdcgan-mnist", train__steps=6, train__checkpoint_every=3, train__sample_every=3, train__log_every=2,
               train__tracking="wandb")
    result = train_ray(cfg, mnist_dir, workers=2, out="run", storage=str(tmp_path), data_loader="ray", log=quiet)
    run = tmp_path / "run"
    assert result["step"] == 6 and result["run_dir"] == str(run)
    assert [p.name for p in find_checkpoints(run)] == ["step_000003", "step_000006"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 6]  # one writer (the chief), no duplicates
    assert records[-1]["world_size"] == 2 and records[-1]["per_worker_batch_size"] == 8
    assert records[-1]["global_batch_size"] == 16
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000000.png", "step_000003.png", "step_000006.png"]
    ranks = sorted(json.loads(p.read_text())["rank"] for p in (run / "workers").iterdir())
    assert ranks == [0, 1]
    # wandb: exactly one offline run (rank 0 only)
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, offline
    ck = load_checkpoint(run)
    assert ck.step == 6 and ck.data.num_classes == 10


def test_fresh_run_never_resumes_an_old_one_and_resume_continues(ray_cluster, mnist_dir, tmp_path):
    cfg = tiny("vae-mnist", train__steps=4, train__checkpoint_every=2)
    train_ray(cfg, mnist_dir, workers=1, out="v", storage=str(tmp_path), log=quiet)
    with pytest.raises(ConfigError, match="already exists.*--resume"):
        train_ray(cfg, mnist_dir, workers=1, out="v", storage=str(tmp_path), log=quiet)
    longer = tiny("vae-mnist", train__steps=8, train__checkpoint_every=2)
    result = train_ray(longer, mnist_dir, workers=1, resume=str(tmp_path / "v"), log=quiet)
    assert result["step"] == 8
    steps = [json.loads(line)["step"] for line in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    assert steps[:3] == [1, 2, 4] and steps[-1] == 8 and 5 in steps  # continued from step 4, not from 0


def test_worker_killed_mid_run_resumes_from_latest_checkpoint(ray_cluster, mnist_dir, tmp_path):
    """SIGKILL rank 1 after the first checkpoint: Ray restarts the group, training resumes from the
    latest checkpoint (weights, optimisers, step, data position) and finishes; at most one
    checkpoint interval of steps is repeated."""
    every = 5
    cfg = tiny("dcgan-mnist", train__steps=20, train__checkpoint_every=every, train__log_every=1)
    run = tmp_path / "ft"
    result: dict = {}

    def fit():
        result.update(train_ray(cfg, mnist_dir, workers=2, out="ft", storage=str(tmp_path), max_failures=2, log=quiet))

    t = threading.Thread(target=fit)
    t.start()
    deadline = time.time() + 240

    def last_step():
        log = run / "metrics.jsonl"
        lines = log.read_text().splitlines() if log.exists() else []
        return json.loads(lines[-1])["step"] if lines else 0

    # Reports are a barrier with a queue of one: once step 7 is logged, the controller has taken
    # the step-5 report and registered its checkpoint.
    while time.time() < deadline and last_step() < 7:
        time.sleep(0.05)
    assert last_step() >= 7, "training did not reach step 7"
    victim = json.loads((run / "workers" / "rank_1.json").read_text())["pid"]
    records_before = len((run / "metrics.jsonl").read_text().splitlines())
    killed_at = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    os.kill(victim, signal.SIGKILL)
    t.join(timeout=400)
    assert not t.is_alive(), "training did not finish after the worker was killed"
    assert result["step"] == 20
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    after = steps[records_before:]
    resumed_at = after[0] - 1  # the first record after the restart is for step (checkpoint + 1)
    assert resumed_at % every == 0 and resumed_at >= every
    assert killed_at - resumed_at <= every, (killed_at, resumed_at)  # at most one interval lost
    assert json.loads((run / "workers" / "rank_1.json").read_text())["pid"] != victim  # a new worker
    assert load_checkpoint(run).step == 20


def test_out_names_the_same_run_folder_for_every_worker_count(ray_cluster, mnist_dir, tmp_path, monkeypatch):
    """`train P --workers 0 --out X` and `--workers 2 --out X` put the run in the same place (./X)."""
    from latentforge.cli import main

    monkeypatch.chdir(tmp_path)
    tiny_flags = ["--steps", "2", "--set", "model.g_width=8", "--set", "model.d_width=8", "--set", "train.tracking=none",
                  "--set", "train.global_batch_size=16", "--set", "train.checkpoint_every=2"]
    for workers in (0, 2):
        out = f"runs-here/w{workers}"
        assert main(["train", "dcgan-mnist", "--data", str(mnist_dir), "--workers", str(workers), "--out", out,
                     *tiny_flags]) == 0
        run = tmp_path / out
        assert json.loads((run / "run.json").read_text())["workers"] == max(1, workers)
        assert load_checkpoint(run).step == 2
    assert sorted(p.name for p in (tmp_path / "runs-here").iterdir()) == ["w0", "w2"]
    assert not (tmp_path / "runs").exists()  # nothing went to the default root
