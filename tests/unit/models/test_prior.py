"""The VAE's fitted latent prior: the mixture fit, the noise-to-latent map, what a checkpoint
carries, and what sampling draws from."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import tiny
from latentforge.algorithms.vae import fit_latent_prior, posterior_means
from latentforge.checkpoint import LATENT_PRIOR, load_checkpoint
from latentforge.cli import main
from latentforge.data import PreparedDataset
from latentforge.errors import CheckpointError
from latentforge.models.prior import (GaussianMixturePrior, component_uniforms, fit_gaussian_mixture,
                                     standard_normal_log_prob)
from latentforge.sampling import generate, sample_latents, seeded_latents
from latentforge.train.local import train_local

quiet = lambda *_: None  # noqa: E731


def _three_clusters(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor([[4.0, 0, 0, 0], [-4.0, 0, 0, 0], [0, 5.0, 0, 0]])
    weights = torch.tensor([0.5, 0.3, 0.2])
    scales = torch.tensor([0.5, 1.0, 0.3])
    k = torch.multinomial(weights, n, replacement=True, generator=g)
    return means[k] + scales[k, None] * torch.randn(n, 4, generator=g), means, weights, scales


def test_em_recovers_a_known_mixture():
    x, means, weights, scales = _three_clusters(3000)
    fit = fit_gaussian_mixture(x, components=3, seed=1)
    order = torch.cdist(means, fit.prior.means).argmin(1)  # match each true component to its fitted one
    assert sorted(order.tolist()) == [0, 1, 2]
    assert torch.allclose(fit.prior.means[order], means, atol=0.1)
    assert torch.allclose(fit.prior.weights[order], weights, atol=0.03)
    fitted_std = torch.diagonal(fit.prior.scale_tril[order], dim1=1, dim2=2)  # isotropic clusters
    assert torch.allclose(fitted_std, scales[:, None].expand(3, 4), rtol=0.1)
    assert fit.log_likelihood > fit.standard_log_likelihood + 1.0
    again = fit_gaussian_mixture(x, components=3, seed=1)  # seeded starts: the same fit
    assert torch.equal(again.prior.means, fit.prior.means) and torch.equal(again.prior.scale_tril, fit.prior.scale_tril)


def test_the_mixture_density_matches_torch_distributions_and_the_fit_is_shift_invariant():
    """The E step's precision-factor form is the density torch computes, and the M step's
    E[xx^T] - mu mu^T loses nothing that matters when the latents sit far from the origin."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 6, 6, generator=g, dtype=torch.float64)
    true_tril = torch.linalg.cholesky(a @ a.transpose(1, 2) + 0.1 * torch.eye(6, dtype=torch.float64))
    centres = torch.randn(2, 6, generator=g, dtype=torch.float64) * 4
    k = torch.randint(2, (2000,), generator=g)
    x = centres[k] + torch.einsum("nij,nj->ni", true_tril[k], torch.randn(2000, 6, generator=g, dtype=torch.float64))
    fit = fit_gaussian_mixture(x, components=2, seed=0)
    p = fit.prior
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=p.weights.double()),
        torch.distributions.MultivariateNormal(p.means.double(), scale_tril=p.scale_tril.double()))
    assert torch.allclose(p.log_prob(x), reference.log_prob(x), atol=1e-9)
    assert abs(fit.log_likelihood - float(reference.log_prob(x).mean())) < 1e-9
    shifted = fit_gaussian_mixture(x + 100.0, components=2, seed=0).prior
    assert torch.allclose(shifted.means - 100.0, p.means, atol=1e-4)
    assert torch.allclose(shifted.scale_tril, p.scale_tril, atol=1e-4)
    order = torch.cdist(centres.float(), p.means).argmin(1)  # and it finds the correlated covariances
    fitted_cov = p.scale_tril[order] @ p.scale_tril[order].transpose(1, 2)
    true_cov = (true_tril @ true_tril.transpose(1, 2)).float()
    assert (fitted_cov - true_cov).norm() / true_cov.norm() < 0.1


def test_sampling_reproduces_the_mixture_and_a_seeds_first_latents():
    x, means, weights, _ = _three_clusters(4000)
    prior = fit_gaussian_mixture(x, components=3, seed=1).prior
    z = prior.sample(sample_latents(4000, 4, seed=5), component_uniforms(4000, seed=5))
    nearest = torch.cdist(z, means).argmin(1)
    share = torch.bincount(nearest, minlength=3).float() / len(z)
    assert torch.allclose(share, weights, atol=0.03), share
    # one component: exactly mean + L eps
    one = GaussianMixturePrior(2, 1)
    one.means.copy_(torch.tensor([[1.0, -2.0]]))
    one.scale_tril.copy_(torch.tensor([[[2.0, 0.0], [0.5, 3.0]]]))
    eps = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    assert torch.allclose(one.sample(eps, torch.tensor([0.3, 0.9])), torch.tensor([[3.0, 1.5], [1.0, -5.0]]))
    # a seed's first latents do not depend on how many are asked for, as without a prior
    model = torch.nn.Linear(1, 1)
    model.z_dim = 4
    assert torch.equal(seeded_latents(model, 1, 9, prior=prior), seeded_latents(model, 16, 9, prior=prior)[:1])


def test_fitting_refuses_what_no_model_should_give():
    with pytest.raises(ValueError, match="non-finite"):
        fit_gaussian_mixture(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="non-empty"):
        fit_gaussian_mixture(torch.zeros(0, 3))
    few = fit_gaussian_mixture(torch.randn(3, 5), components=10)  # fewer points than components
    assert few.prior.components == 3 and torch.isfinite(few.prior.scale_tril).all()
    with pytest.raises(ValueError, match="components must be an integer in 1..256"):
        GaussianMixturePrior(4, 10**6)


@pytest.fixture(scope="module")
def vae_run(mnist_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("prior_run")
    # 10 components (the default; the preset has 40): refits below compare with training's own fit
    # to 1e-5, and with 40 components on 8-d codes, EM carries the ~1e-8 gap between training's NHWC
    # encoding and a reload's NCHW one past that.
    cfg = tiny("vae-mnist", train__steps=150, model__width=16, train__global_batch_size=64, train__checkpoint_every=150,
               vae__prior_components=10)
    train_local(cfg, mnist_dir, run, log=quiet)
    return run, cfg


def test_a_vae_checkpoint_carries_the_prior_of_its_own_weights(vae_run, mnist_dir):
    """Refitting from the checkpoint's weights and the same seeded sample of training images gives
    the saved prior; and it describes held-out images' posterior means better than N(0, I)."""
    run, cfg = vae_run
    ckpt = load_checkpoint(run)
    prior = ckpt.latent_prior
    assert isinstance(prior, GaussianMixturePrior) and prior.components == cfg.vae.prior_components
    ds = PreparedDataset(mnist_dir)
    data = ds.sample("train", cfg.vae.prior_images, seed=cfg.train.seed)
    refit = fit_latent_prior(ckpt.inference_generator(), data.images, data.labels, cfg.vae.prior_components,
                             seed=cfg.train.seed)
    for name in ("weights", "means", "scale_tril"):
        # training encoded in NHWC (channels_last: auto on a CPU), this reload in NCHW: equal to ~1e-8
        assert torch.allclose(getattr(refit.prior, name), getattr(prior, name), atol=1e-5, rtol=1e-5), name
    mu = posterior_means(ckpt.inference_generator(), ds.load("val").images, None)
    mixture, standard = float(prior.log_prob(mu).mean()), float(standard_normal_log_prob(mu).mean())
    assert mixture > standard + 2.0, (mixture, standard)


def test_generation_draws_from_the_fitted_prior(vae_run):
    run, _ = vae_run
    ckpt = load_checkpoint(run)
    images, z, _ = generate(ckpt, 8, seed=4)
    expected = ckpt.latent_prior.sample(sample_latents(8, ckpt.inference_generator().z_dim, 4), component_uniforms(8, 4))
    assert torch.equal(z, expected)
    plain, z0, _ = generate(ckpt, 8, seed=4, standard_prior=True)
    assert torch.equal(z0, sample_latents(8, ckpt.inference_generator().z_dim, 4))
    assert not torch.allclose(images, plain)


def test_a_standard_prior_run_and_an_old_checkpoint_sample_n01(vae_run, mnist_dir, tmp_path):
    run, _ = vae_run
    old = tmp_path / "old"
    shutil.copytree(sorted(run.glob("step_*"))[-1], old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["modules"][LATENT_PRIOR]
    (old / "config.json").write_text(json.dumps(cfg))
    weights = {k: v for k, v in load_file(old / "model.safetensors").items() if not k.startswith(LATENT_PRIOR)}
    save_file(weights, str(old / "model.safetensors"))
    ckpt = load_checkpoint(old)  # written before priors were fitted: loads, samples N(0, I)
    assert ckpt.latent_prior is None
    _, z, _ = generate(ckpt, 4, seed=2)
    assert torch.equal(z, sample_latents(4, ckpt.inference_generator().z_dim, 2))
    standard = tmp_path / "standard"
    train_local(tiny("vae-mnist", train__steps=2, train__checkpoint_every=2, vae__prior="standard"), mnist_dir,
                standard, log=quiet)
    assert load_checkpoint(standard).latent_prior is None


def test_fit_prior_gives_an_old_checkpoint_the_prior_training_would_have_saved(vae_run, mnist_dir, tmp_path):
    """`latentforge fit-prior` on a checkpoint saved without a prior writes the one training saves
    (same defaults: the run's seed, components and image count), touching nothing else."""
    run, _ = vae_run
    trained = sorted(run.glob("step_*"))[-1]
    old = tmp_path / "old"
    shutil.copytree(trained, old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["modules"][LATENT_PRIOR]
    (old / "config.json").write_text(json.dumps(cfg))
    vae_weights = {k: v for k, v in load_file(old / "model.safetensors").items() if not k.startswith(LATENT_PRIOR)}
    save_file(vae_weights, str(old / "model.safetensors"))
    state = (old / "training_state.pt").read_bytes()

    assert main(["fit-prior", str(old), "--data", str(mnist_dir)]) == 0
    fitted, original = load_checkpoint(old), load_checkpoint(trained)
    for name in ("weights", "means", "scale_tril"):
        assert torch.allclose(getattr(fitted.latent_prior, name), getattr(original.latent_prior, name),
                              atol=1e-5, rtol=1e-5), name
    after = load_file(old / "model.safetensors")
    assert all(torch.equal(after[k], v) for k, v in vae_weights.items())  # the VAE is untouched
    assert (old / "training_state.pt").read_bytes() == state  # and so is what resumes it
    assert json.loads((old / "config.json").read_text())["experiment"] == cfg["experiment"]
    _, z, _ = generate(fitted, 8, seed=4)
    _, z_trained, _ = generate(original, 8, seed=4)
    assert torch.allclose(z, z_trained, atol=1e-4)

    # other settings refit it in place: one mixture, with the new number of components
    assert main(["fit-prior", str(old), "--data", str(mnist_dir), "--components", "3", "--images", "500"]) == 0
    refit = load_checkpoint(old)
    assert refit.latent_prior.components == 3 and refit.latent_prior.means.shape == (3, refit.latent_prior.means.shape[1])
    assert load_file(old / "model.safetensors")[f"{LATENT_PRIOR}.weights"].shape == (3,)
    kept = json.loads((old / "config.json").read_text())
    assert {k: kept[k] for k in ("step", "data", "metrics", "experiment")} == {k: cfg[k] for k in
                                                                             ("step", "data", "metrics", "experiment")}


def test_a_refit_stopped_between_its_writes_leaves_a_checkpoint_that_loads(vae_run, tmp_path, monkeypatch):
    """set_modules drops the prior from config.json before it rewrites the weights, so a process
    stopped after the weights (before the last config write) leaves a loadable checkpoint that
    samples N(0, I), never a config that does not match its weights."""
    import latentforge.checkpoint as checkpoint

    run, _ = vae_run
    ck = tmp_path / "ck"
    shutil.copytree(sorted(run.glob("step_*"))[-1], ck)
    writes = []

    def stop_at_the_second_config_write(path, obj):
        writes.append(path)
        if len(writes) == 2:
            raise KeyboardInterrupt
        return real(path, obj)

    real = checkpoint.atomic_write_json
    monkeypatch.setattr(checkpoint, "atomic_write_json", stop_at_the_second_config_write)
    three = fit_gaussian_mixture(torch.randn(50, load_checkpoint(ck).latent_prior.means.shape[1]), components=3).prior
    with pytest.raises(KeyboardInterrupt):
        checkpoint.set_modules(ck, {LATENT_PRIOR: three})
    assert load_file(ck / "model.safetensors")[f"{LATENT_PRIOR}.weights"].shape == (3,)  # the weights were written
    stopped = load_checkpoint(ck)
    assert stopped.latent_prior is None
    monkeypatch.undo()
    checkpoint.set_modules(ck, {LATENT_PRIOR: three})  # run again: it completes
    assert load_checkpoint(ck).latent_prior.components == 3


def test_fit_prior_refuses_what_it_cannot_fit_and_leaves_the_checkpoint_as_it_was(vae_run, mnist_dir, shapes_dir,
                                                                                tmp_path, capsys):
    run, _ = vae_run
    ck = tmp_path / "ck"
    shutil.copytree(sorted(run.glob("step_*"))[-1], ck)
    before = {f.name: f.read_bytes() for f in ck.iterdir()}
    (tmp_path / "model.json").write_text('{"kind": "latentforge.registry_entry"}')  # its hashes would go stale
    assert main(["fit-prior", str(ck), "--data", str(mnist_dir)]) == 2
    assert "is a registry's copy of a model" in capsys.readouterr().err
    (tmp_path / "model.json").unlink()
    assert main(["fit-prior", str(ck), "--data", str(shapes_dir)]) == 2
    assert "give the dataset it trained on" in capsys.readouterr().err
    assert main(["fit-prior", str(ck), "--data", str(mnist_dir), "--components", "1000"]) == 2
    assert "--components 1000 is out of range" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in ck.iterdir()} == before
    gan = tmp_path / "gan"
    train_local(tiny("dcgan-mnist", train__steps=1, train__checkpoint_every=1), mnist_dir, gan, log=quiet)
    assert main(["fit-prior", str(gan), "--data", str(mnist_dir)]) == 2
    assert "GANs sample N(0, I) by design" in capsys.readouterr().err


@pytest.mark.parametrize("name,value,message", [
    ("weights", torch.tensor([2.0] + [0.0] * 9), "weights are not a probability distribution"),
    ("means", None, "means hold non-finite values"),
    ("scale_tril", None, "not a lower-triangular factor with a positive diagonal"),
])
def test_a_planted_prior_is_refused_at_load(vae_run, tmp_path, name, value, message):
    run, _ = vae_run
    ck = tmp_path / "ck"
    shutil.copytree(sorted(run.glob("step_*"))[-1], ck)
    weights = load_file(ck / "model.safetensors")
    key = f"{LATENT_PRIOR}.{name}"
    if name == "means":
        value = weights[key].clone()
        value[0, 0] = float("nan")
    elif name == "scale_tril":
        value = weights[key].clone()
        value[0, 0, 1] = 1.0  # above the diagonal
    weights[key] = value
    save_file(weights, str(ck / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"module 'latent_prior': .*{message}"):
        load_checkpoint(ck)


def test_a_dataset_sample_is_seeded_bounded_and_drawn_from_the_split(mnist_dir):
    ds = PreparedDataset(mnist_dir)
    a, b = ds.sample("train", 300, seed=3), ds.sample("train", 300, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and len(a) == 300
    assert not torch.equal(ds.sample("train", 300, seed=4).images, a.images)
    full = ds.load("train")
    rows = {bytes(im.numpy()): int(y) for im, y in zip(full.images, full.labels)}
    assert all(rows.get(bytes(im.numpy())) == int(y) for im, y in zip(a.images, a.labels))
    assert len(ds.sample("train", 10**6, seed=0)) == len(full)  # capped by the split
    assert len(ds.sample("train", 10**6, seed=0, max_bytes=784 * 50)) == 50  # and by the pixel budget
