"""Device placement, checked on a CPU-only machine: every module must receive its inputs on the
device its parameters live on. The model is moved to the "meta" device (shapes, no data), and a
forward pre-hook on every module with parameters raises `WrongDevice` when an input tensor sits
elsewhere. Code that forgets to move data to the model's device (the class of bug that made every
VAE run with periodic evaluation on --gpus fail) trips the hook; code that moves it runs on until
it first needs real numbers, which meta tensors do not have."""

import pytest
import torch

from helpers import CHECKED, WrongDevice, guard_checkpoint_loads, on_meta_with_guard, runs_on_the_model_device
from latentforge.data.dataset import PreparedDataset
from latentforge.models.vae import ConvVAE
from latentforge.sampling import decode_latents


def test_guard_catches_a_cpu_input_to_a_model_elsewhere():
    vae = on_meta_with_guard(ConvVAE(z_dim=4, channels=1, resolution=8, width=4))
    with pytest.raises(WrongDevice, match="on meta but got an input on cpu"):
        vae.encode(torch.zeros(2, 1, 8, 8))


def test_vae_reconstruction_metrics_move_the_validation_split_to_the_model(mnist_dir):
    from latentforge.metrics.evaluate import vae_reconstruction_metrics

    vae = on_meta_with_guard(ConvVAE(z_dim=4, channels=1, resolution=28, width=4))
    runs_on_the_model_device(lambda: vae_reconstruction_metrics(vae, PreparedDataset(mnist_dir), 0.1, max_images=8))


def test_negative_elbo_and_decoding_move_their_inputs(mnist_dir):
    from latentforge.algorithms.vae import vae_negative_elbo

    vae = on_meta_with_guard(ConvVAE(z_dim=4, channels=1, resolution=8, width=4, num_classes=3))
    labels = torch.tensor([0, 1, 2])
    runs_on_the_model_device(lambda: vae_negative_elbo(vae, torch.zeros(3, 1, 8, 8), labels))
    runs_on_the_model_device(lambda: decode_latents(vae, torch.zeros(3, 4), labels))


def test_evaluate_runs_the_checkpoint_on_the_device_asked_and_leaves_the_callers_backbone_where_it_was(
        mnist_dir, mnist_features, tmp_path, monkeypatch):
    """`evaluate --device`: the checkpoint is loaded on that device and every generator forward
    gets its inputs there (a GAN, and a VAE's decoder: from N(0, I) here, as its fitted prior's
    sampling needs real numbers before the decoder runs; it moves its noise to the prior's device
    and back); the dataset's backbone is copied there, so the cached one the caller passed stays
    on the CPU."""
    import latentforge.checkpoint as checkpoint_module
    from helpers import tiny
    from latentforge.metrics.evaluate import MIN_SAMPLES, evaluate
    from latentforge.train.local import train_local

    devices = guard_checkpoint_loads(monkeypatch, checkpoint_module)
    for preset in ("dcgan-mnist", "vae-mnist"):
        train_local(tiny(preset, train__steps=2, train__checkpoint_every=2), mnist_dir, tmp_path / preset, log=lambda *_: None)
        runs_on_the_model_device(lambda: evaluate(tmp_path / preset, mnist_dir, samples=MIN_SAMPLES, net=mnist_features,
                                                  standard_prior=preset == "vae-mnist", device="meta",
                                                  log=lambda *_: None))
    assert devices == ["meta", "meta"]
    assert next(mnist_features.model.parameters()).device.type == "cpu"


def test_edit_eval_projects_on_the_device_asked_and_measures_on_the_cpu(mnist_dir, mnist_features, tmp_path, monkeypatch):
    """`edit-eval --device`: the checkpoint is loaded there, and every section (reconstruction,
    inpainting, denoising, directions, interpolation) hands the model its inputs there from the CPU
    images and latents. Meta tensors hold no numbers, so what comes back to the CPU (an inversion,
    decoded images) comes back as zeros of the right shape after the guarded forward passes;
    missing directions are computed from a CPU load, and the cached feature network stays on the CPU."""
    import dataclasses
    import types

    import latentforge.checkpoint as checkpoint_module
    import latentforge.metrics.grader as grader_module
    from helpers import tiny
    from latentforge.editing import inversion, quality
    from latentforge.train.local import train_local

    devices = guard_checkpoint_loads(monkeypatch, checkpoint_module)

    def back_as_zeros(inv, device):
        return dataclasses.replace(inv, **{f.name: torch.zeros(v.shape, device=device) for f in dataclasses.fields(inv)
                                           if isinstance(v := getattr(inv, f.name), torch.Tensor)})

    real_decode = quality.decode_latents

    def decode(net, z, labels=None, **kw):
        if next(net.parameters()).device.type != "meta":
            return real_decode(net, z, labels, **kw)
        with torch.no_grad():
            out = net.decode(z.to("meta"), None if labels is None else labels.to("meta"))  # guarded
        return torch.zeros(out.shape)

    monkeypatch.setattr(inversion, "_back", back_as_zeros)
    monkeypatch.setattr(quality, "decode_latents", decode)
    fake_grader = types.SimpleNamespace(name="g", accuracy=1.0, predict=lambda images: torch.zeros(len(images), dtype=torch.long))
    monkeypatch.setattr(grader_module, "ensure_grader", lambda *a, **k: fake_grader)  # not what is under test
    for preset in ("dcgan-mnist", "vae-mnist"):  # unconditional: class boundaries and class means are computed too
        train_local(tiny(preset, train__steps=2, train__checkpoint_every=2), mnist_dir, tmp_path / preset, log=lambda *_: None)
        before = CHECKED["inputs"]
        out = quality.edit_eval(str(tmp_path / preset), str(mnist_dir), images=4, project_steps=2, device="meta", log=lambda *_: None)
        assert CHECKED["inputs"] > before and out["directions"]
        assert "interp_pairs" in out and "denoise_gain_db_sigma0.3" in out and "inpaint_random_optimize_psnr" in out
    assert devices == ["meta", "cpu"] * 2  # the run's checkpoint on the device; its directions from a CPU load
    assert next(mnist_features.model.parameters()).device.type == "cpu"
