"""Lazy R1 and gradient accumulation: each equals the computation it stands for."""

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny
from latentforge.algorithms.augment import Augmenter
from latentforge.algorithms.batch import Batch
from latentforge.algorithms.gan import gan_step, make_gan_state
from latentforge.algorithms.noise import GlobalNoise
from latentforge.algorithms.vae import make_vae_state, vae_step
from latentforge.builders import build_gan, build_vae
from latentforge.data.spec import DataSpec

SPEC = DataSpec((1, 16, 16), 0, ())


def _state(cfg):
    torch.manual_seed(0)
    g, d = build_gan(cfg.model, SPEC)
    return make_gan_state(g, d, cfg.gan)


def _images(n=8, seed=1):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def test_r1_every_update_equals_the_penalty_written_out():
    """r1_interval=1 (eager R1): D's update equals softplus loss + gamma/2 * E||grad D(x)||^2 by hand."""
    cfg = tiny("dcgan-mnist", model__g_norm="layer", model__d_norm="layer", gan__r1_weight=5.0)
    state = _state(cfg)
    d_ref = copy.deepcopy(state.d)
    opt_ref = torch.optim.Adam(d_ref.parameters(), lr=cfg.gan.lr_d, betas=(cfg.gan.beta1, cfg.gan.beta2))
    real = _images()
    z = GlobalNoise(0).normal(0, GlobalNoise.LATENT_D, 8, cfg.model.z_dim)
    with torch.no_grad():
        fake = state.g(z)
    x = real.clone().requires_grad_(True)
    logits = d_ref(torch.cat([x, fake]))
    (grad,) = torch.autograd.grad(logits[:8].sum(), x, create_graph=True)
    loss = F.softplus(-logits[:8]).mean() + F.softplus(logits[8:]).mean() + 0.5 * 5.0 * grad.pow(2).flatten(1).sum(1).mean()
    opt_ref.zero_grad()
    loss.backward()
    opt_ref.step()
    m = gan_step(state, [Batch(real)], GlobalNoise(0), cfg.gan, 0)
    assert m.r1 > 0
    _assert_same(_params(state.d), _params(d_ref), atol=1e-6)


def test_lazy_r1_applies_k_times_the_penalty_every_k_updates():
    """k=2: update 0 equals eager R1 with gamma doubled; update 1 equals no R1 at all."""
    lazy = tiny("dcgan-mnist", model__g_norm="layer", model__d_norm="layer", gan__r1_weight=2.0, gan__r1_interval=2)
    doubled = tiny("dcgan-mnist", model__g_norm="layer", model__d_norm="layer", gan__r1_weight=4.0)
    none = tiny("dcgan-mnist", model__g_norm="layer", model__d_norm="layer", gan__r1_weight=0.0)
    a, b = _state(lazy), _state(doubled)
    ma = gan_step(a, [Batch(_images(seed=1))], GlobalNoise(0), lazy.gan, 0)
    gan_step(b, [Batch(_images(seed=1))], GlobalNoise(0), doubled.gan, 0)
    _assert_same(_params(a.d), _params(b.d))
    assert ma.r1 > 0
    c = copy.deepcopy(a)
    mc = gan_step(a, [Batch(_images(seed=2))], GlobalNoise(0), lazy.gan, 1)
    gan_step(c, [Batch(_images(seed=2))], GlobalNoise(0), none.gan, 1)
    _assert_same(_params(a.d), _params(c.d))
    assert mc.r1 == 0.0  # skipped this update


@pytest.mark.parametrize("overrides", [
    {"gan__loss": "wgan-gp", "gan__n_critic": 2},  # gradient penalty per micro-batch
    {"gan__r1_weight": 1.0, "gan__augment": "diffaugment"},  # R1 through augmented reals
    {"gan__augment": "ada", "gan__ada_p_init": 0.7},
])
def test_accumulated_micro_batches_equal_the_whole_batch(overrides):
    """accumulate=4 (micro-batches of 4) == one batch of 16 for BatchNorm-free networks: noise and
    augmentation are drawn per global batch and sliced."""
    whole = tiny("dcgan-mnist", model__g_norm="layer", model__d_norm="layer", **overrides)
    cfg = whole
    a, b = _state(cfg), _state(cfg)
    aug_a = Augmenter(cfg.gan.augment, tuple(cfg.gan.diffaugment_policy))
    aug_b = copy.deepcopy(aug_a)
    if aug_a.ada is not None:
        aug_a.ada.p = aug_b.ada.p = 0.7
    for step in range(2):
        batches = [Batch(_images(16, seed=10 * step + k)) for k in range(cfg.gan.n_critic)]
        ma = gan_step(a, batches, GlobalNoise(0), cfg.gan, step, augment=aug_a)
        mb = gan_step(b, batches, GlobalNoise(0), cfg.gan, step, accumulate=4, augment=aug_b)
        assert ma.d_loss == pytest.approx(mb.d_loss, abs=1e-5) and ma.g_loss == pytest.approx(mb.g_loss, abs=1e-5)
    for net in ("g", "d", "g_ema"):
        _assert_same(_params(getattr(a, net)), _params(getattr(b, net)), atol=2e-5)


def _sg2_noisy(**overrides):
    """A tiny StyleGAN2 with noise maps and style mixing, its noise strengths at 0.5 (they start
    at 0, where the maps would not reach the images)."""
    cfg = tiny("stylegan2-mnist", model__g_options={"noise": True, "style_mixing": 0.9}, **overrides)
    state = _state(cfg)
    for m in state.g.modules():
        if hasattr(m, "noise_strength"):
            m.noise_strength.data.fill_(0.5)
    state.g_ema.load_state_dict(state.g.state_dict())
    return cfg, state


@pytest.mark.parametrize("pl_weight", [0.0, 2.0])
def test_stylegan2_noise_and_style_mixing_are_drawn_per_global_batch(pl_weight):
    """StyleGAN2's noise maps and style mixing are drawn like the latents (counter-based, for the
    whole batch, then sliced). A step does not read torch's global generator, so a resumed run draws
    what the uninterrupted run drew; and accumulate=4 equals one batch of 16, as N workers equal one.
    (Before, every worker drew the same maps from the same seeded global generator.)"""
    from latentforge.algorithms.gan import PathLength

    cfg, a = _sg2_noisy(gan__r1_weight=1.0)
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    pls = [PathLength(pl_weight, 1, 0.01) for _ in range(3)]
    for step in range(2):
        batches = [Batch(_images(16, seed=20 + step))]
        out = []
        for i, (s, pl) in enumerate(zip((a, b, c), pls)):
            torch.manual_seed(1000 * i + step)  # another global generator state for every run
            out.append(gan_step(s, batches, GlobalNoise(0), cfg.gan, step, path_length=pl,
                                accumulate=4 if i == 2 else 1))
        assert out[0].as_dict() == out[1].as_dict()
        if not pl_weight:  # the path-length mean is an EMA stepped per micro-batch, as the reference's
            assert out[0].g_loss == pytest.approx(out[2].g_loss, abs=1e-5)
    _assert_same(_params(a.g), _params(b.g))
    _assert_same(_params(a.d), _params(b.d))
    if not pl_weight:  # w_avg too is an EMA over each forward's batch
        # Tolerance: Adam with beta1 0 divides by |g|, so summation order reaches ~4e-5 of these
        # N(0, 1) weights in 2 steps (measured); other draws move them by ~lr x steps = 5e-3.
        same = lambda p: {k: v for k, v in _params(p).items() if "w_avg" not in k}  # noqa: E731
        _assert_same(same(a.g), same(c.g), atol=1e-4)


def test_stylegan2_random_inputs_reach_the_images():
    """The drawn maps and mixing are what a training forward uses: the same draws give the same
    images, another seed's draws other images; eval mode ignores them (the constant maps)."""
    from latentforge.algorithms.gan import random_inputs

    cfg, state = _sg2_noisy()
    g = state.g
    z = GlobalNoise(0).normal(0, GlobalNoise.LATENT_G, 4, cfg.model.z_dim)
    r0, r1 = (random_inputs(g, GlobalNoise(seed), 0, GlobalNoise.LATENT_G, 4, torch.device("cpu")) for seed in (0, 1))
    assert {"mix_z", "mix_u", "noise0"} <= r0.keys() and r0["noise0"].shape[0] == 4
    assert torch.equal(g(z, None, randomness=r0), g(z, None, randomness=r0))
    assert not torch.allclose(g(z, None, randomness=r0), g(z, None, randomness=r1))
    with pytest.raises(ValueError, match=r"randomness lacks \['mix_u'\], which random_inputs\(\) names"):
        g(z, None, randomness={k: v for k, v in r0.items() if k != "mix_u"})  # no silent fallback
    g.eval()
    assert torch.equal(g(z, None, randomness=r0), g(z, None, randomness=r1))
    assert random_inputs(build_gan(tiny("dcgan-mnist").model, SPEC)[0], GlobalNoise(0), 0, 2, 4, torch.device("cpu")) is None


def test_accumulation_must_split_the_batch_evenly():
    cfg = tiny("dcgan-mnist")
    with pytest.raises(ValueError, match="16 images cannot be split into 3 equal micro-batches"):
        gan_step(_state(cfg), [Batch(_images(16))], GlobalNoise(0), cfg.gan, 0, accumulate=3)


def test_vae_accumulation_equals_the_whole_batch():
    cfg = tiny("vae-mnist")
    torch.manual_seed(0)
    vae = build_vae(cfg.model, SPEC)
    a, b = make_vae_state(vae, cfg.vae), make_vae_state(copy.deepcopy(vae), cfg.vae)
    for step in range(2):
        batch = Batch(_images(16, seed=step))
        ma = vae_step(a, batch, GlobalNoise(0), cfg.vae, step)
        mb = vae_step(b, batch, GlobalNoise(0), cfg.vae, step, accumulate=2)
        assert ma.loss == pytest.approx(mb.loss, rel=1e-6)
    _assert_same(_params(a.vae), _params(b.vae), atol=1e-6)


def _sg2(**overrides):
    return tiny("stylegan2-mnist", **{"model__g_options": {"noise": False}, "gan__pl_weight": 2.0, "gan__pl_interval": 2,
                                      **overrides})


def test_path_length_penalty_is_written_out_and_lazy():
    """pl_interval=2: G's update at step 0 equals g_loss + 2·2·E[(|J_wᵀy| − a)²] by hand on every
    other sample (a: the running mean after its first EMA step), and at step 1 equals no penalty."""
    from latentforge.algorithms.gan import PathLength

    cfg, none = _sg2(), _sg2(gan__pl_weight=0.0)
    state = _state(cfg)
    g_ref, d_ref, g0 = copy.deepcopy(state.g), copy.deepcopy(state.d), copy.deepcopy(state.g)
    pl = PathLength(2.0, 2, cfg.gan.pl_decay)
    real = _images()
    m = gan_step(state, [Batch(real)], GlobalNoise(0), cfg.gan, 0, path_length=pl)
    # by hand: the same D update (no PL in D), then the G update with the penalty written out
    ref = make_gan_state(g_ref, d_ref, cfg.gan)
    gan_step(ref, [Batch(real)], GlobalNoise(0), none.gan, 0)  # D and G without PL ...
    assert not torch.allclose(_params(state.g)["const"], _params(ref.g)["const"])  # ... differ in G only
    _assert_same(_params(state.d), _params(ref.d))
    z = GlobalNoise(0).normal(0, GlobalNoise.LATENT_G, 8, cfg.model.z_dim)[::2]
    y = GlobalNoise(0).normal(0, GlobalNoise.PATH_LENGTH, 8, 1, 16, 16)[::2] / 16.0
    ws = g0.mapping_net(z, update_avg=False)[:, None].repeat(1, g0.num_ws, 1)
    (grad,) = torch.autograd.grad((g0.synthesis(ws) * y).sum(), ws, create_graph=True)
    lengths = grad.pow(2).sum(2).mean(1).sqrt()
    a = cfg.gan.pl_decay * lengths.mean().item()
    assert pl.mean == pytest.approx(a, rel=1e-6) and m.pl == pytest.approx(((lengths - a) ** 2).mean().item(), rel=1e-5)
    # step 1 is not due: the update equals one without the regulariser, and the mean stays
    s2, r2 = copy.deepcopy(state), copy.deepcopy(state)
    m1 = gan_step(s2, [Batch(_images(seed=3))], GlobalNoise(0), cfg.gan, 1, path_length=pl)
    gan_step(r2, [Batch(_images(seed=3))], GlobalNoise(0), none.gan, 1)
    _assert_same(_params(s2.g), _params(r2.g))
    assert m1.pl == 0.0 and pl.mean == pytest.approx(a, rel=1e-6)
    assert PathLength(2.0, 2, 0.01).state_dict() == {"mean": 0.0}


def test_path_length_needs_a_generator_with_w():
    from latentforge.errors import ConfigError
    from latentforge.train.program import build_program

    cfg = tiny("dcgan-mnist", gan__pl_weight=2.0)
    with pytest.raises(ConfigError, match="gan.pl_weight needs a generator with a W space"):
        build_program(cfg, DataSpec((1, 28, 28), 0, ()), GlobalNoise(0), torch.device("cpu"), lambda m: m, lambda t: t)


def test_wgan_gp_penalises_points_between_the_images_d_scores():
    """With augmentation on, D scores augmented reals and fakes; the gradient penalty's points lie on
    the segments between those (Gulrajani et al. 2017 penalise where D is evaluated), not between
    the un-augmented images."""
    cfg = tiny("dcgan-mnist", model__g_norm="layer", model__d_norm="layer", gan__loss="wgan-gp", gan__augment="diffaugment")
    state = _state(cfg)
    seen = []
    state.d.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    gan_step(state, [Batch(_images())], GlobalNoise(0), cfg.gan, 0, augment=Augmenter("diffaugment", ("translation", "cutout")))
    real, fake, mix = seen[0].flatten(1).chunk(3)
    along = F.cosine_similarity(mix - fake, real - fake, dim=1)
    assert torch.allclose(along, torch.ones_like(along), atol=1e-4), along
