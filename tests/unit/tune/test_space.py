import importlib.util

import pytest

from latentforge.errors import ConfigError
from latentforge.tune.space import distinct_points, experiment_for, load_sweep

GOOD = """
name: s
base: dcgan-mnist
overrides: {model.g_width: 8}
space:
  gan.lr_g: {loguniform: [1.0e-5, 1.0e-2]}
  gan.loss: {choice: [ns, hinge]}
  model.z_dim: {randint: [16, 64]}
  gan.n_critic: 2
steps: 50
eval_every: 10
"""


def _write(tmp_path, text):
    f = tmp_path / "sweep.yaml"
    f.write_text(text)
    return f


def test_valid_sweep_and_trial_config(tmp_path):
    sw = load_sweep(_write(tmp_path, GOOD))
    cfg = experiment_for(sw, {"gan.lr_g": 3e-4, "gan.loss": "hinge", "model.z_dim": 20, "gan.n_critic": 2})
    assert cfg.gan.lr_g == 3e-4 and cfg.gan.loss == "hinge" and cfg.model.g_width == 8
    assert cfg.train.steps == 50 and cfg.train.eval_every == 10 and cfg.train.checkpoint_every == 10


def test_typo_in_a_space_key_fails_before_any_trial(tmp_path):
    with pytest.raises(ConfigError, match="gan.lr_gg"):
        load_sweep(_write(tmp_path, GOOD.replace("gan.lr_g:", "gan.lr_gg:")))


def test_out_of_range_corner_fails(tmp_path):
    with pytest.raises(ConfigError, match="gan.loss"):
        load_sweep(_write(tmp_path, GOOD.replace("[ns, hinge]", "[ns, hinge2]")))


def test_bad_distribution_and_unknown_field(tmp_path):
    with pytest.raises(ConfigError, match="space.*choice, uniform, loguniform"):
        load_sweep(_write(tmp_path, GOOD.replace("loguniform:", "logunif:")))
    with pytest.raises(ConfigError, match="schedulr: unknown key"):
        load_sweep(_write(tmp_path, GOOD + "schedulr: {kind: asha}\n"))
    with pytest.raises(ConfigError, match="low < high"):
        load_sweep(_write(tmp_path, GOOD.replace("[1.0e-5, 1.0e-2]", "[0, 1.0e-2]")))


FINITE = """
name: f
base: dcgan-mnist
space:
  gan.lr_g: {choice: [5.0e-5, 2.0e-4, 5.0e-4, 1.0]}
  gan.lr_d: {choice: [5.0e-5, 2.0e-4, 5.0e-4, 1.0]}
  gan.beta1: {choice: [0.0, 0.5]}
  gan.n_critic: 1
trials: 8
"""


def test_a_finite_space_is_sampled_without_replacement(tmp_path):
    sw = load_sweep(_write(tmp_path, FINITE))
    points = distinct_points(sw)
    keys = [tuple(sorted(p.items())) for p in points]
    assert len(points) == 8 and len(set(keys)) == 8  # no configuration twice
    assert all(set(p) == {"gan.lr_g", "gan.lr_d", "gan.beta1", "gan.n_critic"} for p in points)  # constants ride along
    assert points == distinct_points(sw)  # the seed fixes the trials
    other = distinct_points(sw.model_copy(update={"search": sw.search.model_copy(update={"seed": 1})}))
    assert other != points
    # more trials than points: every point once before any repeats
    many = distinct_points(sw.model_copy(update={"trials": 40}))
    assert len(many) == 40 and len({tuple(sorted(p.items())) for p in many[:32]}) == 32


def test_continuous_or_grid_spaces_keep_tunes_sampling(tmp_path):
    assert distinct_points(load_sweep(_write(tmp_path, GOOD))) is None
    grid = FINITE.replace("gan.beta1: {choice:", "gan.beta1: {grid:")
    assert distinct_points(load_sweep(_write(tmp_path, grid))) is None


def test_unknown_metric_fails_at_load_with_the_valid_names(tmp_path):
    with pytest.raises(ConfigError, match=r"metric: .*unknown metric 'fdi'.*choose one of: fid, kid"):
        load_sweep(_write(tmp_path, GOOD + "metric: fdi\n"))


def test_metric_optimised_the_wrong_way_fails_at_load(tmp_path):
    with pytest.raises(ConfigError, match="set mode: max"):
        load_sweep(_write(tmp_path, GOOD + "metric: recall\nmode: min\n"))
    assert load_sweep(_write(tmp_path, GOOD + "metric: recall\nmode: max\n")).metric == "recall"


def test_vae_only_metric_on_a_gan_sweep_fails_at_load(tmp_path):
    with pytest.raises(ConfigError, match="val_neg_elbo.*VAEs only"):
        load_sweep(_write(tmp_path, GOOD + "metric: val_neg_elbo\n"))


def test_each_trial_is_judged_by_its_own_loss(tmp_path):
    """A space that chooses gan.loss gives each trial its own instability rules: a WGAN-GP
    critic's outputs are not probabilities, so 'discriminator wins' must not stop it."""
    from latentforge.tune.instability import InstabilityPolicy
    from latentforge.tune.sweep import InstabilityStopper, trial_loss

    sw = load_sweep(_write(tmp_path, GOOD.replace("[ns, hinge]", "[ns, wgan-gp]")))
    assert trial_loss(sw, {"gan.loss": "wgan-gp"}) == "wgan-gp" and trial_loss(sw, {"gan.loss": "ns"}) == "ns"
    seen = {}

    class Recording(InstabilityPolicy):
        def observe(self, trial_id, result, loss=None):
            seen[trial_id] = loss
            return super().observe(trial_id, result, loss)

    stopper = InstabilityStopper(Recording(), str(tmp_path), loss_of=lambda p: trial_loss(sw, p))
    wins = {"d_loss": 0.01, "d_real": 0.99, "d_fake": 0.01, "g_loss": 5.0}
    for step in (25, 50, 75, 100):
        assert not stopper("wgan", {"step": step, "config": {"gan.loss": "wgan-gp"}, **wins})
    assert seen == {"wgan": "wgan-gp"}
    policy = InstabilityPolicy()  # the same stream under the non-saturating loss is stopped
    decisions = [policy.observe("ns", {"step": s, **wins}, loss="ns") for s in (25, 50, 75)]
    assert decisions[-1].reason == "discriminator_wins"


def test_conditional_only_metric_on_an_unconditional_base_fails_at_load(tmp_path):
    with pytest.raises(ConfigError, match="class_accuracy.*class-conditional models only"):
        load_sweep(_write(tmp_path, GOOD + "metric: class_accuracy\nmode: max\n"))


FAMILIES_SWEEP = """
name: fam
base: dcgan-mnist
space:
  gan.loss: {choice: [ns, hinge]}
families:
  dcgan:
    model.g_width: {choice: [16, 32]}
  resnet:
    model.g_width: 16
    model.g_options.attention_res: {choice: [0, 14]}
    gan.beta1: 0.0
trials: 6
"""


def test_a_sweep_over_families_gives_each_trial_its_familys_own_parameters(tmp_path):
    from latentforge.tune.space import trial_params

    f = tmp_path / "fam.yaml"
    f.write_text(FAMILIES_SWEEP)
    sw = load_sweep(f)
    points = distinct_points(sw)
    # the union of each family's product with the shared loss: dcgan 2 x 2, resnet 2 x 2
    effective = {tuple(sorted(trial_params(sw, p).items())) for p in points}
    assert len(points) == 6 and len(effective) == 6
    for p in points:
        cfg = experiment_for(sw, p)
        assert cfg.model.arch == p["model.arch"] and cfg.gan.loss == p["gan.loss"]
        if cfg.model.arch == "resnet":
            assert cfg.gan.beta1 == 0.0 and cfg.model.g_options["attention_res"] == p["resnet::model.g_options.attention_res"]
            assert set(trial_params(sw, p)) == {"model.arch", "gan.loss", "model.g_width", "model.g_options.attention_res",
                                                "gan.beta1"}
        else:
            assert cfg.gan.beta1 == 0.5 and cfg.model.g_options == {}  # resnet's settings do not leak into dcgan trials
            assert cfg.model.g_width == p["dcgan::model.g_width"]


def test_a_family_sub_space_is_checked_at_load(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(FAMILIES_SWEEP.replace("model.g_options.attention_res: {choice: [0, 14]}",
                                        "model.g_options.attention_rez: {choice: [0, 14]}"))
    with pytest.raises(ConfigError, match="model.arch='resnet'.*attention_rez"):
        load_sweep(f)
    f.write_text(FAMILIES_SWEEP.replace("  resnet:", "  stylegan9:"))
    with pytest.raises(ConfigError, match="unknown model.arch 'stylegan9'"):
        load_sweep(f)
    f.write_text(FAMILIES_SWEEP.replace("  gan.loss: {choice: [ns, hinge]}", "  model.arch: {choice: [dcgan]}"))
    with pytest.raises(ConfigError, match="remove model.arch from space"):
        load_sweep(f)


def test_the_shipped_architecture_sweep_loads():
    from pathlib import Path

    sw = load_sweep(Path(__file__).parents[3] / "jobs" / "sweeps" / "arch-mnist.yaml")
    assert set(sw.families) == {"dcgan", "resnet", "stylegan2"} and len(distinct_points(sw)) == sw.trials
    # its StyleGAN2 trials use the preset's bounded output (the reference's linear one collapses on digits)
    assert sw.families["stylegan2"]["model.g_options.output"] == "tanh"


def test_families_refuse_pbt_and_grids(tmp_path):
    f = tmp_path / "pbt.yaml"
    f.write_text(FAMILIES_SWEEP + "scheduler: {kind: pbt}\n")
    with pytest.raises(ConfigError, match="pbt cannot search families"):
        load_sweep(f)
    f.write_text(FAMILIES_SWEEP.replace("model.g_width: {choice: [16, 32]}", "model.g_width: {grid: [16, 32]}"))
    with pytest.raises(ConfigError, match="grid would multiply"):
        load_sweep(f)


def test_family_trials_are_spread_evenly_whatever_each_sub_space_size(tmp_path):
    """A family with 16 times the points of another still gets only its share of the trials."""
    f = tmp_path / "uneven.yaml"
    f.write_text(FAMILIES_SWEEP.replace("    model.g_width: {choice: [16, 32]}\n", "    model.g_width: 32\n").replace(
        "    model.g_width: 16\n    model.g_options.attention_res: {choice: [0, 14]}\n",
        "    model.g_width: {choice: [8, 16, 24, 32]}\n    model.d_width: {choice: [8, 16, 24, 32]}\n"))
    sw = load_sweep(f)
    points = distinct_points(sw)
    archs = [p["model.arch"] for p in points]
    assert sorted(archs) == ["dcgan"] * 3 + ["resnet"] * 3, archs
    resnet = [(p["resnet::model.g_width"], p["resnet::model.d_width"]) for p in points if p["model.arch"] == "resnet"]
    assert len(set(resnet)) == 3  # without replacement within a family


def test_a_resumed_sweeps_stopper_keeps_every_sessions_stop_reasons(tmp_path):
    """Tune restores the stopper pickled when the sweep began (it knew no reasons then). It must
    neither drop the first session's reasons from stop_reasons.json nor miss them: summarize
    would show an unstable trial as completed, and promote it."""
    from ray import cloudpickle as pickle  # as Tune pickles its run config

    from latentforge.tune.instability import InstabilityPolicy
    from latentforge.tune.sweep import InstabilityStopper, stop_reasons

    pickled = pickle.dumps(InstabilityStopper(InstabilityPolicy(), str(tmp_path)))  # what tuner.pkl holds
    first = InstabilityStopper(InstabilityPolicy(), str(tmp_path))  # the first session's
    nan = {"d_loss": float("nan"), "g_loss": 1.0, "d_real": 0.5, "d_fake": 0.5}
    assert first("trial_a", {"step": 25, **nan})
    restored = pickle.loads(pickled)  # the resumed session's
    assert restored.reasons["trial_a"]["reason"] == first.reasons["trial_a"]["reason"]
    assert restored("trial_b", {"step": 25, **nan})
    assert set(stop_reasons(tmp_path)) == {"trial_a", "trial_b"}


@pytest.mark.parametrize("change,message", [
    # values a trial would only fail on after Ray started, or silently never use
    (("model.z_dim: {randint: [16, 64]}", "model.z_dim: {loguniform: [16, 256]}"),
     "model.z_dim: loguniform samples fractions and this field takes whole numbers"),
    (("model.z_dim: {randint: [16, 64]}", "model.z_dim: {randint: [64, 32]}"), r"randint: needs low < high"),
    (("gan.lr_g: {loguniform: [1.0e-5, 1.0e-2]}", "gan.lr_g: {loguniform: [null, 1.0e-2]}"), "two numbers"),
    (("gan.lr_g: {loguniform: [1.0e-5, 1.0e-2]}", "gan.lr_g: {uniform: [0.01, 0.001]}"), "needs low < high"),
    (("overrides: {model.g_width: 8}", "overrides: {model.g_width: 8, train: {eval_every: 50}}"),
     "overrides.train.eval_every: the sweep sets it for every trial; use the sweep's eval_every"),
    (("gan.n_critic: 2", "train.log_every: {choice: [5, 10]}"), "space.train.log_every: .*report_every"),
    # optuna without a grid is fine where optuna is installed; where not, refused before any folder is written
    (("steps: 50", "steps: 50\nsearch: {algorithm: optuna}\n"),
     None if importlib.util.find_spec("optuna") else "search.algorithm optuna needs optuna: pip install optuna"),
    (("gan.n_critic: 2", "gan.n_critic: {grid: [1, 2]}\nsearch: {algorithm: optuna}"), "optuna cannot take a grid"),
    (("gan.n_critic: 2", "train.global_batch_size: {randint: [32, 128]}\nworkers_per_trial: 2"),
     "split evenly across workers"),
    (("gan.n_critic: 2", "train.global_batch_size: {choice: [32, 33]}\nworkers_per_trial: 2"),
     "33 does not split across workers_per_trial 2"),
])
def test_a_space_that_fails_only_at_run_time_is_refused_at_load(tmp_path, change, message):
    text = GOOD.replace(*change)
    assert text != GOOD
    if message is None:
        load_sweep(_write(tmp_path, text))
        return
    with pytest.raises(ConfigError, match=message):
        load_sweep(_write(tmp_path, text))


def test_a_resume_refuses_an_edited_sweep_other_data_and_remote_folders(mnist_dir, tmp_path):
    """`tune --resume` ran the saved sweep whatever YAML was given, on whatever --data: an edited
    range or another dataset was silently ignored. Both are refused by name, before Ray starts."""
    import json

    from latentforge.data import prepare_dataset
    from latentforge.data.sources import SourceOptions
    import shutil

    from latentforge.data import PreparedDataset
    from latentforge.tune.sweep import SWEEP_FILE, _check_resumed_sweep, run_sweep

    sw = load_sweep(_write(tmp_path, GOOD))
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / SWEEP_FILE).write_text(json.dumps({"sweep": sw.model_dump(mode="json"), "data": str(mnist_dir.resolve())}))
    edited = load_sweep(_write(tmp_path, GOOD.replace("steps: 50", "steps: 80").replace("[ns, hinge]", "[ns]")))
    with pytest.raises(ConfigError, match=r"differs from the one sweep started with \(space, steps\)"):
        run_sweep(edited, str(mnist_dir), out=str(folder), resume=True, log=lambda *_: None)
    other = tmp_path / "digits"
    prepare_dataset("digits", other, SourceOptions(count=60, size=28, channels=1), log=lambda *_: None)
    with pytest.raises(ConfigError, match="is not the dataset sweep sweep ran on"):
        run_sweep(sw, str(other), out=str(folder), resume=True, log=lambda *_: None)
    moved = tmp_path / "moved"  # the same dataset in another folder resumes
    shutil.copytree(mnist_dir, moved)
    saved = json.loads((folder / SWEEP_FILE).read_text())
    (folder / SWEEP_FILE).write_text(json.dumps({**saved, "data": str(tmp_path / "gone"),
                                                 "data_hash": PreparedDataset(mnist_dir).content_hash}))
    _check_resumed_sweep(sw, json.loads((folder / SWEEP_FILE).read_text()), moved, folder)
    reprepared = {**saved, "data": str(mnist_dir.resolve()), "data_hash": "0" * 64}  # same folder, other content
    with pytest.raises(ConfigError, match="content hash differs"):
        _check_resumed_sweep(sw, reprepared, mnist_dir, folder)
    with pytest.raises(ConfigError, match="holds a sweep this version cannot read"):
        _check_resumed_sweep(sw, {**saved, "sweep": {"name": "s"}}, mnist_dir, folder)
    with pytest.raises(ConfigError, match="--out s3://bucket/s: a sweep reads and writes local folders"):
        run_sweep(sw, str(mnist_dir), out="s3://bucket/s", log=lambda *_: None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        run_sweep(sw, str(mnist_dir), out=str(tmp_path / "file"), log=lambda *_: None)


def test_pbt_lineage_takes_the_best_checkpoints_own_hyperparameters(tmp_path):
    import json

    from latentforge.tune.sweep import _params_at

    ckpt = tmp_path / "checkpoint_000003"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"experiment": {"gan": {"lr_g": 2e-4, "loss": "ns"}}}))
    final = {"gan.lr_g": 4e-4, "gan.loss": "ns", "model.z_dim": 64}  # mutated after that checkpoint
    assert _params_at(str(ckpt), final) == {"gan.lr_g": 2e-4, "gan.loss": "ns", "model.z_dim": 64}
    assert _params_at(str(tmp_path / "gone"), final) == final


PBT_SWEEP = """
name: p
base: dcgan-mnist
space:
  gan.loss: {choice: [ns, hinge]}
  gan.lr_g: {choice: [1.0e-4, 2.0e-4]}
  gan.beta1: {uniform: [0.0, 0.9]}
  gan.n_critic: {randint: [1, 3]}
scheduler: {kind: pbt, resample_probability: 0.0}
steps: 50
eval_every: 10
"""


def test_pbt_steps_along_choices_and_keeps_perturbed_values_in_range(tmp_path):
    """PBT multiplies a Tune domain's value by 0.8 or 1.2: a text choice crashed the sweep's driver,
    a number choice left its list, and beta1 0.9 became 1.08. Choices now go as lists (PBT steps
    along them) and perturbed continuous values are clamped to their range."""
    import random

    from ray.tune.schedulers.pbt import _explore

    from latentforge.tune.sweep import _pbt_mutations, _scheduler

    sw = load_sweep(_write(tmp_path, PBT_SWEEP))
    mutations, bounds = _pbt_mutations(sw)
    assert mutations["gan.loss"] == ["ns", "hinge"] and mutations["gan.lr_g"] == [1e-4, 2e-4]
    assert bounds == {"gan.beta1": (0.0, 0.9, False), "gan.n_critic": (1, 3, True)}
    explore = _scheduler(sw)._custom_explore_fn
    random.seed(0)
    seen = set()
    for _ in range(50):
        config = {"gan.loss": "hinge", "gan.lr_g": 2e-4, "gan.beta1": 0.9, "gan.n_critic": 3}
        new, _ = _explore(config, mutations, 0.0, [1.2, 0.8], custom_explore_fn=explore)
        assert new["gan.loss"] in ("ns", "hinge") and new["gan.lr_g"] in (1e-4, 2e-4)
        assert 0.0 <= new["gan.beta1"] <= 0.9 and new["gan.n_critic"] in (1, 2, 3)
        experiment_for(sw, new)  # every explored point is a valid trial
        seen.add(round(new["gan.beta1"], 6))
    assert seen == {0.9, 0.72}  # x1.2 clamped back to 0.9, x0.8 inside


@pytest.mark.parametrize("change, message", [
    ("  model.g_width: {choice: [16, 32]}\n", "scheduler pbt cannot search model fields"),
    ("search: {algorithm: optuna}\n", "scheduler pbt cannot take search.algorithm optuna"),
])
def test_pbt_refuses_what_it_cannot_run(tmp_path, change, message):
    text = PBT_SWEEP.replace("scheduler:", change + "scheduler:") if change.startswith("  ") else PBT_SWEEP + change
    with pytest.raises(ConfigError, match=message):
        load_sweep(_write(tmp_path, text))


def test_a_relative_base_file_works_from_a_trials_own_folder(tmp_path, monkeypatch):
    """Tune runs each trial in its own working folder: a `base: mine.yaml` given relative to where
    the sweep started must still be found there (it failed every trial)."""
    import os

    from importlib import resources

    preset = resources.files("latentforge.presets").joinpath("dcgan-mnist.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(preset.replace("name: dcgan-mnist", "name: mine"))
    monkeypatch.chdir(tmp_path)
    sw = load_sweep(_write(tmp_path, GOOD.replace("base: dcgan-mnist", "base: mine.yaml")))
    assert os.path.isabs(sw.base)
    (tmp_path / "trial").mkdir()
    os.chdir(tmp_path / "trial")
    cfg = experiment_for(sw, {"gan.lr_g": 3e-4, "gan.loss": "hinge", "model.z_dim": 20, "gan.n_critic": 2})
    assert cfg.name == "mine"


@pytest.mark.parametrize("bad", ["{choice: 64}", "{}"])
def test_a_malformed_family_batch_space_is_named(tmp_path, bad):
    text = FAMILIES_SWEEP.replace("    gan.beta1: 0.0\n", f"    gan.beta1: 0.0\n    train.global_batch_size: {bad}\n")
    with pytest.raises(ConfigError, match="families.resnet.train.global_batch_size"):
        load_sweep(_write(tmp_path, text + "workers_per_trial: 2\n"))


def test_a_validation_metric_on_data_without_a_validation_split_is_refused(tmp_path):
    """Such a sweep ran every trial to the end and then had no metric to rank by."""
    from latentforge.data import prepare_dataset
    from latentforge.data.sources import SourceOptions
    from latentforge.tune.space import check_metric_for_data

    out = tmp_path / "digits"
    prepare_dataset("digits", out, SourceOptions(count=40, size=16, channels=1), val_fraction=0.0, log=lambda *_: None)
    sw = load_sweep(_write(tmp_path, GOOD.replace("base: dcgan-mnist", "base: vae-mnist").replace(
        "  gan.lr_g: {loguniform: [1.0e-5, 1.0e-2]}\n  gan.loss: {choice: [ns, hinge]}\n", "").replace(
        "  gan.n_critic: 2\n", "").replace("overrides: {model.g_width: 8}", "overrides: {}") + "metric: val_neg_elbo\n"))
    with pytest.raises(ConfigError, match="measured on the validation split .* has none"):
        check_metric_for_data(sw, out)
