"""Plug-in architectures: a user's module trains, saves and loads back when allowed; a checkpoint
alone never gets a module imported."""

import json
import sys

import pytest
import torch

from helpers import PLUGIN_SOURCE
from latentforge.builders import build_gan
from latentforge.checkpoint import load_checkpoint, save_checkpoint
from latentforge.config import load_experiment
from latentforge.data.spec import DataSpec
from latentforge.errors import CheckpointError, ConfigError
from latentforge.models import plugins



@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A module `lf_test_plugin` importable from a folder outside the package, and a clean allow-list."""
    (tmp_path / "lf_test_plugin.py").write_text(PLUGIN_SOURCE)
    (tmp_path / "lf_planted.py").write_text(f"open({str(tmp_path / 'IMPORTED')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_allowed", set())
    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    yield tmp_path
    for mod in ("lf_test_plugin", "lf_planted"):
        sys.modules.pop(mod, None)


SPEC = DataSpec((1, 8, 8), 0, ())


def _checkpoint(path, arch="lf_test_plugin:TinyGenerator"):
    """Train-side: the user's config names the plug-in (which allows it), builds and saves; then the
    allowance is dropped, as in a fresh process that only has the checkpoint."""
    cfg = load_experiment("dcgan-mnist", {"model.arch": arch, "model.z_dim": 4, "model.g_width": 8, "model.d_width": 8,
                                          "model.g_options": {"scale": 0.5}})
    assert plugins.is_allowed("lf_test_plugin")  # naming it in one's own config allows it
    torch.manual_seed(0)
    g, d = build_gan(cfg.model, SPEC)
    save_checkpoint(path, algorithm="gan", experiment=cfg.model_dump(mode="json"), data=SPEC,
                    modules={"generator": g, "discriminator": d, "generator_ema": g.__class__(**g.init_args)}, step=1)
    plugins._allowed.clear()
    return g


def test_a_plugin_named_in_the_config_builds_and_records_where_it_came_from(plugin_dir):
    g = _checkpoint(plugin_dir / "ck")
    assert type(g).__name__ == "TinyGenerator" and g.scale == 0.5  # g_options reach the plug-in's constructor
    recorded = json.loads((plugin_dir / "ck" / "config.json").read_text())["modules"]["generator"]
    assert recorded["class"] == "lf_test_plugin:TinyGenerator"
    assert recorded["plugin"]["module"] == "lf_test_plugin"


def test_loading_a_plugin_checkpoint_needs_the_module_allowed(plugin_dir, monkeypatch):
    _checkpoint(plugin_dir / "ck")
    sys.modules.pop("lf_test_plugin", None)
    with pytest.raises(CheckpointError, match="plug-in module 'lf_test_plugin'.*--allow-plugin lf_test_plugin"):
        load_checkpoint(plugin_dir / "ck")
    assert "lf_test_plugin" not in sys.modules  # refused before importing anything
    monkeypatch.setenv(plugins.ENV_VAR, "lf_test_plugin")
    ck = load_checkpoint(plugin_dir / "ck")
    z = torch.randn(3, 4)
    assert ck.inference_generator().decode(z).shape == (3, 1, 8, 8)


def test_a_planted_checkpoint_naming_an_unlisted_module_is_refused_without_importing_it(plugin_dir):
    _checkpoint(plugin_dir / "ck")
    config = json.loads((plugin_dir / "ck" / "config.json").read_text())

    def plant(cls: str) -> None:
        for spec in config["modules"].values():
            spec["class"] = cls
        (plugin_dir / "ck" / "config.json").write_text(json.dumps(config))

    for planted in ("os:system", "lf_planted:Anything", "subprocess:Popen"):
        plant(planted)
        with pytest.raises(CheckpointError, match=f"plug-in module '{planted.split(':')[0]}', which is not allowed"):
            load_checkpoint(plugin_dir / "ck")
    assert not (plugin_dir / "IMPORTED").exists()  # lf_planted's import side effect never ran
    plant("os.system")  # not a plug-in reference at all
    with pytest.raises(CheckpointError, match="unknown model class 'os.system'"):
        load_checkpoint(plugin_dir / "ck")


def test_a_config_read_back_from_storage_does_not_allow_its_plugin(plugin_dir):
    """A run's run.json (what --resume reads) is parsed, not loaded as the user's config: building
    from it needs the module allowed, and nothing is imported before that."""
    from latentforge.config import parse_experiment

    cfg = parse_experiment({"name": "x", "algorithm": "gan", "model": {"arch": "lf_planted:Gen"}})
    with pytest.raises(CheckpointError, match="'lf_planted', which is not allowed"):
        build_gan(cfg.model, SPEC)
    assert not (plugin_dir / "IMPORTED").exists()


def test_plugin_constructor_errors_are_config_errors(plugin_dir):
    cfg = load_experiment("dcgan-mnist", {"model.arch": "lf_test_plugin:TinyGenerator", "model.g_options": {"nope": 1}})
    with pytest.raises(ConfigError, match="cannot build the generator of model.arch 'lf_test_plugin:TinyGenerator'.*nope"):
        build_gan(cfg.model, SPEC)


def test_an_allowed_module_that_is_not_a_model_is_refused(plugin_dir):
    plugins.allow_plugins(["os"])
    with pytest.raises(plugins.PluginError, match="os:system is not a torch.nn.Module class"):
        plugins.load_plugin_class("os:system")


def test_a_missing_plugin_says_what_to_install(plugin_dir, monkeypatch):
    _checkpoint(plugin_dir / "ck")
    config = json.loads((plugin_dir / "ck" / "config.json").read_text())
    for spec in config["modules"].values():
        spec.update({"class": "lf_gone_pkg.models:Gen",
                     "plugin": {"module": "lf_gone_pkg.models", "distribution": "lf-gone-pkg", "version": "1.2.3"}})
    (plugin_dir / "ck" / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv(plugins.ENV_VAR, "lf_gone_pkg")
    with pytest.raises(CheckpointError, match=r"cannot import plug-in module 'lf_gone_pkg.models'.*pip install lf-gone-pkg==1.2.3"):
        load_checkpoint(plugin_dir / "ck")


def test_a_plugin_generator_without_a_discriminator_is_a_config_error(plugin_dir):
    (plugin_dir / "lf_half.py").write_text("from lf_test_plugin import TinyDiscriminator as Gen\n")
    cfg = load_experiment("dcgan-mnist", {"model.arch": "lf_half:Gen"})
    with pytest.raises(ConfigError, match="discriminator_class"):
        build_gan(cfg.model, SPEC)
    sys.modules.pop("lf_half", None)


def test_directions_skip_what_a_plugin_cannot_give(plugin_dir, monkeypatch):
    from latentforge.editing.directions import compute_directions, first_layer_editable

    _checkpoint(plugin_dir / "ck", arch="lf_test_plugin:OpaqueGenerator")
    monkeypatch.setenv(plugins.ENV_VAR, "lf_test_plugin")
    ck = load_checkpoint(plugin_dir / "ck")
    assert not first_layer_editable(ck.inference_generator())
    assert compute_directions(ck) == []  # no SeFa/PCA (no first layer), no classifier: nothing, and no crash
