import pytest

from latentforge.errors import ConfigError
from latentforge.tune.space import experiment_for, load_sweep

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
