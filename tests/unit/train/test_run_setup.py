"""Run folders, the driver's checks and the driver → worker hand-off (no Ray)."""

from pathlib import Path

import pytest
import torch

from helpers import tiny
from latentforge.data.spec import DataSpec
from latentforge.errors import ConfigError
from latentforge.train.run_dir import RUN_FILE, RunDir, resolve_run_dir, write_run_file
from latentforge.train.setup import check_training_setup

MNIST = DataSpec((1, 28, 28), 10)


def test_out_is_the_run_folder_and_storage_the_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_run_dir("x", None).uri == str(tmp_path / "x")
    assert resolve_run_dir("x", "store").uri == str(tmp_path / "store" / "x")
    auto = resolve_run_dir(None, "store", cfg_name="dcgan-mnist")
    assert Path(auto.uri).parent == tmp_path / "store" and auto.name.startswith("dcgan-mnist-")
    assert resolve_run_dir(None, None).parent == str(tmp_path / "runs")
    uri = RunDir("s3://bucket/runs/x")  # (resolving would look for a run there)
    assert (uri.uri, uri.name, uri.parent, uri.is_local) == ("s3://bucket/runs/x", "x", "s3://bucket/runs", False)
    assert resolve_run_dir("file://" + str(tmp_path / "f")).uri == str(tmp_path / "f")


def test_fresh_run_never_reuses_a_folder_and_resume_needs_a_run(tmp_path):
    run = resolve_run_dir(str(tmp_path / "r"))
    write_run_file(run, tiny("dcgan-mnist"), "data", "local", 1)
    assert (tmp_path / "r" / RUN_FILE).is_file()
    with pytest.raises(ConfigError, match="already exists.*--resume"):
        resolve_run_dir(str(tmp_path / "r"))
    assert resolve_run_dir(resume=str(tmp_path / "r")).uri == run.uri
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("x")
    with pytest.raises(ConfigError, match="already exists"):
        resolve_run_dir(str(tmp_path / "other"))
    with pytest.raises(ConfigError, match="not a run folder"):
        resolve_run_dir(resume=str(tmp_path / "other"))
    with pytest.raises(ConfigError, match="drop --storage"):
        resolve_run_dir(str(tmp_path / "abs"), "store")


def test_per_worker_batch_size_is_checked_not_ignored():
    cfg = tiny("dcgan-mnist", train__global_batch_size=16, train__per_worker_batch_size=8)
    check_training_setup(cfg, MNIST, workers=2, train_rows=100)
    with pytest.raises(ConfigError, match=r"per_worker_batch_size=8 does not match global batch 16 / 1 workers = 16"):
        check_training_setup(cfg, MNIST, workers=1, train_rows=100)


def test_accumulation_must_divide_the_per_worker_batch():
    cfg = tiny("dcgan-mnist", train__global_batch_size=16, train__accumulate=4)
    check_training_setup(cfg, MNIST, workers=2, train_rows=100)  # 8 per worker, micro-batches of 2
    with pytest.raises(ConfigError, match=r"train.accumulate=4 does not divide the per-worker batch \(16 / 8 workers = 2\)"):
        check_training_setup(cfg, MNIST, workers=8, train_rows=100)


def test_sync_batchnorm_on_cpu_is_an_error():
    cfg = tiny("dcgan-mnist", train__sync_batchnorm=True)
    with pytest.raises(ConfigError, match="sync_batchnorm needs GPU workers"):
        check_training_setup(cfg, MNIST, workers=2, train_rows=100)
    check_training_setup(cfg, MNIST, workers=2, train_rows=100, use_gpu=True)


def test_every_problem_is_reported_together():
    cfg = tiny("dcgan-mnist", train__global_batch_size=15, train__sync_batchnorm=True)
    with pytest.raises(ConfigError) as e:
        check_training_setup(cfg, MNIST, workers=2, train_rows=10)
    assert all(s in str(e.value) for s in ("not divisible by 2 workers", "larger than the training split", "sync_batchnorm"))


def test_train_launch_validates_itself(tmp_path):
    from latentforge.train.ray_train import TrainLaunch

    good = dict(experiment=tiny("dcgan-mnist"), spec=MNIST, run_uri=str(tmp_path), run_name="r",
                data_dir=str(tmp_path), data_loader="memory", threads=1, train_rows=100)
    assert TrainLaunch(**good).data_loader == "memory"
    with pytest.raises(ConfigError, match="unknown data loader 'disk'; choose one of: stream, memory, ray"):
        TrainLaunch(**{**good, "data_loader": "disk"})
    with pytest.raises(ConfigError, match="data_dir must be absolute"):
        TrainLaunch(**{**good, "data_dir": "data/mnist"})
    with pytest.raises(TypeError, match="validated config"):
        TrainLaunch(**{**good, "experiment": {"name": "x"}})


def test_resume_with_a_new_global_batch_continues_after_the_same_images(mnist_dir, tmp_path):
    from latentforge.checkpoint import find_checkpoints, load_training_state
    from latentforge.train.local import train_local

    quiet = lambda *_: None  # noqa: E731
    train_local(tiny("dcgan-mnist", train__steps=6, train__checkpoint_every=6), mnist_dir, tmp_path, log=quiet)
    assert load_training_state(find_checkpoints(tmp_path)[-1])["data"] == {"batches_consumed": 6, "global_batch_size": 16,
                                                                            "order": "whole-split"}
    bigger = tiny("dcgan-mnist", train__steps=8, train__checkpoint_every=8, train__global_batch_size=32)
    record = train_local(bigger, mnist_dir, tmp_path, resume=True, log=quiet)
    # 6 batches of 16 = 3 batches of 32 seen before, then 2 more
    assert load_training_state(find_checkpoints(tmp_path)[-1])["data"] == {"batches_consumed": 5, "global_batch_size": 32,
                                                                            "order": "whole-split"}
    # the images seen, not 8 steps x today's batch of 32 (256); this attempt processed 64
    assert record["images_seen"] == 160 and record["attempt_images"] == 64


def test_workers_0_refuses_a_ray_data_loader(mnist_dir, tmp_path, capsys):
    from latentforge.cli import main

    code = main(["train", "dcgan-mnist", "--data", str(mnist_dir), "--workers", "0", "--data-loader", "memory",
                 "--out", str(tmp_path / "r")])
    assert code == 2 and "--data-loader memory applies to Ray workers" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_what_only_a_constructor_can_check_fails_on_the_driver():
    """resnet-ada-color puts attention on 16x16 maps, which a 28-px model does not have: the
    driver says so before any worker starts (the networks are built on the 'meta' device)."""
    from latentforge.config import load_experiment

    cfg = load_experiment("resnet-ada-color", {"train.global_batch_size": 16})
    with pytest.raises(ConfigError, match="attention_res 16 is not a feature-map side below the 28-px output"):
        check_training_setup(cfg, MNIST, workers=1, train_rows=100)
    check_training_setup(cfg, DataSpec((3, 32, 32), 0), workers=1, train_rows=100)


def test_minibatch_std_groups_never_straddle_reals_and_fakes():
    """D sees [reals, fakes] of one micro-batch each in one batch; with 6 per worker a group of 4
    would hold two reals and two fakes, so the real logits (and R1) would depend on the fakes."""
    import torch

    from latentforge.models.stylegan2 import minibatch_stddev

    x = torch.randn(12, 2, 2, 2, requires_grad=True)
    minibatch_stddev(x, 4)[:6, -1].sum().backward()
    assert x.grad[6:].abs().sum() > 0  # what the check below exists for: fakes leak into the reals' statistic

    cfg = tiny("stylegan2-mnist", train__global_batch_size=12)
    with pytest.raises(ConfigError, match=r"mbstd_group=4 does not split the discriminator's micro-batch of 6 .*"
                                          r"mbstd_group=3"):
        check_training_setup(cfg, MNIST, workers=2, train_rows=100)
    check_training_setup(cfg, MNIST, workers=1, train_rows=100)  # 12 per worker: three whole groups
    check_training_setup(tiny("stylegan2-mnist", train__global_batch_size=12, model__d_options={"mbstd_group": 3}),
                         MNIST, workers=2, train_rows=100)


def test_a_plugin_whose_generator_draws_another_size_is_named_on_the_driver(tmp_path, monkeypatch):
    import sys

    from helpers import PLUGIN_SOURCE
    from latentforge.models import plugins

    (tmp_path / "lf_test_plugin.py").write_text(PLUGIN_SOURCE)
    (tmp_path / "lf_fixed8.py").write_text(
        "import torch\nfrom lf_test_plugin import TinyGenerator\n\n\n"
        "class Fixed8(TinyGenerator):  # always draws 8x8, whatever the data\n"
        "    def __init__(self, **kw):\n"
        "        super().__init__(**kw)\n"
        "        self.shape = (self.shape[0], 8, 8)\n"
        "        self.net[2] = torch.nn.Linear(self.net[2].in_features, self.shape[0] * 64)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_allowed", set())
    try:
        cfg = tiny("dcgan-mnist", model__arch="lf_fixed8:Fixed8")
        check_training_setup(cfg, DataSpec((1, 8, 8), 0), workers=1, train_rows=100)  # the size it draws
        with pytest.raises(ConfigError, match=r"the generator of model.arch 'lf_fixed8:Fixed8' returns "
                                              r"\(2, 1, 8, 8\) for a batch of 2; it must return .*\(2, 1, 28, 28\)"):
            check_training_setup(cfg, MNIST, workers=1, train_rows=100)
    finally:
        sys.modules.pop("lf_test_plugin", None)
        sys.modules.pop("lf_fixed8", None)


class _NoisyG(torch.nn.Module):
    """A plug-in generator with random inputs of its own; `forward_kw` False drops `randomness`."""

    def __init__(self, z_dim, spec, forward_kw=True):
        super().__init__()
        self.z_dim, self.num_classes, self._spec = z_dim, 0, spec
        self.lin = torch.nn.Linear(z_dim, 16 * 16)
        if not forward_kw:
            self.forward = lambda z, labels=None: self.lin(z).view(-1, 1, 16, 16)

    def random_inputs(self):
        return self._spec

    def forward(self, z, labels=None, randomness=None):
        return self.lin(z).view(-1, 1, 16, 16)


@pytest.mark.parametrize("spec, forward_kw, message", [
    ({"n": ("normal", (1, 4, 4))}, False, "forward takes no `randomness`: add `randomness=None`"),
    ({"n": ("gauss", (1, 4, 4))}, True, r"must return \{name: \('normal' \| 'uniform', per-sample shape\)\}.*'n': \('gauss'"),
    ({"n": ("normal", 4)}, True, r"got 'n': \('normal', 4\)"),
    ({"n": ("normal", (0, 4))}, True, r"got 'n': \('normal', \(0, 4\)\)"),
    (["n"], True, "got list"),
])
def test_a_plugins_random_inputs_are_checked_on_the_driver(spec, forward_kw, message):
    """A plug-in that names random inputs but cannot take them, or names them in a form training
    cannot draw, is refused before any worker starts, with the form and the fix."""
    from latentforge.train.setup import _check_random_inputs

    cfg = tiny("dcgan-mnist")
    with pytest.raises(ConfigError, match=message):
        _check_random_inputs(cfg, _NoisyG(8, spec, forward_kw))
    _check_random_inputs(cfg, _NoisyG(8, {"n": ("normal", (1, 4, 4))}))  # a well-formed one passes
    _check_random_inputs(cfg, _NoisyG(8, {}, forward_kw=False))  # none at all: forward may lack it
