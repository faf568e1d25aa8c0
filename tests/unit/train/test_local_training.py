import json

import torch
from safetensors.torch import load_file

from helpers import tiny
from latentforge.algorithms.vae import vae_negative_elbo
from latentforge.data.spec import DataSpec
from latentforge.builders import build_gan
from latentforge.checkpoint import find_checkpoints, load_checkpoint
from latentforge.data import PreparedDataset
from latentforge.images import to_model_range
from latentforge.metrics.two_sample import c2st_accuracy
from latentforge.sampling import generate
from latentforge.train.local import train_local

quiet = lambda *_: None  # noqa: E731


def test_run_folder_layout_and_checkpoint_pruning(mnist_dir, tmp_path):
    cfg = tiny("dcgan-mnist", train__steps=12, train__checkpoint_every=3, train__num_to_keep=2, train__sample_every=6)
    train_local(cfg, mnist_dir, tmp_path, log=quiet)
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_000009", "step_000012"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 12 and records[-1]["last_checkpoint"] == "step_000012"
    assert {"d_loss", "g_loss", "grad_norm_d", "images_per_sec", "global_batch_size", "per_worker_batch_size"} <= set(records[-1])
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000000.png", "step_000006.png", "step_000012.png"]
    assert (tmp_path / "run.json").is_file()


def test_resume_continues_exactly(mnist_dir, tmp_path):
    """20 steps straight == 10 steps, stop, resume to 20: weights, EMA and D bit-identical."""
    straight = tiny("dcgan-mnist", train__steps=20, train__checkpoint_every=10)
    train_local(straight, mnist_dir, tmp_path / "a", log=quiet)
    first = tiny("dcgan-mnist", train__steps=10, train__checkpoint_every=10)
    train_local(first, mnist_dir, tmp_path / "b", log=quiet)
    train_local(straight, mnist_dir, tmp_path / "b", resume=True, log=quiet)
    a = load_file(tmp_path / "a" / "step_000020" / "model.safetensors")
    b = load_file(tmp_path / "b" / "step_000020" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 20


def test_the_checkpointed_ema_generator_carries_its_own_batchnorm_statistics(mnist_dir, tmp_path):
    """Not the live generator's, which the EMA update copies every step: recomputing the standing
    statistics of the checkpoint's EMA generator changes nothing, and they differ from the live one's."""
    from latentforge.algorithms.ema import STANDING_SEED_OFFSET, standing_batchnorm_stats

    cfg = tiny("cdcgan-mnist", train__steps=6, gan__lr_g=5e-3, gan__lr_d=5e-3)
    train_local(cfg, mnist_dir, tmp_path, log=quiet)
    saved = load_file(find_checkpoints(tmp_path)[-1] / "model.safetensors")
    stats = [k for k in saved if k.startswith("generator_ema.") and k.endswith("running_mean")]
    assert stats and not all(torch.allclose(saved[k], saved[k.replace("generator_ema.", "generator.", 1)], atol=1e-4)
                             for k in stats)
    g = load_checkpoint(tmp_path).inference_generator()
    standing_batchnorm_stats(g, seed=cfg.train.seed + STANDING_SEED_OFFSET)
    again = {f"generator_ema.{k}": v for k, v in g.state_dict().items()}
    for k in stats:
        assert torch.allclose(again[k], saved[k], atol=1e-5), k


def test_a_dead_run_says_so_once_and_a_healthy_one_never(mnist_dir, tmp_path):
    """At lr 1.0 G's gradient vanishes within a few steps: the log says which failure it is and what
    to try, once, and training goes on to the steps asked for (sweeps stop such trials instead)."""
    lines = []
    dead = tiny("dcgan-mnist", train__steps=12, train__log_every=2, gan__lr_g=1.0, gan__lr_d=1.0)
    train_local(dead, mnist_dir, tmp_path / "dead", log=lines.append)
    warnings = [line for line in lines if line.startswith("warning: this run looks unstable")]
    assert len(warnings) == 1 and "vanishing_generator_gradient" in warnings[0] and "learning rates" in warnings[0]
    assert find_checkpoints(tmp_path / "dead")[-1].name == "step_000012"
    lines.clear()
    train_local(tiny("dcgan-mnist", train__steps=12, train__log_every=2), mnist_dir, tmp_path / "ok", log=lines.append)
    assert not [line for line in lines if line.startswith("warning")]


def test_vae_learning_lowers_validation_elbo(mnist_dir, tmp_path):
    cfg = tiny("vae-mnist", train__steps=250, model__width=16, model__z_dim=16, train__global_batch_size=64,
               train__checkpoint_every=250)
    val = PreparedDataset(mnist_dir).load("val")
    x = to_model_range(val.images)
    train_local(cfg, mnist_dir, tmp_path, log=quiet)
    # the untrained baseline: the same architecture and seed at step 0
    from latentforge.builders import build_vae

    torch.manual_seed(cfg.train.seed)
    untrained = build_vae(cfg.model, DataSpec.from_dataset(PreparedDataset(mnist_dir)))
    before = vae_negative_elbo(untrained, x, None)["neg_elbo"]
    after = vae_negative_elbo(load_checkpoint(tmp_path).modules["vae"], x, None)["neg_elbo"]
    assert before > 500  # ≈ 784·ln 2 for a decoder that predicts 0.5 everywhere
    assert after < 0.45 * before, (before, after)


def test_gan_training_makes_fakes_harder_to_tell_apart(mnist_dir, tmp_path):
    """A fresh discriminator separates real digits from the untrained generator's output almost
    perfectly; after training, the same classifier budget does clearly worse."""
    cfg = tiny("dcgan-mnist", train__steps=300, model__g_width=16, model__d_width=16, model__z_dim=32,
               train__global_batch_size=64, train__checkpoint_every=300)
    train_local(cfg, mnist_dir, tmp_path, log=quiet)
    ds = PreparedDataset(mnist_dir)
    real = to_model_range(ds.load("val").images)[:400]
    trained = load_checkpoint(tmp_path)
    fake_trained, _, _ = generate(trained, 400, seed=1)
    torch.manual_seed(cfg.train.seed)
    g0, _ = build_gan(cfg.model, DataSpec.from_dataset(ds))
    with torch.no_grad():
        fake_untrained = g0.eval()(torch.randn(400, cfg.model.z_dim))
    acc_untrained = c2st_accuracy(real, fake_untrained, steps=150)
    acc_trained = c2st_accuracy(real, fake_trained, steps=150)
    assert acc_untrained > 0.95, acc_untrained
    assert acc_trained < acc_untrained - 0.05, (acc_untrained, acc_trained)


def test_discriminator_separates_real_from_fake_after_training(mnist_dir, tmp_path):
    """Trained D ranks real digits above fakes; the same D at initialisation does not."""
    cfg = tiny("sngan-hinge-mnist", train__steps=60, train__checkpoint_every=60)
    train_local(cfg, mnist_dir, tmp_path, log=quiet)
    ck = load_checkpoint(tmp_path)
    real = to_model_range(PreparedDataset(mnist_dir).load("val").images)[:200]
    fake, _, _ = generate(ck, 200, seed=5)

    def separation(d):
        with torch.no_grad():
            return (d(real) > d(fake).median()).float().mean().item()

    torch.manual_seed(cfg.train.seed)
    _, d0 = build_gan(cfg.model, DataSpec.from_dataset(PreparedDataset(mnist_dir)))
    assert separation(d0.eval()) < 0.75
    assert separation(ck.modules["discriminator"]) > 0.9


def test_a_windows_speed_leaves_out_the_time_spent_readying_samples(mnist_dir, tmp_path, monkeypatch):
    """Readying the model for a sample grid (a GAN's standing BatchNorm statistics, a VAE's prior
    fit) is not training: a window that holds it reports the speed of its steps, not of the steps
    and the grid together. Here readying takes 1 s; a tiny model's 2 steps take milliseconds."""
    import time

    import latentforge.train.program as program_module

    real = program_module.standing_batchnorm_stats

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(program_module, "standing_batchnorm_stats", slow)
    cfg = tiny("dcgan-mnist", train__steps=6, train__log_every=2, train__sample_every=2, train__checkpoint_every=6)
    train_local(cfg, mnist_dir, tmp_path, log=quiet)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4, 6]  # every window after the first ends with a grid
    assert all(r["step_time_s"] < 0.25 for r in records), [r["step_time_s"] for r in records]
