import json
import pickle

import pytest
import torch

from helpers import tiny
from latentforge.checkpoint import load_checkpoint, load_training_state, resolve_checkpoint
from latentforge.errors import CheckpointError, DataError
from latentforge.sampling import generate
from latentforge.train.local import train_local

quiet = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def gan_run(mnist_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("gan_run")
    train_local(tiny("cdcgan-mnist", train__steps=4, train__checkpoint_every=4), mnist_dir, run, log=quiet)
    return run


@pytest.fixture(scope="module")
def vae_run(mnist_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("vae_run")
    train_local(tiny("vae-mnist", train__steps=4, train__checkpoint_every=4), mnist_dir, run, log=quiet)
    return run


def test_checkpoint_describes_itself(gan_run):
    ck = resolve_checkpoint(gan_run)
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["kind"] == "latentforge.checkpoint" and cfg["step"] == 4 and cfg["algorithm"] == "gan"
    assert cfg["data"]["content_hash"].startswith("sha256:")
    assert set(cfg["modules"]) == {"generator", "discriminator", "generator_ema"}
    assert cfg["modules"]["generator"]["class"] == "DCGANGenerator"
    assert cfg["experiment"]["name"] == "cdcgan-mnist"
    assert (ck / "model.safetensors").is_file() and (ck / "training_state.pt").is_file()


@pytest.mark.parametrize("run", ["gan_run", "vae_run"])
def test_load_gives_identical_outputs_to_the_trained_modules(run, request):
    path = request.getfixturevalue(run)
    a, b = load_checkpoint(path), load_checkpoint(path)
    x1, z1, _ = generate(a, 8, seed=3)
    x2, z2, _ = generate(b, 8, seed=3)
    assert torch.equal(z1, z2) and torch.equal(x1, x2)
    x3, _, _ = generate(a, 8, seed=4)
    assert not torch.equal(x1, x3)


def test_training_state_has_optimisers_rng_and_position(gan_run):
    state = load_training_state(resolve_checkpoint(gan_run))
    assert state["step"] == 4 and state["data"]["batches_consumed"] == 4
    assert set(state["optimizers"]) == {"generator", "discriminator"}
    assert state["rng"]["torch"].dtype == torch.uint8


def _copy(src, dst):
    import shutil

    shutil.copytree(resolve_checkpoint(src), dst)
    return dst


def test_hostile_class_name_is_refused(gan_run, tmp_path):
    ck = _copy(gan_run, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["modules"]["generator"]["class"] = "subprocess.Popen"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown model class 'subprocess.Popen'"):
        load_checkpoint(ck)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_in_training_state_is_refused(gan_run, tmp_path):
    ck = _copy(gan_run, tmp_path / "ck")
    with open(ck / "training_state.pt", "wb") as f:
        pickle.dump({"step": _Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_training_state(ck)


def test_corrupt_or_missing_files(gan_run, tmp_path):
    ck = _copy(gan_run, tmp_path / "ck")
    (ck / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_mismatched_weights_are_reported(gan_run, tmp_path):
    ck = _copy(gan_run, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["modules"]["generator"]["args"]["width"] = 16
    (ck / "config.json").write_text(json.dumps(cfg))
    # found from the weights file's header, before the module is allocated
    with pytest.raises(CheckpointError, match="describes module 'generator' with .* of shape .* but model.safetensors "
                                              "holds .*: the config does not belong to these weights"):
        load_checkpoint(ck)


@pytest.mark.parametrize("module,field,value,message", [
    ("generator", "width", 10**9, "width: Input should be less than or equal to 512"),
    ("generator", "z_dim", -3, "z_dim: Input should be greater than or equal to 1"),
    ("generator", "resolution", 4096, "resolution: Input should be less than or equal to 1024"),
    ("discriminator", "resolution", 48, "resolution 48 is not one of the 'dcgan' family's 8, 16, 28, 32, 64"),
    ("generator", "num_classes", 10**12, "num_classes: Input should be less than or equal to 100000"),
])
def test_planted_arguments_are_refused_before_anything_is_built(gan_run, tmp_path, module, field, value, message):
    """A config.json with absurd sizes fails fast with the field and its bound, not by exhausting memory."""
    ck = _copy(gan_run, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["modules"][module]["args"][field] = value
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ck)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(algorithm="xyz"), "algorithm is 'xyz', not one of"),
    (lambda c: c.update(algorithm="vae"), "a VAE checkpoint needs the modules vae"),
    (lambda c: c.update(step="abc"), "step is 'abc', not a count of steps"),
    (lambda c: c.pop("step"), "step is None"),
    (lambda c: c.update(format_version="x"), "format_version is 'x', not a number"),
    (lambda c: c.update(experiment=None), "it has no experiment config"),
    (lambda c: c.update(modules=["generator"]), "modules is not a mapping"),
    (lambda c: c["modules"].pop("generator_ema"), "a GAN checkpoint needs the modules generator_ema"),
    (lambda c: c.pop("data"), "its data spec is unreadable"),
    (lambda c: c["data"].update(image_shape=[3, 28, 28]), r"its data spec \(3x28x28 images, 10 classes\) does not fit its "
                                                           r"model \(1 channels at 28 px, 10 classes\)"),
    (lambda c: c["data"].update(num_classes=0), r"its data spec \(1x28x28 images, 0 classes\) does not fit"),
])
def test_a_damaged_config_is_refused_naming_the_field(gan_run, tmp_path, edit, message):
    """A hand-edited or planted config.json fails at load with what is wrong, never inside sampling."""
    ck = _copy(gan_run, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    edit(cfg)
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"config.json is damaged: {message}"):
        load_checkpoint(ck)


def test_a_dataset_folder_given_as_a_checkpoint_says_so(mnist_dir, mnist_features, tmp_path):
    """A prepared dataset holds config.json files of its own (feature network, grader): they are
    neither found as checkpoints nor loaded as one."""
    with pytest.raises(CheckpointError, match="is a prepared dataset, not a checkpoint; .* goes to --data"):
        load_checkpoint(mnist_dir)
    # a folder holding only a feature network (its own config.json) has no checkpoint
    import shutil

    from latentforge.checkpoint import find_checkpoints

    shutil.copytree(mnist_dir / "features", tmp_path / "features")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path)
    assert find_checkpoints(tmp_path) == []


def test_planted_family_options_are_refused(tmp_path):
    from latentforge.models.architectures import build_module

    spec = {"class": "ResNetGenerator", "args": {"z_dim": 8, "channels": 1, "resolution": 28, "width": 4,
                                                  "blocks_per_stage": 10**9}}
    with pytest.raises(ValueError, match="blocks_per_stage: Input should be less than or equal to 8"):
        build_module(spec)


def test_latents_of_a_seed_do_not_depend_on_how_many_are_asked_for():
    from latentforge.sampling import sample_latents

    four, one = sample_latents(4, 64, seed=3), sample_latents(1, 64, seed=3)
    assert torch.equal(four[:1], one) and not torch.equal(four[0], four[1])
    t = sample_latents(8, 64, seed=3, truncation=0.5)
    assert t.abs().max() <= 0.5 and torch.equal(t[:2], sample_latents(2, 64, seed=3, truncation=0.5))


def test_a_dataset_must_fit_the_model_not_match_its_labels(gan_run, vae_run):
    """An unconditional model takes any dataset of its image shape (labelled or not); a
    conditional one needs the same classes; other data is allowed, with a note."""
    from types import SimpleNamespace

    def dataset(shape=(1, 28, 28), classes=10, digest="other"):
        return SimpleNamespace(path="DS", image_shape=shape, num_classes=classes, content_hash=digest)

    notes = []
    unconditional, conditional = load_checkpoint(vae_run), load_checkpoint(gan_run)
    unconditional.check_dataset(dataset(classes=0), log=notes.append)
    assert notes and "was trained on other data" in notes[0]
    conditional.check_dataset(dataset(digest=conditional.data.content_hash), log=notes.append)
    assert len(notes) == 1  # its own data: no note
    with pytest.raises(DataError, match=r"DS holds 0-class images of shape \(1, 28, 28\), but .* was trained on "
                                        r"10-class images"):
        conditional.check_dataset(dataset(classes=0))
    with pytest.raises(DataError, match=r"shape \(3, 28, 28\)"):
        unconditional.check_dataset(dataset(shape=(3, 28, 28)))


@pytest.mark.parametrize("run,kept", [("gan_run", ["generator_ema"]), ("vae_run", ["latent_prior", "vae"])])
def test_a_registry_copy_keeps_only_what_inference_reads_and_samples_the_same_bytes(run, kept, request, tmp_path):
    """Promotion stores the EMA generator (or the VAE and its prior), not D and the raw G: the copy is
    smaller, generates exactly what its source does, and says why it cannot resume or skip the EMA."""
    from latentforge.checkpoint import WEIGHTS
    from latentforge.errors import LatentForgeError
    from latentforge.metrics.evaluate import evaluate
    from latentforge.registry import promote

    source = resolve_checkpoint(request.getfixturevalue(run))
    promote(source, str(tmp_path / "reg"), "m")
    copy = load_checkpoint(tmp_path / "reg" / "m" / "checkpoint")
    full = load_checkpoint(source)
    assert copy.inference_only and not full.inference_only and sorted(copy.modules) == kept
    if run == "gan_run":
        assert (copy.path / WEIGHTS).stat().st_size < 0.6 * (source / WEIGHTS).stat().st_size
    label = 3 if run == "gan_run" else None
    a, _, _ = generate(copy, 8, seed=5, label=label)
    b, _, _ = generate(full, 8, seed=5, label=label)
    assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="inference-only export and cannot resume"):
        load_training_state(copy.path)
    if run == "gan_run":
        with pytest.raises(LatentForgeError, match="inference copy that keeps only the EMA generator"):
            evaluate(copy.path, request.getfixturevalue("mnist_dir"), samples=100, ema=False, log=quiet)
    # the marker cannot be used to load a full checkpoint's config without its inference module
    cfg = json.loads((copy.path / "config.json").read_text())
    cfg["modules"].pop(kept[-1])
    (copy.path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="needs the modules"):
        load_checkpoint(copy.path)


def _fake_sweep(gan_run, root):
    """A sweep folder laid out as `latentforge tune` writes it: sweep.json, tune/<trial>/checkpoint_*."""
    root.mkdir()
    (root / "sweep.json").write_text(json.dumps({"sweep": {}, "data": "d"}))
    trials = {}
    for trial, step in (("trial_a", 4), ("trial_b", 8)):  # trial_b has the later step, trial_a the better FID
        ck = _copy(gan_run, root / "tune" / trial / f"checkpoint_{step:06d}")
        cfg = json.loads((ck / "config.json").read_text())
        (ck / "config.json").write_text(json.dumps({**cfg, "step": step}))
        trials[trial] = ck
    return trials


def test_a_sweep_folder_stands_for_its_best_trial(gan_run, tmp_path, monkeypatch):
    """`generate`/`evaluate`/`promote` on a sweep folder (or its tune/ folder) load the trial the sweep
    ranked best, never whichever trial happened to save the latest step."""
    from latentforge.checkpoint import holds_checkpoint

    sweep = tmp_path / "sweep"
    trials = _fake_sweep(gan_run, sweep)
    assert holds_checkpoint(sweep) and holds_checkpoint(sweep / "tune")
    for target in (sweep, sweep / "tune"):
        with pytest.raises(CheckpointError, match="has no best checkpoint yet .* resume the sweep"):
            resolve_checkpoint(target)
    (sweep / "summary.json").write_text(json.dumps({"best": {"trial_id": "a", "checkpoint": str(trials["trial_a"])}}))
    for target in (sweep, sweep / "tune"):
        assert resolve_checkpoint(target) == trials["trial_a"]
        assert load_checkpoint(target).step == 4
    # one trial's folder is an ordinary run folder
    assert resolve_checkpoint(sweep / "tune" / "trial_b") == trials["trial_b"]
    import shutil

    # a sweep folder moved (or copied) elsewhere still finds its best trial under its own tune/
    moved = shutil.move(sweep, tmp_path / "moved")
    assert resolve_checkpoint(moved) == moved / "tune" / "trial_a" / trials["trial_a"].name
    sweep = shutil.move(moved, sweep)
    monkeypatch.chdir(sweep / "tune")
    assert resolve_checkpoint(".").resolve() == trials["trial_a"]
    (sweep / "summary.json").write_text(json.dumps({"best": {"checkpoint": "s3://bucket/sweep/tune/trial_a/c"}}))
    with pytest.raises(CheckpointError, match="best checkpoint is on remote storage .*s3://bucket/.*download it"):
        resolve_checkpoint(sweep)
    (sweep / "summary.json").write_text(json.dumps({"best": {"checkpoint": str(trials["trial_a"])}}))
    shutil.rmtree(trials["trial_a"])
    with pytest.raises(CheckpointError, match="best checkpoint .*trial_a.* is gone"):
        resolve_checkpoint(sweep)
    (sweep / "summary.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="summary.json is unreadable"):
        resolve_checkpoint(sweep)


def test_a_folder_of_several_runs_is_not_read_as_one(gan_run, tmp_path):
    """Checkpoints of different runs two levels down (a Tune experiment copied without its sweep.json)
    are ambiguous: the error names the runs instead of picking the one with the latest step."""
    trials = _fake_sweep(gan_run, tmp_path / "sweep")
    (tmp_path / "sweep" / "sweep.json").unlink()
    with pytest.raises(CheckpointError, match=r"holds the checkpoints of 2 runs \(trial_a, trial_b\): give one"):
        load_checkpoint(tmp_path / "sweep" / "tune")
    assert resolve_checkpoint(trials["trial_b"].parent) == trials["trial_b"]
    # a run folder's own checkpoints win over a later step of a run nested inside it
    own = _copy(gan_run, tmp_path / "sweep" / "tune" / "checkpoint_000002")
    assert resolve_checkpoint(tmp_path / "sweep" / "tune") == own


def test_promoting_a_sweep_folder_records_the_sweeps_lineage(gan_run, tmp_path):
    """`registry promote SWEEP_DIR` promotes the best trial with what the sweep's own promotion
    records: the sweep, the trial, its hyperparameters and metric."""
    from latentforge.registry import promote

    trials = _fake_sweep(gan_run, tmp_path / "sweep")
    best = {"trial_id": "a1", "metric": 12.5, "checkpoint": str(trials["trial_a"]), "config": {"gan.lr_g": 2e-4},
            "metrics": {"fid": 12.5, "recall": 0.4}}
    (tmp_path / "sweep" / "summary.json").write_text(json.dumps({"sweep": "s", "metric": "fid", "best": best}))
    entry = promote(tmp_path / "sweep", str(tmp_path / "registry"), "best")
    assert entry["step"] == 4 and entry["lineage"]["source_checkpoint"] == str(trials["trial_a"])
    assert {k: entry["lineage"][k] for k in ("sweep", "trial_id", "hyperparameters")} == {
        "sweep": "s", "trial_id": "a1", "hyperparameters": {"gan.lr_g": 2e-4}}
    assert entry["metrics"] == {"fid": 12.5, "recall": 0.4}


def test_promote_stores_nan_metrics_as_null_so_model_json_stays_json(gan_run, tmp_path):
    """A sweep's recall can be NaN; json.dumps would write the bare token NaN, which browsers and
    Starlette's responses refuse: /v1/models then failed for every client."""
    from latentforge.registry import promote, show

    promote(gan_run, str(tmp_path), "m", metrics={"fid": 12.5, "recall": float("nan")},
            lineage={"hyperparameters": {"lr": float("inf")}})
    def strict(token):
        raise AssertionError(f"{token} in model.json")

    raw = json.loads((tmp_path / "m" / "model.json").read_text(), parse_constant=strict)
    assert raw["metrics"] == {"fid": 12.5, "recall": None} and raw["lineage"]["hyperparameters"] == {"lr": None}
    assert show(str(tmp_path), "m")["metrics"]["recall"] is None


def test_promote_without_a_name_uses_the_experiments(gan_run, tmp_path):
    """The CLI contract's `registry promote CHECKPOINT --registry DIR [--name NAME]`."""
    from latentforge.checkpoint import load_checkpoint
    from latentforge.registry import RegistryError, default_name, promote

    entry = promote(gan_run, str(tmp_path), None)
    assert entry["name"] == default_name(load_checkpoint(gan_run).experiment["name"]) == entry["experiment"]
    with pytest.raises(RegistryError, match="already exists .* choose another --name or pass --overwrite"):
        promote(gan_run, str(tmp_path), None)
    assert default_name("My GAN v2 (final)") == "my-gan-v2-final" and default_name("..") == "model"


def test_an_unknown_name_costs_a_server_one_read_not_a_scan(gan_run, tmp_path, monkeypatch):
    import latentforge.registry as registry
    from latentforge.registry import UnknownModel, promote, show

    for name in ("a", "b", "c"):
        promote(gan_run, str(tmp_path), name)
    reads = []
    real = registry.read_bytes_uri
    monkeypatch.setattr(registry, "read_bytes_uri", lambda uri: reads.append(uri) or real(uri))
    with pytest.raises(UnknownModel) as e:
        show(str(tmp_path), "nope", list_known=False)
    assert len(reads) == 1 and "models:" not in str(e.value)
    with pytest.raises(UnknownModel, match=r"models: a, b, c"):  # the CLI's message still lists them
        show(str(tmp_path), "nope")
