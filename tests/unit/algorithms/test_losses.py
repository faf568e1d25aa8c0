import copy
import math

import pytest
import torch
from torch import nn

from latentforge.algorithms.ema import ema_decay_at, ema_update, standing_batchnorm_stats
from latentforge.algorithms.losses import get_loss, gradient_penalty, r1_penalty
from latentforge.algorithms.noise import GlobalNoise
from latentforge.algorithms.vae import kl_standard_normal, kl_weight, reconstruction_nll


def test_ns_loss_values():
    ns = get_loss("ns")
    zero = torch.zeros(4)
    assert ns.d_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert ns.g_loss(zero).item() == pytest.approx(math.log(2))
    # a confident, correct D has a small loss; G's loss is large when D rejects its fakes
    assert ns.d_loss(torch.full((4,), 10.0), torch.full((4,), -10.0)).item() < 1e-3
    assert ns.g_loss(torch.full((4,), -10.0)).item() > 9


def test_hinge_and_wgan_losses():
    h = get_loss("hinge")
    assert h.d_loss(torch.tensor([2.0]), torch.tensor([-2.0])).item() == 0.0
    assert h.d_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == 2.0
    w = get_loss("wgan-gp")
    assert w.needs_gradient_penalty
    assert w.d_loss(torch.tensor([3.0]), torch.tensor([1.0])).item() == -2.0
    with pytest.raises(ValueError, match="choose one of: ns, hinge, wgan-gp"):
        get_loss("hinge2")


def test_gradient_penalty_is_zero_for_unit_gradient_and_positive_otherwise():
    x = torch.randn(8, 1, 4, 4, requires_grad=True)
    w = torch.randn(16)
    unit = w / w.norm()
    assert gradient_penalty((x.flatten(1) * unit).sum(1), x).item() == pytest.approx(0.0, abs=1e-6)
    assert gradient_penalty((x.flatten(1) * 3 * unit).sum(1), x).item() == pytest.approx(4.0, rel=1e-5)


def test_r1_penalty_value_and_that_it_trains_d():
    x = torch.randn(5, 2, requires_grad=True)
    lin = nn.Linear(2, 1, bias=False)
    r1 = r1_penalty(lin(x).squeeze(1), x)
    assert r1.item() == pytest.approx(lin.weight.pow(2).sum().item(), rel=1e-5)
    r1.backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_ema_update_math_and_rampup():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    before = a.weight.detach().clone()
    ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(100000, 0.999) == 0.999


def test_standing_statistics_are_the_ema_generators_own():
    """An EMA update copies the live generator's BatchNorm statistics into the averaged copy, whose
    weights differ. Standing statistics replace them with those of the copy's own activations, over
    latents drawn from their own seed: the same every time, with the global RNG, each layer's
    momentum and the module's mode left as they were."""
    from latentforge.models.dcgan import DCGANGenerator

    torch.manual_seed(0)
    live = DCGANGenerator(z_dim=8, channels=1, resolution=16, width=8, num_classes=4)
    ema = copy.deepcopy(live).eval()
    with torch.no_grad():
        for p in live.parameters():
            p.add_(0.3 * torch.randn_like(p))
        live.train()(torch.randn(32, 8), torch.arange(32) % 4)  # the live generator's statistics
    ema_update(ema, live, 0.99)
    bn, live_bn = (next(m for m in g.modules() if isinstance(m, nn.BatchNorm2d)) for g in (ema, live))
    assert torch.equal(bn.running_mean, live_bn.running_mean)  # copied: the live weights' statistics

    seen = []  # the first BatchNorm's inputs do not depend on any BatchNorm statistics
    hook = bn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    rng = torch.get_rng_state()
    standing_batchnorm_stats(ema, seed=3, batches=4, batch_size=16)
    hook.remove()
    assert torch.equal(torch.get_rng_state(), rng) and not ema.training and bn.momentum == live_bn.momentum
    x = torch.cat(seen)  # 4 batches of 16, labels cycling
    assert len(seen) == 4 and torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-5)
    assert not torch.allclose(bn.running_mean, live_bn.running_mean, atol=1e-3)
    once = {k: v.clone() for k, v in ema.state_dict().items()}
    standing_batchnorm_stats(ema, seed=3, batches=4, batch_size=16)
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in once.items())


def test_global_noise_is_split_invariant():
    full = GlobalNoise(7, 0, 1).normal(3, 1, 8, 5)
    parts = torch.cat([GlobalNoise(7, r, 4).normal(3, 1, 2, 5) for r in range(4)])
    assert torch.equal(full, parts)
    assert not torch.equal(full, GlobalNoise(7, 0, 1).normal(4, 1, 8, 5))
    # a worker's slice owns only its own numbers: a view would keep the global draw alive (8x here)
    part = GlobalNoise(7, 1, 8).normal(3, 1, 2, 1, 16, 16)
    assert part.untyped_storage().nbytes() == part.numel() * part.element_size()


def test_vae_terms():
    mu, logvar = torch.zeros(3, 4), torch.zeros(3, 4)
    assert torch.allclose(kl_standard_normal(mu, logvar), torch.zeros(3))
    assert kl_standard_normal(torch.ones(1, 4), torch.zeros(1, 4)).item() == pytest.approx(2.0)
    x = torch.ones(2, 1, 2, 2)  # all white: perfect logits give ~0 NLL
    assert reconstruction_nll(torch.full_like(x, 20.0), x, "bernoulli", 0.1).max() < 1e-6
    g = reconstruction_nll(x, x, "gaussian", 0.1)
    assert g[0].item() == pytest.approx(4 * (math.log(0.1) + 0.5 * math.log(2 * math.pi)), rel=1e-5)
    assert kl_weight(0, 4.0, 100) == pytest.approx(0.04) and kl_weight(500, 4.0, 100) == 4.0
