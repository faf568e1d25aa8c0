"""`evaluate` on checkpoints, image folders and .npz files; periodic evaluation; the Inception
backbone wiring (random weights: only the plumbing is under test, not paper numbers)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny
from latentforge.data import PreparedDataset, prepare_dataset
from latentforge.data.sources import SourceOptions
from latentforge.errors import LatentForgeError
from latentforge.metrics.evaluate import evaluate
from latentforge.train.local import train_local

quiet = lambda *_: None  # noqa: E731


def test_npz_and_folder_of_real_images_score_like_real_data(mnist_dir, mnist_features, tmp_path):
    val = PreparedDataset(mnist_dir).load("val").images  # (N, 1, 28, 28) uint8
    np.savez(tmp_path / "real.npz", images=val.numpy()[:, 0])
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(300):
        Image.fromarray(val[i, 0].numpy()).save(folder / f"{i:04d}.png")
    a = evaluate(tmp_path / "real.npz", mnist_dir, net=mnist_features, log=quiet)
    b = evaluate(folder, mnist_dir, net=mnist_features, log=quiet)
    assert a["samples"] == 500 and b["samples"] == 300
    # the k-NN metrics say how many images of each side they used: as many real as generated
    assert b["knn_samples"] == {"real": 300, "generated": 300}
    assert a["protocol"] == "500_train_lfclassifier" and b["protocol"] == "300_train_lfclassifier"
    assert a["fid500_train_lfclassifier"] < 15 and a["class_coverage500_train_lfclassifier"] == 1.0
    assert a["backbone"] == mnist_features.backbone


def test_wrong_shapes_and_bad_files_are_refused(mnist_dir, mnist_features, tmp_path):
    np.savez(tmp_path / "rgb.npz", images=np.zeros((10, 32, 32, 3), np.uint8))
    with pytest.raises(LatentForgeError, match=r"\(32, 32, 3\).*\(28, 28, 1\)"):
        evaluate(tmp_path / "rgb.npz", mnist_dir, net=mnist_features, log=quiet)
    np.savez(tmp_path / "float.npz", images=np.zeros((10, 28, 28), np.float32))
    with pytest.raises(LatentForgeError, match="uint8"):
        evaluate(tmp_path / "float.npz", mnist_dir, net=mnist_features, log=quiet)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(LatentForgeError, match="neither a checkpoint"):
        evaluate(tmp_path / "x.txt", mnist_dir, net=mnist_features, log=quiet)
    (tmp_path / "junk.npz").write_bytes(b"PK not really a zip")
    with pytest.raises(LatentForgeError, match="it is not an .npz of uint8 arrays"):
        evaluate(tmp_path / "junk.npz", mnist_dir, net=mnist_features, log=quiet)
    np.savez(tmp_path / "whole.npz", images=np.zeros((20, 28, 28), np.uint8))
    (tmp_path / "torn.npz").write_bytes((tmp_path / "whole.npz").read_bytes()[:200])  # a real .npz, cut short
    with pytest.raises(LatentForgeError, match="it is not an .npz of uint8 arrays"):
        evaluate(tmp_path / "torn.npz", mnist_dir, net=mnist_features, log=quiet)
    np.savez(tmp_path / "none.npz")
    with pytest.raises(LatentForgeError, match="holds no arrays"):
        evaluate(tmp_path / "none.npz", mnist_dir, net=mnist_features, log=quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatentForgeError, match="holds no image files .* and no checkpoint; give a checkpoint or run"):
        evaluate(tmp_path / "empty", mnist_dir, net=mnist_features, log=quiet)
    (tmp_path / "early-run").mkdir()  # a run whose first checkpoint is not written yet: not "no image files"
    (tmp_path / "early-run" / "metrics.jsonl").write_text('{"step": 25}\n')
    with pytest.raises(LatentForgeError, match="is a run folder with no checkpoint yet"):
        evaluate(tmp_path / "early-run", mnist_dir, net=mnist_features, log=quiet)
    (tmp_path / "sweep" / "tune").mkdir(parents=True)  # a sweep still running: its best is not known yet
    (tmp_path / "sweep" / "sweep.json").write_text('{"sweep": {}}')
    for target in (tmp_path / "sweep", tmp_path / "sweep" / "tune"):
        with pytest.raises(LatentForgeError, match="has no best checkpoint yet"):
            evaluate(target, mnist_dir, net=mnist_features, log=quiet)
    for n in (0, 1):  # too few for a covariance: refused, not a linear-algebra error
        np.savez(tmp_path / f"n{n}.npz", images=np.zeros((n, 28, 28), np.uint8))
        with pytest.raises(LatentForgeError, match=f"holds {n} images: scoring needs at least 10"):
            evaluate(tmp_path / f"n{n}.npz", mnist_dir, net=mnist_features, log=quiet)


def test_periodic_evaluation_reports_fid_with_training_metrics(mnist_dir, mnist_features, tmp_path):
    cfg = tiny("cvae-mnist", train__steps=20, train__eval_every=10, train__eval_samples=200)
    train_local(cfg, mnist_dir, tmp_path, log=quiet)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "fid" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(r["eval_samples"] == 200 and "class_accuracy" in r and "recon_psnr" in r for r in evals)


def test_no_ema_scores_the_raw_generator(mnist_dir, mnist_features, tmp_path):
    """Early in training the EMA copy lags the raw generator far behind (decay ramps up from 0):
    the two score differently, and the result says which one was scored."""
    cfg = tiny("dcgan-mnist", train__steps=30, train__checkpoint_every=30)
    train_local(cfg, mnist_dir, tmp_path, log=quiet)
    ema = evaluate(tmp_path, mnist_dir, samples=300, net=mnist_features, log=quiet)
    raw = evaluate(tmp_path, mnist_dir, samples=300, net=mnist_features, ema=False, log=quiet)
    assert (ema["generator"], raw["generator"]) == ("ema", "raw")
    assert ema["fid300_train_lfclassifier"] != raw["fid300_train_lfclassifier"]
    vae = tiny("vae-mnist", train__steps=2, train__checkpoint_every=2)
    train_local(vae, mnist_dir, tmp_path / "vae", log=quiet)
    with pytest.raises(LatentForgeError, match="only GANs keep an EMA copy"):
        evaluate(tmp_path / "vae", mnist_dir, samples=100, net=mnist_features, ema=False, log=quiet)
    for n in (0, 10**9):
        with pytest.raises(LatentForgeError, match=f"--samples {n} is out of range"):
            evaluate(tmp_path, mnist_dir, samples=n, net=mnist_features, log=quiet)


def test_inception_backbone_is_named_and_never_mixed(tmp_path):
    from torchvision.models import inception_v3

    data = tmp_path / "digits"
    prepare_dataset("digits", data, SourceOptions(count=60, size=16), log=quiet)
    weights = tmp_path / "inception.pth"
    torch.manual_seed(0)
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(), weights)
    np.savez(tmp_path / "fake.npz", images=np.zeros((20, 16, 16), np.uint8))
    r = evaluate(tmp_path / "fake.npz", data, inception=weights, log=quiet)
    assert r["backbone"].startswith("torchvision-inception-v3-clean@")
    assert r["protocol"] == "20_train_inceptionv3clean"  # the backbone and its input protocol are in every key
    assert not any(k.startswith("class_coverage") for k in r)  # ImageNet classes are not the dataset's classes
    assert np.isfinite(r["fid20_train_inceptionv3clean"]) and r["fid20_train_inceptionv3clean"] > 0
    (tmp_path / "bad.pth").write_bytes(b"nope")
    with pytest.raises(LatentForgeError, match="safely"):
        evaluate(tmp_path / "fake.npz", data, inception=tmp_path / "bad.pth", log=quiet)


def test_a_rank_deficient_fid_says_so():
    """Fewer images a side than the features have dimensions make FID's covariance singular: the
    number is biased high, and the result says why and what to change."""
    import torch

    from latentforge.metrics.evaluate import rank_warning
    from latentforge.metrics.features import RealStats

    real = RealStats(mu=torch.zeros(2048, dtype=torch.float64), sigma=torch.eye(2048, dtype=torch.float64),
                     features=torch.zeros(584, 2048), labels=None, class_share=None)
    said = rank_warning(1000, real, "val")
    assert "1000 generated and 584 real (val split)" in said and "--samples above 2048" in said
    small = RealStats(mu=torch.zeros(64, dtype=torch.float64), sigma=torch.eye(64, dtype=torch.float64),
                      features=torch.zeros(500, 64), labels=None, class_share=None)
    assert rank_warning(500, small, "train") is None


def test_float_samples_score_as_the_8_bit_files_they_would_be_saved_as(mnist_dir, mnist_features):
    """`evaluate CKPT` (float samples) and `generate` then `evaluate FOLDER` (8-bit files) gave
    different numbers for the same images with the dataset's classifier: only Inception's clean
    protocol rounded. Every backbone now scores generated images as 8-bit, like the real ones."""
    import torch

    from latentforge.images import to_model_range, to_uint8
    from latentforge.metrics.evaluate import distribution_metrics

    real = PreparedDataset(mnist_dir).load("val").images[:200]
    fake = (to_model_range(real) + 0.003 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    as_float = distribution_metrics(fake, mnist_features)
    as_files = distribution_metrics(to_model_range(to_uint8(fake)), mnist_features)
    assert as_float == as_files


def test_a_conditional_model_is_asked_for_the_classes_in_the_splits_proportions():
    """Cycling asks for every class equally; scored against an imbalanced split (crawl-tiles: 10-36%
    per class) a perfect conditional generator then showed a label_kl of 0.09 nats and a FID above
    the floor. The labels now follow the split's class shares, exactly where whole numbers allow."""
    import torch
    from torch import nn

    from latentforge.metrics.distribution import label_kl
    from latentforge.sampling import evaluation_labels, share_labels

    share = torch.tensor([0.355, 0.096, 0.2, 0.349], dtype=torch.float64)
    labels = share_labels(1000, share, seed=3)
    assert torch.bincount(labels, minlength=4).tolist() == [355, 96, 200, 349]
    assert torch.equal(labels, share_labels(1000, share, seed=3)) and not torch.equal(labels, share_labels(1000, share, 4))
    assert label_kl(labels, share) < 1e-5 < 0.05 < label_kl(torch.arange(1000) % 4, share)  # add-one smoothing: not 0
    assert torch.bincount(share_labels(7, share, 0), minlength=4).sum() == 7  # remainders go to the largest fractions

    class Conditional(nn.Module):
        num_classes = 4

    assert torch.equal(evaluation_labels(Conditional(), 1000, share, 3), labels)
    assert torch.equal(evaluation_labels(Conditional(), 8, None, 3), torch.arange(8) % 4)  # shares unknown: cycle
    assert evaluation_labels(nn.Linear(1, 1), 8, share, 3) is None


def test_evaluate_and_periodic_evaluation_ask_for_the_splits_class_proportions(mnist_dir, mnist_features, tmp_path,
                                                                                monkeypatch):
    """The wiring: both scoring paths hand a conditional model labels in the split's manifest
    proportions (the same for any backbone), not a cycle through the classes."""
    import torch

    import latentforge.metrics.periodic as periodic
    import latentforge.sampling as sampling
    from helpers import tiny
    from latentforge.metrics.evaluate import split_class_share
    from latentforge.sampling import share_labels
    from latentforge.train.local import train_local

    train_local(tiny("cdcgan-mnist", train__steps=2, train__checkpoint_every=2), mnist_dir, tmp_path / "run",
                log=quiet)
    share = split_class_share(PreparedDataset(mnist_dir), "train")
    assert share.tolist() == [float(v) for v in PreparedDataset(mnist_dir).manifest["splits"]["train"]["class_counts"].values()]
    asked = {}

    class Stop(Exception):
        pass

    def spy(*args, labels=None, **kwargs):
        asked["evaluate"] = labels
        raise Stop

    monkeypatch.setattr(sampling, "generate", spy)
    import dataclasses

    # as an Inception backbone's real statistics: no class shares of their own (the manifest's count)
    no_share = dataclasses.replace(mnist_features, real={k: dataclasses.replace(v, class_share=None)
                                                         for k, v in mnist_features.real.items()})
    with pytest.raises(Stop):
        evaluate(tmp_path / "run", mnist_dir, samples=500, seed=4, net=no_share, log=quiet)
    assert torch.equal(asked["evaluate"], share_labels(500, share, 4))

    def spy_latents(model, n, seed, labels=None, prior=None):
        asked["periodic"] = labels
        raise Stop

    monkeypatch.setattr(periodic, "seeded_latents", spy_latents)
    monkeypatch.setattr(periodic, "load_feature_net", lambda *a, **k: no_share)
    from latentforge.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "run")

    class Program:
        algorithm = "gan"

        def modules(self):
            return {"generator_ema": ckpt.inference_generator()}

    with pytest.raises(Stop):
        periodic.make_periodic_evaluator(mnist_dir, 300, seed=2)(Program(), 2)
    assert torch.equal(asked["periodic"], share_labels(300, share, 2))


def test_a_vae_on_data_without_a_validation_split_is_scored_without_reconstructions(tmp_path):
    """`data prepare --val-fraction 0` is allowed; scoring a VAE on it divided by zero in the ELBO
    (and SSIM raised on an empty batch), which also crashed training at its first evaluation."""
    from latentforge.builders import build_vae
    from latentforge.data.spec import DataSpec
    from latentforge.metrics.evaluate import vae_reconstruction_metrics

    out = tmp_path / "digits"
    prepare_dataset("digits", out, SourceOptions(count=60, size=28, channels=1), val_fraction=0.0, log=lambda *_: None)
    ds = PreparedDataset(out)
    assert ds.manifest["splits"]["val"]["count"] == 0
    vae = build_vae(tiny("vae-mnist").model, DataSpec.from_dataset(ds))
    assert vae_reconstruction_metrics(vae, ds, 0.1) == {"images": 0}


def test_non_finite_samples_score_nan_not_a_finite_fid(mnist_features):
    from latentforge.metrics.evaluate import distribution_metrics

    fake = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fine = distribution_metrics(fake, mnist_features, "train")
    fake[3, 0, 5, 5] = float("nan")  # one pixel of one sample, as a diverging generator starts
    broken = distribution_metrics(fake, mnist_features, "train")
    assert set(broken) == set(fine) and all(v == v for v in fine.values() if isinstance(v, float))
    assert all(v != v for v in broken.values())
