"""Every registered model family: shapes at each supported resolution, gradients to every
parameter, checkpoint round trips, determinism, the written interface, and config errors."""

import copy

import pytest
import torch

from latentforge.checkpoint import load_checkpoint, save_checkpoint
from latentforge.config import load_experiment
from latentforge.errors import ConfigError
from latentforge.data.spec import DataSpec
from latentforge.models import FAMILIES
from latentforge.models.interface import VAE, Discriminator, FirstLayerEditable, Generator
from latentforge.models.resnet import SelfAttention

GAN_FAMILIES = [n for n, f in FAMILIES.items() if f.algorithm == "gan"]
VAE_FAMILIES = [n for n, f in FAMILIES.items() if f.algorithm == "vae"]


NORMS = {"stylegan2": ("none", "none")}  # demodulation and R1 replace BatchNorm and spectral norm


def _gan(family: str, res: int, ch: int = 3, k: int = 0, width: int = 4, **opts):
    fam = FAMILIES[family]
    g_norm, d_norm = NORMS.get(family, ("batch", "spectral"))
    g_opts = {key: v for key, v in opts.items() if key in getattr(fam.options.get("generator"), "model_fields", {})}
    d_opts = {key: v for key, v in opts.items() if key in getattr(fam.options.get("discriminator"), "model_fields", {})}
    g = fam.classes["generator"](z_dim=8, channels=ch, resolution=res, width=width, norm=g_norm, num_classes=k,
                                 embed_dim=4, **g_opts)
    d = fam.classes["discriminator"](channels=ch, resolution=res, width=width, norm=d_norm, num_classes=k, **d_opts)
    return g, d


def _vae(family: str, res: int, ch: int = 3, k: int = 0, **opts):
    return FAMILIES[family].classes["vae"](z_dim=6, channels=ch, resolution=res, width=4, num_classes=k, embed_dim=4,
                                           likelihood="gaussian", **opts)


@pytest.mark.parametrize("family", GAN_FAMILIES)
def test_gan_family_shapes_at_every_supported_resolution(family):
    for res in FAMILIES[family].resolutions:
        torch.manual_seed(0)
        g, d = _gan(family, res, ch=3, k=3)
        y = torch.tensor([0, 2])
        x = g.decode(torch.randn(2, 8), y)  # StyleGAN-style G may leave [-1, 1] in training; decode clamps
        assert x.shape == (2, 3, res, res), (family, res)
        assert x.min() >= -1 and x.max() <= 1
        assert d(x, y).shape == (2,)
        assert isinstance(g, Generator) and isinstance(d, Discriminator)


@pytest.mark.parametrize("family", VAE_FAMILIES)
def test_vae_family_shapes_at_every_supported_resolution(family):
    for res in FAMILIES[family].resolutions:
        torch.manual_seed(0)
        vae = _vae(family, res, ch=1)
        raw, mu, logvar = vae(torch.rand(2, 1, res, res) * 2 - 1)
        assert raw.shape == (2, 1, res, res) and mu.shape == logvar.shape == (2, 6), (family, res)
        assert vae.decode(mu).shape == (2, 1, res, res)
        assert isinstance(vae, VAE)


@pytest.mark.parametrize("opts", [{}, {"attention_res": 8, "blocks_per_stage": 2, "spectral_norm": True, "extra_blocks": 2},
                                  {"attention_res": 4}])  # 4: at the base side, before the first block
def test_resnet_gradients_reach_every_parameter(opts):
    torch.manual_seed(0)
    g, d = _gan("resnet", 32, ch=3, k=3, **opts)
    for m in list(g.modules()) + list(d.modules()):
        if isinstance(m, SelfAttention):
            m.gate.data.fill_(0.5)  # the gate starts at 0, which would hide the attention weights' gradients
    y = torch.tensor([0, 1, 2, 1])
    d(g(torch.randn(4, 8), y), y).sum().backward()
    for name, p in list(g.named_parameters()) + list(d.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_resnet_vae_learned_sigma_is_trained_by_the_loss():
    from latentforge.algorithms.vae import decoder_sigma, reconstruction_nll

    torch.manual_seed(0)
    vae = _vae("resnet_vae", 32, ch=3, learn_sigma=True)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    raw, mu, logvar = vae(x)
    sigma = decoder_sigma(vae, fixed=0.1)
    assert sigma.shape == (1, 3, 1, 1)  # one learned std per channel, not the fixed 0.1
    reconstruction_nll(raw, x, "gaussian", sigma).mean().backward()
    for name, p in vae.named_parameters():
        if not name.startswith(("to_posterior", "encoder")):  # mu only reaches the decoder through z
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert vae.decoder_log_sigma.grad.abs().sum() > 0


def _spec(ch, res, k):
    return DataSpec((ch, res, res), k, tuple(str(i) for i in range(k)))


@pytest.mark.parametrize("preset,overrides", [
    ("resnet-mnist", {"model.conditional": True, "model.g_options": {"attention_res": 14}}),
    ("resnet-ada-color", {}),
    ("resnet-vae-mnist", {}),
    ("stylegan2-mnist", {"model.conditional": True, "model.g_options": {"style_mixing": 0.5}}),
])
def test_checkpoint_round_trip_gives_identical_outputs_and_generation_is_deterministic(preset, overrides, tmp_path):
    from latentforge.builders import build_gan, build_vae

    cfg = load_experiment(preset, {"model.z_dim": 8, **overrides})
    ch = 3 if preset.endswith("color") else 1
    res = 32 if ch == 3 else 28
    spec = _spec(ch, res, 10 if cfg.model.conditional else 0)
    torch.manual_seed(0)
    if cfg.algorithm == "gan":
        g, d = build_gan(cfg.model, spec)
        modules = {"generator": copy.deepcopy(g), "discriminator": d, "generator_ema": g}  # the EMA copy loads back
    else:
        modules = {"vae": build_vae(cfg.model, spec)}
    net = modules["generator_ema" if cfg.algorithm == "gan" else "vae"]  # what inference_generator() loads
    z = torch.randn(4, 8)
    y = torch.arange(4) if cfg.model.conditional else None
    net.train()
    net.decode(z, y)  # a training-mode forward: BatchNorm statistics and spectral-norm vectors leave their init
    save_checkpoint(tmp_path / "ck", algorithm=cfg.algorithm, experiment=cfg.model_dump(mode="json"), data=spec,
                    modules=modules, step=1)
    loaded = load_checkpoint(tmp_path / "ck").inference_generator()
    net.eval()
    with torch.no_grad():
        a, b, c = net.decode(z, y), loaded.decode(z, y), loaded.decode(z, y)
    assert torch.equal(a, b) and torch.equal(b, c)
    if preset.startswith("stylegan2"):  # edited in W: SeFa factorises the style affine weights
        from latentforge.editing.space import edit_model

        w_dim = cfg.model.g_options.get("w_dim", 128)
        assert torch.equal(loaded.w_avg, net.w_avg) and net.w_avg.abs().sum() > 0  # the tracked mean w travels
        assert edit_model(loaded).first_layer_weight().shape[1] == w_dim
        return
    assert isinstance(loaded, FirstLayerEditable)
    assert loaded.first_layer_weight().shape[1] == 8  # the map from z: what SeFa factorises


def test_unknown_architecture_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="dcgan, resnet"):
        load_experiment("dcgan-mnist", {"model.arch": "stylegan9"})
    with pytest.raises(ConfigError, match="is a vae family"):
        load_experiment("dcgan-mnist", {"model.arch": "conv_vae"})


def test_family_options_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match="g_options.*attention_rez"):
        load_experiment("resnet-mnist", {"model.g_options": {"attention_rez": 16}})
    with pytest.raises(ConfigError, match="takes no generator options"):
        load_experiment("dcgan-mnist", {"model.g_options": {"blocks_per_stage": 2}})
    cfg = load_experiment("resnet-mnist", {"model.g_options": {"attention_res": 16}})
    from latentforge.builders import build_gan

    with pytest.raises(ConfigError, match="attention_res 16 is not a feature-map side.*7, 14"):
        build_gan(cfg.model, _spec(1, 28, 0))


def test_family_options_keep_their_validated_values():
    cfg = load_experiment("resnet-mnist", {"model.g_options": {"spectral_norm": "false", "blocks_per_stage": 2.0}})
    assert cfg.model.g_options == {"spectral_norm": False, "blocks_per_stage": 2}  # not the truthy string 'false'


def test_a_family_outside_its_resolutions_says_which_it_supports():
    from latentforge.builders import build_gan

    with pytest.raises(ConfigError, match="'dcgan' family supports square 8, 16, 28, 32, 64 px"):
        build_gan(load_experiment("dcgan-mnist").model, _spec(3, 128, 0))
    g, _ = build_gan(load_experiment("resnet-mnist", {"model.g_width": 4, "model.d_width": 4}).model, _spec(3, 128, 0))
    assert g(torch.randn(1, 64)).shape == (1, 3, 128, 128)


def test_register_model_refuses_a_class_without_the_interface():
    from torch import nn

    from latentforge.models.architectures import register_model

    class NotAGenerator(nn.Module):
        pass

    with pytest.raises(ValueError, match="lacks the generator interface: decode"):
        register_model("broken", algorithm="gan", classes={"generator": NotAGenerator,
                                                           "discriminator": FAMILIES["dcgan"].classes["discriminator"]})
    assert "broken" not in FAMILIES
