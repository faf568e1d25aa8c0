import pytest
import torch

from latentforge.models import ConvVAE, DCGANDiscriminator, DCGANGenerator, build_module, describe
from latentforge.models.blocks import resolution_plan


def _nets(res, ch, k=0, g_norm="batch", d_norm="spectral"):
    g = DCGANGenerator(z_dim=8, channels=ch, resolution=res, width=8, norm=g_norm, num_classes=k, embed_dim=4)
    d = DCGANDiscriminator(channels=ch, resolution=res, width=8, norm=d_norm, num_classes=k)
    return g, d


@pytest.mark.parametrize("res", [8, 16, 28, 32, 64])
@pytest.mark.parametrize("ch", [1, 3])
def test_gan_shapes_and_range(res, ch):
    torch.manual_seed(0)
    g, d = _nets(res, ch)
    x = g(torch.randn(5, 8))
    assert x.shape == (5, ch, res, res)
    assert x.abs().max() <= 1.0
    assert d(x).shape == (5,)


@pytest.mark.parametrize("d_norm", ["spectral", "layer", "instance", "none"])
def test_gradients_flow_to_every_parameter(d_norm):
    torch.manual_seed(0)
    g, d = _nets(16, 3, k=4, d_norm=d_norm)
    y = torch.randint(0, 4, (6,))
    d(g(torch.randn(6, 8), y), y).sum().backward()
    for name, p in list(g.named_parameters()) + list(d.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_conditional_models_use_the_label():
    torch.manual_seed(0)
    g, d = _nets(16, 1, k=3)
    z = torch.randn(4, 8)
    a, b = g(z, torch.zeros(4, dtype=torch.long)), g(z, torch.ones(4, dtype=torch.long))
    assert (a - b).abs().mean() > 1e-4
    x = torch.randn(4, 1, 16, 16)
    assert (d(x, torch.zeros(4, dtype=torch.long)) - d(x, torch.ones(4, dtype=torch.long))).abs().mean() > 1e-5
    with pytest.raises(ValueError, match="pass labels"):
        g(z)


def test_spectral_norm_bounds_the_largest_singular_value():
    torch.manual_seed(0)
    _, d = _nets(32, 3)
    with torch.no_grad():
        for m in d.modules():  # make raw weights large, so the bound is not trivially met
            if hasattr(m, "parametrizations"):
                m.parametrizations.weight.original.mul_(50)
    d.train()
    x = torch.randn(8, 3, 32, 32)
    for _ in range(30):  # power iterations converge over forwards in train mode
        d(x)
    checked = 0
    d.eval()  # eval mode: reading m.weight does not run another power iteration
    with torch.no_grad():
        for m in d.modules():
            if hasattr(m, "parametrizations"):
                w = m.weight.reshape(m.weight.shape[0], -1)
                sigma = torch.linalg.matrix_norm(w, ord=2).item()
                raw = torch.linalg.matrix_norm(m.parametrizations.weight.original.reshape(w.shape[0], -1), ord=2).item()
                assert raw > 5 and sigma == pytest.approx(1.0, abs=0.05)
                checked += 1
    assert checked >= 3


def test_vae_shapes_and_conditioning():
    torch.manual_seed(0)
    v = ConvVAE(z_dim=6, channels=3, resolution=32, width=8, num_classes=5)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    y = torch.randint(0, 5, (4,))
    raw, mu, logvar = v(x, y)
    assert raw.shape == x.shape and mu.shape == (4, 6) and logvar.shape == (4, 6)
    img = v.decode(mu, y)
    assert img.min() >= -1 and img.max() <= 1


def test_unsupported_resolution_says_how_to_fix():
    with pytest.raises(ValueError, match="--size"):
        resolution_plan(40)


@pytest.mark.parametrize("factory", [
    lambda: DCGANGenerator(z_dim=8, channels=3, resolution=16, width=8, norm="batch", num_classes=3),
    lambda: DCGANDiscriminator(channels=1, resolution=28, width=8, norm="spectral", num_classes=10),
    lambda: DCGANDiscriminator(channels=3, resolution=16, width=8, norm="layer"),
    lambda: ConvVAE(z_dim=4, channels=1, resolution=28, width=8, likelihood="gaussian"),
    lambda: ConvVAE(z_dim=4, channels=3, resolution=16, width=8, num_classes=3),
])
def test_rebuild_from_description_and_state_gives_identical_outputs(factory):
    torch.manual_seed(0)
    m = factory()
    m.train()
    # one training-mode forward so BatchNorm statistics and spectral-norm vectors are not at init
    if isinstance(m, DCGANGenerator):
        inputs = (torch.randn(4, 8), torch.randint(0, 3, (4,)))
    elif isinstance(m, DCGANDiscriminator):
        c, r = m.init_args["channels"], m.init_args["resolution"]
        inputs = (torch.randn(4, c, r, r), torch.randint(0, max(1, m.num_classes), (4,)) if m.num_classes else None)
    else:
        c, r = m.init_args["channels"], m.init_args["resolution"]
        inputs = (torch.randn(4, c, r, r), torch.randint(0, 3, (4,)) if m.num_classes else None)
    m(*inputs)
    desc = describe(m)
    clone = build_module(desc)
    clone.load_state_dict(m.state_dict())
    m.eval(), clone.eval()
    if isinstance(m, ConvVAE):
        a, b = m.encode(*inputs)[0], clone.encode(*inputs)[0]
    else:
        a, b = m(*inputs), clone(*inputs)
    assert torch.equal(a, b)


def test_unknown_class_is_refused():
    with pytest.raises(KeyError, match="DCGANGenerator"):
        build_module({"class": "os.system", "args": {}})
