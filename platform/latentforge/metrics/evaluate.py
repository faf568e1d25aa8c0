"""Score generated images (from a checkpoint or from any other generator) against a dataset.

Every result names its backbone, sample count, seed and reference split; numbers from different
backbones are never mixed in one result.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from latentforge.devices import on_device
from latentforge.data.dataset import PreparedDataset

from latentforge.images import flatten_alpha, to_model_range
from latentforge.errors import LatentForgeError
from latentforge.metrics.features import MAX_STORED_FEATURES, FeatureNet
from latentforge.models.prior import prior_name
from latentforge.metrics.registry import (
    knn_count,
    MAX_SAMPLES,
    MIN_SAMPLES,
    SampleSet,
    distribution_values,
    protocol_key,
    protocol_suffix,
    reconstruction_suffix,
)


def distribution_metrics(fake: torch.Tensor, net: FeatureNet, reference: str = "train", seed: int = 0,
                         requested_labels: torch.Tensor | None = None) -> dict:
    """Every registered distribution metric (metrics.registry) of generated images against a real
    split, under its bare name.

    Args:
        fake: (N, C, H, W) in [-1, 1].
        net: the dataset's feature network and real statistics.
        reference: the real split to compare with ('train' or 'val').
        seed: seeds KID subsets.
        requested_labels: for a conditional model, the class each image was asked to be.

    Returns:
        fid, kid (+std), precision, recall, density, coverage; with a classifier backbone also
        inception_score, class_coverage, label_kl and (conditional) class_accuracy.
    """
    if reference not in net.real:
        raise LatentForgeError(f"no real statistics for split {reference!r}; choose one of: {', '.join(net.real)}")
    # scored as the 8-bit images they would be saved as, like the real ones: a checkpoint's float
    # samples and the same samples saved and scored as files then give the same numbers
    feats, probs = net.embed(fake, as_8bit=True)
    values = distribution_values(SampleSet(net.real[reference], feats, probs, seed, requested_labels))
    if fake.is_floating_point() and not bool(torch.isfinite(fake).all()):
        # NaN pixels became black ones in 8 bits, and a diverged generator a finite, merely bad FID
        # that no stopper or sweep could tell from a weak one: every metric is NaN instead
        values = {k: float("nan") for k in values}
    return values


def split_class_share(ds: PreparedDataset, split: str) -> torch.Tensor | None:
    """A split's class shares (K,) from its manifest's class counts (whatever the backbone), or
    None for unlabelled data or a manifest without them."""
    counts = ds.manifest.get("splits", {}).get(split, {}).get("class_counts")
    if not ds.num_classes or not counts:
        return None
    return torch.tensor([float(counts.get(str(k), 0)) for k in range(ds.num_classes)], dtype=torch.float64)


def rank_warning(generated: int, real, reference: str) -> str | None:
    """Why an FID is biased, where either side has no more images than the features have
    dimensions: its covariance is then rank-deficient (Inception's 2048-d pool features need more
    than 2,048 images a side). None where both sides have enough."""
    dim = int(real.mu.shape[0])
    real_n = len(real.features)  # the whole split where it is under the stored cap
    short = ([f"{generated} generated"] if generated <= dim else []) + (
        [f"{real_n} real ({reference} split)"] if real_n <= dim and real_n < MAX_STORED_FEATURES else [])
    if not short:
        return None
    return (f"the FID's covariance of {dim}-d features is rank-deficient with {' and '.join(short)} images, so the FID "
            f"is biased high; use --samples above {dim} (and a reference split of more than {dim} images)")


def load_image_file_set(path: str | Path, expected_shape: tuple[int, int, int]) -> torch.Tensor:
    """Generated images from another generator: a folder of image files or an .npz array
    ((N, H, W[, C]) or (N, C, H, W) uint8, key 'images' or the first array). → (N, C, H, W) in [-1, 1].

    Raises:
        LatentForgeError: unreadable input or a shape that does not match the dataset.
    """
    from latentforge.data.sources import IMAGE_EXTENSIONS, decode_image

    path = Path(path)
    c, h, w = expected_shape
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            if any((path / f).exists() for f in ("run.json", "metrics.jsonl")):  # a training run's folder
                raise LatentForgeError(f"{path} is a run folder with no checkpoint yet: evaluate it once training has "
                                       "written one (train.checkpoint_every; a run also saves one at its end)")
            raise LatentForgeError(f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)}) and no checkpoint; "
                                   "give a checkpoint or run folder, or a folder or .npz of generated images")
        arrays = []
        for f in files:
            img = flatten_alpha(decode_image(f, str(f))).convert("L" if c == 1 else "RGB")  # as data prepare reads it
            if img.size != (w, h):
                raise LatentForgeError(f"{f} is {img.size[0]}x{img.size[1]}; the dataset's images are {w}x{h}")
            arrays.append(np.asarray(img, np.uint8).reshape(h, w, c))
        x = np.stack(arrays)
    elif path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                if not z.files:
                    raise LatentForgeError(f"{path} holds no arrays: save the images as np.savez(path, images=x)")
                x = z["images"] if "images" in z.files else z[z.files[0]]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            # np.load on a file that is not an .npz guesses at pickles; what matters is what it is not
            raise LatentForgeError(f"cannot read {path}: it is not an .npz of uint8 arrays "
                                   "(save the images as np.savez(path, images=x), x of shape (N, H, W, C))") from e
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim == 4 and x.shape[1] == c and x.shape[-1] != c:
            x = x.transpose(0, 2, 3, 1)
        if x.ndim != 4 or x.shape[1:] != (h, w, c):
            raise LatentForgeError(f"{path} holds images of shape {x.shape[1:]}, the dataset's are {(h, w, c)} (H, W, C)")
        if x.dtype != np.uint8:
            raise LatentForgeError(f"{path}: images must be uint8 in [0, 255] (got {x.dtype})")
    else:
        raise LatentForgeError(f"{path} is neither a checkpoint, an image folder nor an .npz file")
    return to_model_range(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))


def vae_reconstruction_metrics(vae, dataset: PreparedDataset, sigma: float, max_images: int = 5000) -> dict:
    """Reconstruction MSE/PSNR/SSIM (posterior mean) and −ELBO on the validation split; only
    {"images": 0} for a dataset prepared without one (`--val-fraction 0`)."""
    from latentforge.algorithms.vae import vae_negative_elbo
    from latentforge.metrics.reconstruction import mse, psnr, ssim

    val = dataset.load("val")
    if len(val) == 0:  # the ELBO divided by zero and SSIM raised on an empty batch
        return {"images": 0}
    device = next(vae.parameters()).device  # the model may live on a GPU; the split is read on the CPU
    x = to_model_range(val.images[:max_images]).to(device)
    y = None if val.labels is None or not vae.num_classes else val.labels[:max_images].to(device)
    was_training = vae.training
    vae.eval()
    try:
        with torch.no_grad():  # in chunks: 5,000 images of 128 px at once do not fit a 24 GB GPU
            xs = x.split(500)
            ys = [None] * len(xs) if y is None else y.split(500)
            recon = torch.cat([vae.decode(vae.encode(xc, yc)[0], yc) for xc, yc in zip(xs, ys)])
    finally:
        vae.train(was_training)
    elbo = vae_negative_elbo(vae, x, y, sigma=sigma)
    return {"images": len(x), "recon_mse": float(mse(recon, x).mean()), "recon_psnr": float(psnr(recon, x).mean()),
            "recon_ssim": float(ssim(recon, x).mean()), "val_neg_elbo": elbo["neg_elbo"],
            "val_nll": elbo["nll"], "val_kl": elbo["kl"]}


def evaluate(target: str | Path, dataset_dir: str | Path, samples: int = 5000, seed: int = 0,
             reference: str = "train", net: FeatureNet | None = None, inception: str | Path | None = None,
             ema: bool = True, inception_protocol: str = "clean", standard_prior: bool = False, log=print,
             device: str | torch.device = "cpu") -> dict:
    """Score a checkpoint (or run folder) or a set of generated images against a dataset.

    The backbone is the dataset's own feature network, or Inception-v3 when `inception` names a
    weights file (its input prepared by `inception_protocol`, "clean" or "legacy": see
    metrics.inception); one result never mixes backbones or protocols.

    `ema=False` scores a GAN checkpoint's raw generator instead of its EMA copy;
    `standard_prior=True` a VAE's samples from N(0, I) instead of its fitted latent prior.
    `device` runs the generator and the backbone there (a GPU for 50,000 samples); the statistics
    are computed on the CPU in float64 either way.

    Returns:
        One flat dict: every metric under its protocol-named key (`fid5k_train_lfclassifier`:
        metrics.registry.protocol_key; the VAE's reconstruction metrics `recon_psnr500_val`), the
        suffixes as `protocol` / `reconstruction_protocol`, plus backbone, samples, seed,
        reference, timing.
    """
    from latentforge.checkpoint import holds_checkpoint, load_checkpoint
    from latentforge.metrics.features import ensure_feature_net
    from latentforge.sampling import evaluation_labels, generate

    t0 = time.time()
    ds = PreparedDataset(dataset_dir)
    if net is None and inception is not None:
        from latentforge.metrics.inception import load_inception_net

        net = load_inception_net(dataset_dir, inception, inception_protocol, log=log)
    net = net or ensure_feature_net(dataset_dir, log=log)
    if not on_device(net.model, device):  # a copy: the caller's net (cached) stays put
        net = dataclasses.replace(net, model=copy.deepcopy(net.model).to(device))
    target = Path(target)
    out: dict = {"backbone": net.backbone, "backbone_val_accuracy": net.val_accuracy, "seed": seed,
                 "reference": f"{reference} split"}
    is_checkpoint = holds_checkpoint(target)
    requested = None
    if is_checkpoint and not MIN_SAMPLES <= samples <= MAX_SAMPLES:
        raise LatentForgeError(f"--samples {samples} is out of range: give {MIN_SAMPLES:,}..{MAX_SAMPLES:,} "
                               "(FID is usually reported at 5,000 or 50,000)")
    if is_checkpoint:
        ckpt = load_checkpoint(target, device=device)
        ckpt.check_dataset(ds, log=log)
        if not ema:
            if ckpt.algorithm != "gan":
                raise LatentForgeError(f"{ckpt.path} is a {ckpt.algorithm}: only GANs keep an EMA copy (drop --no-ema)")
            if ckpt.inference_only:
                raise LatentForgeError(f"{ckpt.path} is an inference copy that keeps only the EMA generator; give the "
                                       "checkpoint it was made from (a registry entry's lineage names it) for --no-ema")
            ckpt.modules["generator_ema"] = ckpt.modules["generator"]  # sampling then uses the raw generator
        if standard_prior and ckpt.algorithm != "vae":
            raise LatentForgeError(f"{ckpt.path} is a {ckpt.algorithm}: only VAEs fit a latent prior (drop --standard-prior)")
        asked = evaluation_labels(ckpt.inference_generator(), samples, split_class_share(ds, reference), seed)
        fake, _, requested = generate(ckpt, samples, seed, max_n=None, standard_prior=standard_prior, labels=asked)
        out.update({"checkpoint": str(ckpt.path), "step": ckpt.step, "algorithm": ckpt.algorithm})
        if ckpt.algorithm == "gan":
            out["generator"] = "ema" if ema else "raw"
        else:
            out["prior"] = prior_name(None if standard_prior else ckpt.latent_prior)
        if not ckpt.inference_generator().num_classes:
            requested = None
    else:
        fake = load_image_file_set(target, ds.image_shape)
        if len(fake) < MIN_SAMPLES:
            raise LatentForgeError(f"{target} holds {len(fake)} images: scoring needs at least {MIN_SAMPLES} "
                                   "(a covariance and nearest-neighbour balls need several)")
        out["images"] = str(target)
    t_gen = time.time()
    out["samples"] = len(fake)
    out["protocol"] = suffix = protocol_suffix(len(fake), reference, net.backbone)
    out.update({protocol_key(k, suffix): v for k, v in distribution_metrics(fake, net, reference, seed, requested).items()})
    # the keys name the sample count FID used; the k-NN metrics (precision, recall, density,
    # coverage) take as many real as generated points, at most MAX_KNN (their distance matrices are
    # O(N^2)): say how many
    n_knn = knn_count(len(net.real[reference].features), len(fake))
    out["knn_samples"] = {"real": n_knn, "generated": n_knn}
    warning = rank_warning(len(fake), net.real[reference], reference)
    if warning:
        out["warning"] = warning
        log(f"warning: {warning}")
    if is_checkpoint and ckpt.algorithm == "vae":
        sigma = ckpt.experiment.get("vae", {}).get("decoder_sigma", 0.1)
        recon = vae_reconstruction_metrics(ckpt.modules["vae"], ds, sigma)
        if recon["images"]:
            out["reconstruction_protocol"] = rsuffix = reconstruction_suffix(recon.pop("images"))
            out.update({protocol_key(k, rsuffix): v for k, v in recon.items()})
        else:
            log("note: the dataset has no validation split (prepared with --val-fraction 0): no reconstruction "
                "metrics or held-out ELBO")
    out["generate_seconds"] = round(t_gen - t0, 3)
    out["metrics_seconds"] = round(time.time() - t_gen, 3)
    return out
