"""The StyleGAN2-style family and editing in its W space: modulation equals the per-sample
weight form it replaces, truncation and style mixing do what the papers say, minibatch std is
shard-independent, and inversion, SeFa, interpolation and W+ work in W."""

import pytest
import torch
import torch.nn.functional as F

from latentforge.editing.directions import apply_edit, data_free_directions, sefa
from latentforge.editing.inversion import project
from latentforge.editing.space import WSpace, edit_model, random_latents
from latentforge.models.stylegan2 import (
    ModulatedConv2d,
    StyleGAN2Discriminator,
    StyleGAN2Generator,
    minibatch_stddev,
)
from latentforge.sampling import decode_latents, seeded_latents


def _g(**kw):
    torch.manual_seed(0)
    args = dict(z_dim=8, channels=1, resolution=16, width=8, w_dim=16, mapping_layers=2)
    return StyleGAN2Generator(**{**args, **kw})


def test_modulated_conv_equals_the_per_sample_weight_form():
    """x·s → conv → ·d (one conv for the batch) equals convolving each sample with its own
    modulated, demodulated weight w'_ijk = s_i·w_ijk / sqrt(Σ_ik (s_i·w_ijk)² + ε) (Karras et al. 2020, eq. 1, 3)."""
    torch.manual_seed(0)
    conv = ModulatedConv2d(4, 5, 3, w_dim=6)
    x, w = torch.randn(3, 4, 7, 7), torch.randn(3, 6)
    out = conv(x, w)
    s = conv.affine(w)
    for b in range(3):
        wt = conv.weight * conv.scale * s[b][None, :, None, None]
        wt = wt / (wt.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-8).sqrt()
        ref = F.conv2d(x[b : b + 1], wt, padding=1)
        torch.testing.assert_close(out[b : b + 1], ref, rtol=1e-4, atol=1e-5)


def test_every_parameter_gets_a_gradient_with_mixing_noise_and_labels():
    g = _g(num_classes=3, style_mixing=0.5)
    d = StyleGAN2Discriminator(channels=1, resolution=16, width=8, num_classes=3)
    y = torch.tensor([0, 1, 2, 1])
    d(g(torch.randn(4, 8), y), y).sum().backward()
    for name, p in list(g.named_parameters()) + list(d.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_tanh_output_bounds_the_same_images_and_a_bad_choice_is_named():
    """output='tanh' is tanh of the linear output with the same weights (and checkpoints without
    the key keep the reference's linear output)."""
    linear, bounded = _g(), _g(output="tanh")
    bounded.load_state_dict(linear.state_dict())
    linear.eval(), bounded.eval()
    ws = torch.randn(4, 16) * 3
    torch.testing.assert_close(bounded.synthesis(ws), torch.tanh(linear.synthesis(ws)))
    assert linear.synthesis(ws).abs().max() > 1 and bounded.synthesis(ws).abs().max() < 1
    assert _g().init_args["output"] == "linear"
    with pytest.raises(ValueError, match="'linear' or 'tanh'"):
        _g(output="sigmoid")


def test_truncation_pulls_w_to_the_tracked_mean():
    g = _g()
    g.train()
    g(torch.randn(64, 8)).sum().backward()  # a training forward with grad: updates w_avg
    assert g.w_avg.abs().sum() > 0
    g.eval()
    z = torch.randn(5, 8)
    w = g.mapping(z)
    torch.testing.assert_close(g.mapping(z, truncation_psi=0.0), g.w_avg.expand(5, -1))
    torch.testing.assert_close(g.mapping(z, truncation_psi=0.5), g.w_avg + 0.5 * (w - g.w_avg))
    before = g.w_avg.clone()
    with torch.no_grad():
        g.train()(torch.randn(4, 8))  # D's fakes (no grad) do not move the mean
    assert torch.equal(before, g.w_avg)


def test_style_mixing_switches_w_at_a_layer_and_only_in_training():
    g = _g(style_mixing=1.0, noise=False)
    z = torch.randn(6, 8)
    g.eval()
    plain = g(z)
    torch.manual_seed(1)
    g.train()
    mixed = g(z)
    assert not torch.allclose(mixed, plain)  # every sample took a second w from some layer on
    g.eval()
    assert torch.equal(g(z), plain)
    # W+ with every layer's w the same is W; a different w in late layers changes the image
    w1, w2 = g.mapping(z[:1]), g.mapping(z[1:2])
    ws = w1[:, None].repeat(1, g.num_ws, 1)
    torch.testing.assert_close(g.synthesis(ws), g.synthesis(w1))
    ws[:, g.num_ws // 2 :] = w2
    assert not torch.allclose(g.synthesis(ws), g.synthesis(w1))
    with pytest.raises(ValueError, match="ws must be"):
        g.synthesis(torch.randn(1, 3, 16))


def test_minibatch_std_groups_are_consecutive_so_shards_agree():
    x = torch.randn(16, 3, 4, 4)
    whole = minibatch_stddev(x, 4)
    halves = torch.cat([minibatch_stddev(x[:8], 4), minibatch_stddev(x[8:], 4)])
    assert torch.equal(whole, halves)
    assert minibatch_stddev(x[:6], 4).shape == (6, 4, 4, 4)  # a group size that does not divide: shrinks to 3


@pytest.mark.parametrize("channels_last", [False, True])
def test_minibatch_std_is_the_group_std_by_definition_in_either_layout(channels_last):
    """The appended channel, its gradient and its second-order gradient (R1 passes through it)
    equal those of the definition (torch.var over each group of 4 consecutive samples, biased,
    sqrt, mean over C, H, W), whatever the layout."""
    torch.manual_seed(0)
    x = torch.randn(8, 5, 3, 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def by_definition(t):
        return (t.reshape(2, 4, 5, 3, 3).var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))

    seen = []
    for f in (lambda t: minibatch_stddev(t, 4)[:, 5, 0, 0][::4], by_definition):
        t = x.clone().requires_grad_()
        y = f(t)
        (g1,) = torch.autograd.grad((y * torch.arange(1.0, 3.0)).sum(), t, create_graph=True)
        (g2,) = torch.autograd.grad(g1.square().sum(), t)
        seen.append((y, g1, g2))
    for a, b in zip(*seen):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(minibatch_stddev(x, 4)[:, :5], x)


def test_eval_noise_is_fixed_so_a_seed_is_one_image():
    g = _g().eval()
    z = torch.randn(2, 8)
    assert torch.equal(g.decode(z), g.decode(z))
    g.train()
    for m in g.convs:
        m.noise_strength.data.fill_(1.0)
    assert not torch.equal(g(z), g(z))  # fresh noise in training


def test_editing_works_in_w():
    g = _g().eval()
    view = edit_model(g)
    assert isinstance(view, WSpace) and view.z_dim == 16 and view.noise_dim == 8
    # seeded latents are ws, the same for a seed, and ψ=0 gives the mean w
    w = seeded_latents(view, 3, seed=5)
    assert w.shape == (3, 16) and torch.equal(w, seeded_latents(view, 3, seed=5))
    torch.testing.assert_close(seeded_latents(view, 2, seed=5, truncation=0.0), g.w_avg.expand(2, -1))
    with torch.no_grad():
        torch.testing.assert_close(decode_latents(view, w), g.synthesis(w).clamp(-1, 1))
    # SeFa in W: eigenvectors of AᵀA for the stacked style affine weights A
    dirs = sefa(view, "gan", k=3)
    a = g.style_weight().double()
    for d in dirs:
        v = d.vector.double()
        av = a.T @ (a @ v)
        assert torch.allclose(av, d.meta["eigenvalue"] * v, atol=1e-6 * d.meta["eigenvalue"])
    names = [d.name for d in data_free_directions(g, "gan")]  # the raw generator is taken into W too
    assert "sefa:0" in names and "pca:0" in names
    # an edit of a W+ latent moves every layer's w by the same vector
    wp = w[:, None].repeat(1, g.num_ws, 1)
    moved = apply_edit(wp, dirs[0].vector, 2.0) - wp
    torch.testing.assert_close(moved, (2.0 * dirs[0].vector).expand_as(moved))


def test_inversion_in_w_finds_a_generated_image_and_w_plus_fits_at_least_as_well():
    g = _g().eval()
    view = edit_model(g)
    target_w = random_latents(view, 2, torch.Generator().manual_seed(3))
    x = view.decode(target_w).detach()
    start = ((view.decode(g.w_avg[None].expand(2, -1)) - x) ** 2).flatten(1).mean(1)
    inv = project(view, x, steps=150, restarts=2, lr=0.05, seed=0)
    assert inv.latent.shape == (2, 16)
    assert (inv.error < 0.25 * start).all(), (inv.error, start)
    plus = project(view, x, steps=150, restarts=2, lr=0.05, seed=0, plus=True)
    assert plus.latent.shape == (2, g.num_ws, 16)
    assert (plus.error <= inv.error * 1.05).all(), (plus.error, inv.error)
    with pytest.raises(Exception, match="W\\+ projection needs a model with a W space"):
        project(torch.nn.Identity(), x, plus=True)


def test_the_w_view_keeps_the_generators_mode():
    g = _g().eval()
    view = edit_model(g)
    seeded_latents(view, 2, seed=1)
    assert not g.training and not view.training  # eval stays eval: fixed noise, no w_avg updates


def test_flops_are_countable_without_grad():
    """`bench train` counts a step's FLOPs under FlopCounterMode, whose hooks cannot attach to a
    leaf that requires grad: the D pass makes its fakes under no_grad."""
    from torch.utils.flop_counter import FlopCounterMode

    g = _g()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        g(torch.randn(2, 8))
    assert counter.get_total_flops() > 0
