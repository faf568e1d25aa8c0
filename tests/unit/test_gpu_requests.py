"""Asking for GPUs where there are none: a clear refusal before any work starts, never a CUDA
driver traceback or a Ray run that waits forever (this machine, like CI's, has no GPU; where a
test runs on one, the refusals are checked with CUDA hidden)."""

import pytest
import torch

from latentforge.devices import check_cluster_gpus, require_cuda
from latentforge.errors import ConfigError


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_require_cuda_names_the_flag_and_the_way_out(no_cuda):
    with pytest.raises(ConfigError, match=r"--gpus: this process sees no CUDA GPU .*; drop --gpus to train on the CPU"):
        require_cuda("--gpus", "drop --gpus to train on the CPU")


def test_train_without_ray_refuses_gpus_before_the_run_folder_exists(mnist_dir, tmp_path, capsys, no_cuda):
    from latentforge.cli import main

    code = main(["train", "dcgan-mnist", "--data", str(mnist_dir), "--workers", "0", "--gpus", "--steps", "2",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "--gpus: this process sees no CUDA GPU" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_bench_train_refuses_gpus_before_measuring(no_cuda, monkeypatch):
    from latentforge.bench import train_bench

    monkeypatch.setattr(train_bench, "_PlainLoop", None)  # would fail if anything were built
    with pytest.raises(ConfigError, match="drop --gpus to measure this CPU"):
        train_bench.bench_train("dcgan-mnist", "unused", use_gpu=True, ray=False)


def test_a_local_ray_cluster_without_enough_gpus_is_refused_and_a_joined_one_waits_with_a_warning():
    for gpus, fix in [(0, "drop --gpus to train on the CPU, or run on a GPU machine"), (1, "lower --workers to 1")]:
        with pytest.raises(ConfigError, match=rf"has {gpus} GPU\(s\) and --gpus with 2 worker\(s\) asks 2: .*{fix}"):
            check_cluster_gpus(2, gpus, joined=False)
    said = []
    check_cluster_gpus(2, 0, joined=True, log=said.append)
    assert len(said) == 1 and "waits until the cluster (its autoscaler) adds GPU nodes" in said[0]
    said.clear()
    check_cluster_gpus(2, 2, joined=False, log=said.append)
    check_cluster_gpus(1, 8, joined=True, log=said.append)
    assert said == []


def test_train_ray_checks_the_clusters_gpus_before_writing_the_run_folder(mnist_dir, tmp_path, monkeypatch):
    """The check sits between starting Ray and writing run.json: a refused run leaves no folder
    that a second try would find "already exists"."""
    import ray

    from latentforge.train import ray_train

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_train, "ray_init", lambda address=None: None)  # no cluster is started
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    from latentforge.config import load_experiment

    cfg = load_experiment("dcgan-mnist", {"train.tracking": "none"})
    with pytest.raises(ConfigError, match=r"has 0 GPU\(s\) and --gpus with 1 worker\(s\) asks 1"):
        ray_train.train_ray(cfg, mnist_dir, workers=1, use_gpu=True, out=str(tmp_path / "r"), log=lambda *_: None)
    assert not (tmp_path / "r" / "run.json").exists()
    monkeypatch.setenv("RAY_ADDRESS", "local")  # Ray's name for a cluster of this machine: refused, not waited on
    with pytest.raises(ConfigError, match=r"has 0 GPU\(s\)"):
        ray_train.train_ray(cfg, mnist_dir, workers=1, use_gpu=True, out=str(tmp_path / "r2"), log=lambda *_: None)


def test_scoring_on_a_gpu_turns_tf32_off_as_the_cpu_statistics_are_fp32(monkeypatch):
    """cuDNN's default is TF32: a GPU's FID would otherwise compare TF32 features with the fp32
    real statistics."""
    from latentforge.cli import chosen_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32  # (module __setattr__s:
    try:                                                                             # not monkeypatchable)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        assert chosen_device("cuda") == "cuda"
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
        torch.backends.cudnn.allow_tf32 = True
        assert chosen_device("cpu") == "cpu" and torch.backends.cudnn.allow_tf32 is True  # the CPU leaves them be
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_the_backbone_is_copied_only_when_it_sits_elsewhere():
    from torch import nn

    from latentforge.devices import on_device

    m = nn.Linear(2, 2)
    assert on_device(m, "cpu") and on_device(m, torch.device("cpu"))
    assert not on_device(m, "meta") and not on_device(m, "cuda") and not on_device(m, "cuda:1")


def test_generate_evaluate_and_edit_eval_refuse_a_gpu_device_they_cannot_see(mnist_dir, tmp_path, capsys, no_cuda):
    from latentforge.cli import main

    for argv in (["generate", str(tmp_path / "no-run"), "--out", str(tmp_path / "g.png"), "--device", "cuda"],
                 ["evaluate", str(tmp_path / "no-run"), "--data", str(mnist_dir), "--device", "cuda"],
                 ["edit-eval", str(tmp_path / "no-run"), "--data", str(mnist_dir), "--device", "cuda"]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "--device cuda: this process sees no CUDA GPU" in err and "drop --device" in err, err
    assert not (tmp_path / "g.png").exists()


SWEEP = """
name: s
base: dcgan-mnist
overrides: {model.g_width: 8, model.d_width: 8}
space:
  gan.lr_g: {choice: [1.0e-4, 2.0e-4]}
workers_per_trial: 2
max_concurrent: 3
steps: 4
eval_every: 2
"""


def _sweep(tmp_path, extra: str = ""):
    from latentforge.tune.space import load_sweep

    f = tmp_path / "sweep.yaml"
    f.write_text(SWEEP + extra)
    return load_sweep(f)


def _no_cluster(monkeypatch, gpus: float):
    """run_sweep up to its GPU check, with no Ray cluster and no feature network trained."""
    import ray

    from latentforge import ray_cluster
    from latentforge.metrics import features

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_cluster, "ray_init", lambda address=None: None)
    monkeypatch.setattr(features, "ensure_feature_net", lambda *a, **k: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": gpus})


def test_a_gpu_sweep_is_refused_before_its_folder_exists_where_no_trial_could_be_placed(mnist_dir, tmp_path, monkeypatch):
    """Before, a sweep never asked for GPUs: on a GPU node every trial trained on its CPU."""
    from latentforge.tune.sweep import run_sweep

    sw = _sweep(tmp_path)
    assert sw.gpus is False and _sweep(tmp_path, "gpus: true\n").gpus is True
    _no_cluster(monkeypatch, gpus=1)
    for how in ({"gpus": True}, {"gpus": False, "sw": _sweep(tmp_path, "gpus: true\n")}):  # --gpus, or the YAML's
        with pytest.raises(ConfigError, match=r"has 1 GPU\(s\) and --gpus \(or the sweep's gpus: true\) with 2 "
                                              r"worker\(s\) asks 2: drop --gpus .*lower workers_per_trial to 1"):
            run_sweep(how.get("sw", sw), str(mnist_dir), out=str(tmp_path / "sweep"), gpus=how["gpus"],
                      registry=None, log=lambda *_: None)
        assert not (tmp_path / "sweep").exists()


def test_resuming_a_sweep_with_gpus_records_them_for_later_resumes(mnist_dir, tmp_path, monkeypatch):
    import json

    from ray import tune

    from latentforge.tune.sweep import SWEEP_FILE, run_sweep

    class Started(Exception):
        pass

    class Tuner:  # the sweep gets as far as Tune, which is not started here
        @staticmethod
        def can_restore(path):
            raise Started

    _no_cluster(monkeypatch, gpus=2)
    monkeypatch.setattr(tune, "Tuner", Tuner)
    folder = tmp_path / "sweep"
    folder.mkdir()
    data = str(mnist_dir.resolve())
    (folder / SWEEP_FILE).write_text(json.dumps({"sweep": _sweep(tmp_path).model_dump(mode="json"), "data": data,
                                                 "created_unix": 1}))
    with pytest.raises(Started):
        run_sweep(_sweep(tmp_path), str(mnist_dir), out=str(folder), resume=True, gpus=True, registry=None,
                  log=lambda *_: None)
    saved = json.loads((folder / SWEEP_FILE).read_text())
    assert saved["sweep"]["gpus"] is True and saved["data"] == data and saved["created_unix"] == 1


def test_a_gpu_sweep_says_when_its_gpus_run_fewer_trials_than_max_concurrent(tmp_path, monkeypatch):
    from latentforge.tune.sweep import _check_sweep_gpus

    _no_cluster(monkeypatch, gpus=4)
    said = []
    _check_sweep_gpus(_sweep(tmp_path), None, said.append)  # 2 trials of 2 GPU workers fit, 3 may run at once
    assert said == ["note: 4 GPU(s) run 2 trial(s) of 2 GPU worker(s) at once, not max_concurrent 3; "
                    "the other trials queue"]
    _no_cluster(monkeypatch, gpus=6)
    said.clear()
    _check_sweep_gpus(_sweep(tmp_path), None, said.append)
    assert said == []


def test_a_gpu_sweeps_trials_ask_ray_train_for_gpu_workers(mnist_dir, tmp_path, monkeypatch):
    """The trial function (run by Tune) hands `gpus` to the trainer it builds, as `train --gpus` does."""
    import ray
    import ray.util.queue
    from ray import tune

    from latentforge.train import ray_train
    from latentforge.tune.sweep import sweep_trial

    class Built(Exception):
        pass

    asked = {}

    def make_trainer(cfg, data_dir, workers, run, **kwargs):
        asked.update(workers=workers, **kwargs)
        raise Built

    class Queue:  # the trial's report queue is a Ray actor; none is started here
        actor = None

        def __init__(self, *a, **k):
            pass

        def get(self, timeout=None):
            raise ray.util.queue.Empty

    monkeypatch.setattr(ray_train, "make_trainer", make_trainer)
    monkeypatch.setattr(ray.util.queue, "Queue", Queue)
    monkeypatch.setattr(ray, "kill", lambda actor: None)
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tune, "get_context", lambda: type("Ctx", (), {"get_trial_dir": lambda self: str(tmp_path)})())
    for gpus in (True, False):
        sw = _sweep(tmp_path, f"gpus: {str(gpus).lower()}\n")
        with pytest.raises(Built):
            sweep_trial({"gan.lr_g": 1e-4}, sw.model_dump(mode="json"), str(mnist_dir))
        assert asked["use_gpu"] is gpus and asked["workers"] == 2
