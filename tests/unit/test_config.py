import pytest

from latentforge.config import (
    GANExperiment,
    VAEExperiment,
    experiment_to_dict,
    load_experiment,
    parse_experiment,
    parse_override,
    preset_names,
)
from latentforge.errors import ConfigError

REQUIRED_PRESETS = {"dcgan-mnist", "wgangp-mnist", "sngan-hinge-mnist", "cdcgan-mnist", "vae-mnist", "cvae-mnist",
                    "betavae-shapes"}


def test_required_presets_ship():
    assert REQUIRED_PRESETS <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_round_trips(name):
    cfg = load_experiment(name)
    assert cfg.name == name
    assert isinstance(cfg, GANExperiment if cfg.algorithm == "gan" else VAEExperiment)
    assert parse_experiment(experiment_to_dict(cfg)) == cfg


def test_unknown_key_is_rejected_with_its_field():
    """The field's own path, without the algorithm tag pydantic puts first."""
    with pytest.raises(ConfigError, match=r"\n  gan\.lr_gg: unknown key"):
        load_experiment("dcgan-mnist", {"gan.lr_gg": 1e-3})
    with pytest.raises(ConfigError, match=r"\n  vae\.lrr: unknown key"):
        load_experiment("vae-mnist", {"vae.lrr": 1e-3})
    with pytest.raises(ConfigError, match=r"\n  nosuch: unknown key"):
        load_experiment("dcgan-mnist", {"nosuch.key": 1})
    with pytest.raises(ConfigError, match=r"\n  train\.steps: Input should be a valid integer"):
        load_experiment("dcgan-mnist", {"train.steps": "x"})


def test_an_override_that_replaces_a_section_says_which():
    with pytest.raises(ConfigError, match="'train' holds the value 5, not a section of fields; set its fields"):
        load_experiment("dcgan-mnist", {"train": 5, "train.steps": 3})


def test_a_yaml_that_is_not_a_config_mapping_is_refused_by_name(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections at the top level .* got a list"):
        load_experiment(str(tmp_path / "list.yaml"))
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00name: x")
    with pytest.raises(ConfigError, match="cannot read config file .* that it is UTF-8 YAML"):
        load_experiment(str(tmp_path / "bin.yaml"))
    (tmp_path / "min.yaml").write_text("algorithm: gan\n")
    with pytest.raises(ConfigError, match=r"\n  name: required; add it"):
        load_experiment(str(tmp_path / "min.yaml"))


def test_bad_values_are_all_reported_together():
    with pytest.raises(ConfigError) as e:
        load_experiment("dcgan-mnist", {"gan.loss": "hinge2", "train.steps": -1, "model.d_norm": "batch"})
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "gan.loss" in msg and "'hinge2'" in msg and "'ns'" in msg
    assert "train.steps" in msg
    assert "model.d_norm" in msg


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ConfigError, match="dcgan-mnist"):
        load_experiment("no-such-preset")


def test_wrong_algorithm_is_named():
    with pytest.raises(ConfigError, match="algorithm"):
        parse_experiment({"name": "x", "algorithm": "diffusion"})


def test_yaml_file_and_overrides(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("name: mine\nalgorithm: vae\nvae:\n  beta: 2.0\n")
    cfg = load_experiment(str(f), {"train.steps": 7})
    assert cfg.vae.beta == 2.0 and cfg.train.steps == 7


def test_parse_override_types():
    assert parse_override("gan.lr_g=1e-3") == ("gan.lr_g", 0.001)
    assert parse_override("model.conditional=true") == ("model.conditional", True)
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("gan.lr_g")


def test_yaml_model_files_that_cannot_be_read_fail_clearly(tmp_path):
    from latentforge.config import load_yaml_model
    from latentforge.serve.config import ServeConfig

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="cannot read serve config .*UTF-8"):
        load_yaml_model(binary, ServeConfig, "serve config")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of fields at the top level, got list"):
        load_yaml_model(listing, ServeConfig, "serve config")


def test_serve_defaults_that_every_image_request_would_exceed_are_refused():
    """Without `steps`, an image request projects with the deployment's defaults: defaults above
    the request limits would answer every such request 422 "ask for fewer steps"."""
    from pydantic import ValidationError

    from latentforge.serve.config import ServeConfig

    with pytest.raises(ValidationError, match=r"projection_steps \(600\) is above limits.max_projection_steps \(500\)"):
        ServeConfig(projection_steps=600)
    with pytest.raises(ValidationError, match=r"\(200 x 6\) is above limits.max_projection_work \(1000\)"):
        ServeConfig(projection_restarts=6)
    ServeConfig(projection_restarts=6, limits={"max_projection_work": 1200})


def test_serve_config_takes_a_ray_serve_deployment_files_application_args(tmp_path):
    """`serve --config cluster/serve-config.yaml` (what the help pointed to) was refused for
    proxy_location/http_options/applications: the LatentForge application's args are taken."""
    from pathlib import Path

    import yaml

    from latentforge.cli import _serve_config

    shipped = Path(__file__).resolve().parents[2] / "cluster" / "serve-config.yaml"
    args = yaml.safe_load(shipped.read_text())["applications"][0]["args"]
    cfg = _serve_config(str(shipped))
    assert cfg.limits.max_n == args["limits"]["max_n"] and cfg.generator.max_replicas == args["generator"]["max_replicas"]
    bad = tmp_path / "deploy.yaml"
    bad.write_text(shipped.read_text().replace("max_n: 64", "max_n: -1"))
    with pytest.raises(ConfigError, match=r"(?s)deploy.yaml \(applications\[latentforge\].args\).*limits.max_n"):
        _serve_config(str(bad))
    other = tmp_path / "other.yaml"
    other.write_text("applications:\n  - name: x\n    import_path: other.app:build\n")
    with pytest.raises(ConfigError, match="with 0 LatentForge applications"):
        _serve_config(str(other))


def test_an_api_key_that_no_http_header_could_carry_is_refused():
    """Headers arrive as latin-1 and the key was compared as UTF-8: a key with 'ü' never matched,
    so every request got a 401 with nothing to say why."""
    from latentforge.serve.config import ServeConfig

    with pytest.raises(ValueError, match="printable ASCII"):
        ServeConfig(api_key="schlüssel-" + "x" * 16).resolve_api_key()  # where the app is built
    assert ServeConfig(api_key="k" * 20).resolve_api_key() == "k" * 20


def test_a_bench_mode_is_never_measured_under_a_contradicting_override():
    """`bench train --modes fp32 --set train.channels_last=true` would label NHWC numbers 'fp32'
    (NCHW); it is refused up front and names the modes to use instead. Agreeing and unrelated
    overrides pass through."""
    from latentforge.bench.train_bench import with_mode

    with pytest.raises(ConfigError, match=r"train.channels_last=True contradicts the bench mode 'fp32' .*"
                                          r"--modes fp32,fp32\+channels_last"):
        with_mode("fp32", {"train.channels_last": True})
    with pytest.raises(ConfigError, match="train.precision=auto contradicts the bench mode 'bf16"):
        with_mode("bf16+channels_last", {"train.precision": "auto"})
    merged = with_mode("fp32+channels_last", {"train.channels_last": True, "train.global_batch_size": 256})
    assert merged == {"train.channels_last": True, "train.global_batch_size": 256, "train.precision": "fp32"}
    assert load_experiment("dcgan-mnist", with_mode("fp32", None)).train.channels_last is False


def test_every_seed_takes_0_to_2_63_minus_1_and_refuses_the_rest(capsys):
    """Configs, sweep files and every CLI seed flag take the API's range, so a seed one accepts, all accept."""
    import argparse

    from latentforge.cli import build_parser, seed_arg, seed_list_arg
    from latentforge.config import MAX_SEED
    from latentforge.tune.space import SearchConfig

    assert load_experiment("dcgan-mnist", {"train.seed": MAX_SEED}).train.seed == MAX_SEED
    for bad in (-1, MAX_SEED + 1):
        with pytest.raises(ConfigError, match="train.seed"):
            load_experiment("dcgan-mnist", {"train.seed": bad})
        with pytest.raises(ValueError):
            SearchConfig(seed=bad)

    def seed_flags(parser, verb=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from seed_flags(sub, verb + (name,))
            elif "seed" in action.dest:
                yield verb, action

    flags = list(seed_flags(build_parser()))
    assert len(flags) >= 9  # train, generate, evaluate, data prepare (2), data features, bench tune/quality, ...
    for verb, action in flags:
        assert action.type in (seed_arg, seed_list_arg), f"{' '.join(verb)} {action.option_strings[0]} takes any int"
    assert seed_list_arg("0, 3,7") == (0, 3, 7) and seed_list_arg("") == (0,)
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "dcgan-mnist", "--seed", "-1"])
    assert e.value.code == 2 and "argument --seed: -1 is out of range" in capsys.readouterr().err


def test_a_mapping_set_on_a_section_merges_into_the_preset():
    """A sweep's `overrides: {gan: {lr_d: 1e-4}}` (or `--set 'gan={lr_d: 1e-4}'`) on a hinge preset
    changes lr_d only; assigning the mapping reset the loss and betas to the defaults, silently."""
    from latentforge.config import apply_overrides, load_experiment, load_experiment_dict

    preset = load_experiment("sngan-hinge-mnist")
    merged = load_experiment("sngan-hinge-mnist", {"gan": {"lr_d": 1.0e-4}})
    assert merged.gan.lr_d == 1.0e-4
    assert (merged.gan.loss, merged.gan.beta1, merged.gan.beta2) == (preset.gan.loss, preset.gan.beta1, preset.gan.beta2)
    assert preset.gan.loss == "hinge"  # the case that went wrong: a non-default preset section
    raw, _ = load_experiment_dict("sngan-hinge-mnist")
    out = apply_overrides(raw, {"gan": {"lr_d": 1.0e-4}})
    assert raw["gan"].get("lr_d") != 1.0e-4  # the input is not changed
    assert out["gan"]["lr_d"] == 1.0e-4 and out["gan"]["loss"] == raw["gan"]["loss"]


def test_a_mapping_set_on_a_field_replaces_it():
    """Only sections merge: `--set model.d_options={}` clears a preset's discriminator options (so
    another architecture can be chosen), as `{model: {d_options: {}}}` does."""
    from latentforge.config import apply_overrides, load_experiment_dict

    raw, _ = load_experiment_dict("resnet-mnist")
    raw["model"]["d_options"] = {"extra_blocks": 1}
    assert apply_overrides(raw, {"model.d_options": {}})["model"]["d_options"] == {}
    assert apply_overrides(raw, {"model": {"d_options": {}}})["model"]["d_options"] == {}
    assert apply_overrides(raw, {"model": {"d_options": {}}})["model"]["arch"] == raw["model"]["arch"]
