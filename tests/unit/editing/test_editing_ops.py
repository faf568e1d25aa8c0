"""Editing operations on small models: each test would fail if the operation were a no-op or
returned its input."""

import math

import pytest
import torch

from latentforge.data.shapes import generate_shapes
from latentforge.editing.directions import (
    Direction,
    apply_edit,
    attribute_regression,
    load_directions,
    save_directions,
    sefa,
)
from latentforge.editing.inversion import project
from latentforge.editing.latent import interpolation_path, slerp
from latentforge.editing.quality import centre_mask, masked_psnr, measure_shape_factors, random_mask
from latentforge.editing.restoration import denoise, estimate_noise_sigma, inpaint, paste
from latentforge.models import ConvVAE, DCGANGenerator


@pytest.fixture
def generator():
    """An untrained generator whose output layer is scaled up so that images vary a lot with z
    (at initialisation they are nearly constant grey, which would make every test trivial)."""
    torch.manual_seed(0)
    g = DCGANGenerator(z_dim=16, channels=1, resolution=16, width=8, norm="none").eval()
    with torch.no_grad():
        g.net.to_image.weight.mul_(30)
    return g


def test_slerp_matches_closed_forms():
    """Checked against formulas that do not share slerp's own: a rotation in the plane of a, b."""
    gen = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)[:, None]  # (11, 1)
    # unit vectors at a generic angle ω: slerp walks the great circle, the point at angle tω
    a, b = torch.randn(2, 128, generator=gen, dtype=torch.float64)
    u = a / a.norm()
    v = b - (b @ u) * u
    v = v / v.norm()
    omega = torch.atan2(b @ v, b @ u)
    circle = torch.cos(t * omega) * u + torch.sin(t * omega) * v  # (11, 128)
    assert torch.allclose(interpolation_path(u, b / b.norm(), 11, "slerp"), circle, atol=1e-9)
    # orthogonal inputs of unequal norms: cos(tπ/2)·a + sin(tπ/2)·b
    a2, b2 = 2.0 * torch.eye(8, dtype=torch.float64)[0], 3.0 * torch.eye(8, dtype=torch.float64)[1]
    quarter = torch.cos(t * math.pi / 2) * a2 + torch.sin(t * math.pi / 2) * b2
    assert torch.allclose(slerp(a2, b2, t), quarter, atol=1e-9)
    # endpoints are the inputs themselves, whatever their norms
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-9) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-9)
    # a batch of pairs (..., D) is interpolated pair by pair
    pairs = slerp(torch.stack([a, a2.repeat(16)]), torch.stack([b, b2.repeat(16)]), 0.3)
    assert torch.allclose(pairs[0], slerp(a, b, 0.3))
    assert torch.allclose(pairs[1], slerp(a2.repeat(16), b2.repeat(16), 0.3))
    # parallel vectors (sin ω → 0): the lerp result, not a division by zero
    assert torch.allclose(slerp(a, a, 0.5), a, atol=1e-9)
    assert torch.allclose(slerp(a, 2 * a, t), (1 + t) * a, atol=1e-9)
    # an end at the origin (the mean latent) has no direction: the lerp path, finite, ends exact
    zero_path = interpolation_path(torch.zeros(128, dtype=torch.float64), b, 5, "slerp")
    assert torch.isfinite(zero_path).all() and torch.equal(zero_path[0], torch.zeros(128, dtype=torch.float64))
    assert torch.allclose(zero_path, torch.linspace(0, 1, 5, dtype=torch.float64)[:, None] * b, atol=1e-12)
    with pytest.raises(ValueError, match="slerp, lerp"):
        interpolation_path(a, b, 5, "cubic")


def test_edit_moves_along_direction_and_respects_orthogonality():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 8, generator=gen)
    d, other = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    e = apply_edit(z, d, 2.0)
    assert torch.allclose((e - z).norm(dim=1), torch.full((5,), 2.0), atol=1e-5)
    e2 = apply_edit(z, d, 2.0, orthogonal_to=[other])
    assert torch.allclose(e2 @ other, z @ other, atol=1e-4)  # the other attribute's score is unchanged
    assert not torch.allclose(e2, z)
    # nothing of d is left once -d is projected out: refused, not rounding noise scaled to unit length
    with pytest.raises(ValueError, match="within the span"):
        apply_edit(z, d, 2.0, orthogonal_to=[-d * 1.0000001])


def test_a_mask_counts_every_channel_so_the_error_keeps_its_units():
    """An all-observed mask gives the unmasked mean squared error of an RGB image (the prior's
    weight against it was a third of its value when the mask counted each pixel once)."""
    from latentforge.editing.inversion import _observed_mse

    diff = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(_observed_mse(diff, torch.ones(2, 1, 8, 8)), diff.flatten(1).mean(1))
    half = torch.zeros(2, 1, 8, 8)
    half[..., :4] = 1
    torch.testing.assert_close(_observed_mse(diff, half), diff[..., :4].flatten(1).mean(1))


def test_projection_recovers_the_generators_own_images(generator):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        target = generator(torch.randn(4, 16, generator=gen))
    start_err = (generator(torch.randn(4, 16, generator=torch.Generator().manual_seed(99))) - target).pow(2).flatten(1).mean(1)
    inv = project(generator, target, steps=150, restarts=2, lr=0.05)
    assert (inv.error < 0.25 * start_err.detach()).all(), (inv.error, start_err)


def test_inpainting_keeps_observed_pixels_exactly_and_fills_the_rest(generator):
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        x = generator(torch.randn(3, 16, generator=gen))
    mask = centre_mask(3, 1, 16, 16)
    corrupted = paste(x, torch.full_like(x, 0.123), mask)  # a value the model would not produce
    filled, inv = inpaint(generator, "gan", corrupted, mask, steps=150, restarts=2)
    assert torch.equal(filled * mask, corrupted * mask)
    hole = (1 - mask).bool().expand_as(x)
    assert not torch.allclose(filled[hole], corrupted[hole])
    mean_fill = paste(corrupted, torch.zeros_like(x), mask)
    assert masked_psnr(filled, x, mask).mean() > masked_psnr(mean_fill, x, mask).mean() + 3


def test_vae_chain_inpainting_needs_a_vae(generator):
    with pytest.raises(ValueError, match="needs a VAE"):
        inpaint(generator, "gan", torch.zeros(1, 1, 16, 16), torch.ones(1, 1, 16, 16), method="chain")


def test_masks_cover_what_they_claim():
    c = centre_mask(2, 1, 16, 16)
    assert (1 - c).mean() == pytest.approx(0.25)
    r = random_mask(200, 1, 32, 32, seed=0)
    assert 0.3 < float((1 - r).mean()) < 0.5


def test_sefa_gives_orthonormal_eigenvectors_and_directions_round_trip(generator, tmp_path):
    dirs = sefa(generator, "gan", k=4)
    m = torch.stack([d.vector for d in dirs])
    assert torch.allclose(m @ m.T, torch.eye(4), atol=1e-4)
    w = generator.first_layer_weight().detach()
    # the first direction maximises ||A d|| among unit vectors
    assert (w @ m[0]).norm() >= (w @ torch.nn.functional.normalize(torch.randn(16), dim=0)).norm()
    # an eigenvector's sign is up to the LAPACK build: each is fixed so that its largest entry is
    # positive, so `sefa:0` is the same edit on every machine (a CPU Editor and a GPU Generator)
    assert (m.gather(1, m.abs().argmax(1, keepdim=True)) > 0).all()
    save_directions(tmp_path, dirs + [Direction("attr:size", torch.ones(16) / 4, "attribute_regression", {"r2": 0.5})])
    loaded = load_directions(tmp_path)
    assert set(loaded) == {"sefa:0", "sefa:1", "sefa:2", "sefa:3", "attr:size"}
    assert torch.equal(loaded["sefa:2"].vector, dirs[2].vector) and loaded["attr:size"].meta == {"r2": 0.5}


def test_attribute_regression_finds_the_planted_direction():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(500, 6, generator=gen)
    truth = torch.tensor([0.0, 3.0, 0.0, -4.0, 0.0, 0.0]) / 5
    values = z @ truth + 0.05 * torch.randn(500, generator=gen)
    (d,) = attribute_regression(z, {"size": values})
    assert torch.dot(d.vector, truth) > 0.99 and d.meta["r2"] > 0.95


def test_shape_factors_can_be_read_off_the_pictures():
    images, _, factors = generate_shapes(300, resolution=32, seed=0)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    m = measure_shape_factors(x)
    for name in ("size", "x", "y"):
        corr = torch.corrcoef(torch.stack([m[name], torch.from_numpy(factors[name])]))[0, 1]
        assert corr > 0.9, (name, corr)


def test_vae_inversion_is_its_encoder():
    torch.manual_seed(0)
    vae = ConvVAE(z_dim=4, channels=1, resolution=16, width=8).eval()
    from latentforge.editing.inversion import invert

    x = torch.rand(3, 1, 16, 16) * 2 - 1
    inv = invert(vae, "vae", x)
    assert inv.steps == 0 and torch.allclose(inv.latent, vae.encode(x)[0])
    assert math.isfinite(float(inv.error.mean()))


def test_noise_sigma_estimate_reads_white_noise_on_a_smooth_image():
    gen = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-0.5, 0.5, 32).view(1, 1, 1, 32).expand(4, 1, 32, 32)
    for sigma in (0.05, 0.2, 0.4):
        est = estimate_noise_sigma(ramp + sigma * torch.randn(4, 1, 32, 32, generator=gen))
        assert torch.allclose(est, torch.full((4,), sigma), rtol=0.15), (sigma, est)


def test_denoise_weights_the_observation_by_the_noise_level():
    """With no noise the observation is returned; with heavy noise the projection dominates."""
    vae = ConvVAE(channels=1, resolution=16, z_dim=4, width=8).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16, generator=gen) * 2 - 1
    assert torch.allclose(denoise(vae, "vae", x, sigma=0.0), x, atol=1e-3)
    recon = vae.decode(vae.encode(x)[0])
    heavy = denoise(vae, "vae", x, sigma=50.0)
    assert (heavy - recon).abs().max() < (heavy - x).abs().max()


def test_averaged_inpainting_fills_with_the_mean_of_the_best_fits(generator):
    gen = torch.Generator().manual_seed(1)
    x = generator(torch.randn(3, generator.z_dim, generator=gen)).detach()
    mask = centre_mask(3, 1, x.shape[-2], x.shape[-1])
    kw = dict(steps=5, restarts=4, seed=0)
    single, inv = inpaint(generator, "gan", x, mask, average=1, **kw)
    mean_all, _ = inpaint(generator, "gan", x, mask, average=4, **kw)
    assert torch.equal(single, paste(x, inv.reconstruction, mask))
    assert torch.allclose(mean_all, paste(x, inv.candidates.mean(0), mask), atol=1e-6)
    assert torch.equal(mean_all * mask, x * mask)
    with pytest.raises(ValueError, match="restarts"):
        inpaint(generator, "gan", x, mask, average=8, **kw)
