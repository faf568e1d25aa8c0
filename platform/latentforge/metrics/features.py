"""Per-dataset feature networks: Inception weights cannot be downloaded here (nor on many
clusters), so each prepared dataset gets its own small classifier, trained on its labels, and
the real-data feature statistics, stored in `<dataset>/features/`:

    config.json                 backbone name, dataset content hash, validation accuracy, module
    model.safetensors           the classifier's weights
    real_stats.safetensors      per split: feature mean and covariance, features, labels

FID during training then costs only the generated side. Unlabeled datasets get the encoder of
an autoencoder instead (no class metrics). Numbers from this backbone are comparable between
runs on the same dataset, not with papers: every result names its backbone.
"""

from __future__ import annotations

import hashlib

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from latentforge.data.dataset import PreparedDataset, Split

from latentforge.images import to_model_range
from latentforge.errors import DataError, LatentForgeError
from latentforge.metrics.distribution import gaussian_stats
from latentforge.models.blocks import UpStack
from latentforge.models.classifier import FeatureClassifier
from latentforge.models.architectures import build_module, describe
from latentforge.storage import atomic_write_json, read_json, staged_dir

FEATURES_DIR = "features"
MAX_STORED_FEATURES = 10_000  # per split, for the k-NN metrics


@dataclass
class RealStats:
    mu: torch.Tensor  # (D,) float64
    sigma: torch.Tensor  # (D, D) float64
    features: torch.Tensor  # (N, D) float32, up to MAX_STORED_FEATURES
    labels: torch.Tensor | None  # (N,) int64
    class_share: torch.Tensor | None  # (K,) share of each class in the whole split


@dataclass
class FeatureNet:
    """A dataset's evaluation backbone and its real statistics."""

    model: FeatureClassifier
    backbone: str  # e.g. 'lf-classifier@3f2a9c1b0d4e.8c1d2e3f' (architecture @ dataset hash . weights hash)
    val_accuracy: float | None
    real: dict[str, RealStats]
    path: Path

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 1000, as_8bit: bool = False,
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images (N, C, H, W) in [-1, 1] → (features (N, D), class probabilities (N, K) or None).
        `as_8bit`: each image first rounded to the 8-bit image it would be saved as (a batch at a
        time: no copy of the whole set)."""
        from latentforge.images import to_model_range, to_uint8

        device = next(self.model.parameters()).device
        feats, probs = [], []
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size]
            x = (to_model_range(to_uint8(x)) if as_8bit else x).to(device).float()
            h = self.model.features(x)
            feats.append(h.cpu())
            if self.model.head is not None:
                probs.append(torch.softmax(self.model.head(h), dim=1).cpu())
        return torch.cat(feats), (torch.cat(probs) if probs else None)


def _augment(x: torch.Tensor, gen: torch.Generator, max_shift: float = 2.0) -> torch.Tensor:
    """Random translations of up to `max_shift` pixels (per image), padding with black (-1)."""
    b, _, h, w = x.shape
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * max_shift
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = shift[:, 0] * 2 / w
    theta[:, 1, 2] = shift[:, 1] * 2 / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def _fit_classifier(model, train, val, epochs, batch_size, seed, log, what: str = "feature classifier"):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps_per_epoch = max(1, len(train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    x_all, y_all = train.images, train.labels
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            x = _augment(to_model_range(x_all[idx]), gen)
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = _accuracy(model, val)
        log(f"  {what} epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, held-out accuracy {acc:.2%}")
    return _accuracy(model, val)


@torch.no_grad()
def _accuracy(model, split) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(split), 1000):
        correct += (model(to_model_range(split.images[i : i + 1000])).argmax(1) == split.labels[i : i + 1000]).sum().item()
    return correct / max(1, len(split))


def _fit_autoencoder(model, train, epochs, batch_size, seed, log):
    c, h, _ = train.images.shape[1:]
    decoder = UpStack(in_dim=model.feature_dim, out_channels=c, resolution=h, width=16, norm="none")
    opt = torch.optim.Adam(list(model.parameters()) + list(decoder.parameters()), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, len(train) // batch_size)
    for epoch in range(epochs):
        perm = torch.randperm(len(train), generator=gen)
        for s in range(steps_per_epoch):
            x = to_model_range(train.images[perm[s * batch_size : (s + 1) * batch_size]])
            loss = F.mse_loss(torch.tanh(decoder(model.features(x))), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        log(f"  feature autoencoder epoch {epoch + 1}/{epochs}: reconstruction MSE {loss.item():.4f}")


def real_stats(model, split, num_classes) -> dict[str, torch.Tensor]:
    """Feature mean, covariance, stored features (and labels, class shares) of one split: a `Split`
    in memory, or an iterable of them (`PreparedDataset.chunks`), embedded a chunk at a time, so
    only the features of a split larger than memory are ever held."""
    net = FeatureNet(model, "", None, {}, Path("."))
    feats, labels = [], []
    for part in [split] if isinstance(split, Split) else split:
        feats.append(net.embed(to_model_range(part.images))[0])
        if part.labels is not None:
            labels.append(part.labels)
    feats = torch.cat(feats)
    mu, sigma = gaussian_stats(feats)
    keep = feats[:MAX_STORED_FEATURES]
    out = {"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma), "features": keep.contiguous()}
    if labels:
        labels = torch.cat(labels)
        out["labels"] = labels[:MAX_STORED_FEATURES].contiguous()
        out["class_share"] = (torch.bincount(labels, minlength=num_classes).double() / len(labels)).contiguous()
    return out


FIT_BYTES = 1 << 30  # pixels a feature network trains on at most (a larger split: a seeded sample of it)


def _fitting_split(ds: PreparedDataset, split: str, seed: int, log) -> Split:
    """The images a feature network trains (or checks its accuracy) on: the whole split, or where it
    holds more than FIT_BYTES of pixels, a seeded sample of that size (FFHQ at 256 px is 14 GB)."""
    c, h, w = ds.image_shape
    n = ds.manifest["splits"][split]["count"]
    if n * c * h * w <= FIT_BYTES:
        return ds.load(split)
    cap = FIT_BYTES // (c * h * w)
    log(f"  the {split} split holds {n:,} images; the feature network fits on a seeded sample of {cap:,}")
    return ds.sample(split, cap, seed=seed, max_bytes=FIT_BYTES)


def train_feature_net(dataset_dir: str | Path, epochs: int | None = None, batch_size: int = 128, seed: int = 0,
                      overwrite: bool = True, log=print) -> dict:
    """Train a dataset's feature network and store it with the real statistics.

    Args:
        dataset_dir: a prepared dataset folder.
        epochs: training epochs (default: enough for ~50k images, at least 5).
        batch_size: images per step.
        seed: seeds weights, batches and augmentation.
        overwrite: replace existing features.
        log: progress printer.

    Returns:
        The stored config (backbone, validation accuracy, ...).
    """
    t0 = time.time()
    ds = PreparedDataset(dataset_dir)
    c, h, w = ds.image_shape
    train, val = _fitting_split(ds, "train", seed, log), _fitting_split(ds, "val", seed, log)
    if len(train) < 2:
        raise DataError(f"{dataset_dir} has too few training images ({len(train)}) to train a feature network")
    epochs = epochs or max(4, min(30, 40_000 // max(1, len(train))))
    torch.manual_seed(seed)
    labelled = ds.num_classes >= 2
    model = FeatureClassifier(channels=c, resolution=h, num_classes=ds.num_classes if labelled else 0)
    log(f"training the {'classifier' if labelled else 'autoencoder'} feature network of {dataset_dir} "
        f"({len(train)} images, {epochs} epochs)")
    val_acc = None
    if labelled:
        val_acc = _fit_classifier(model, train, val if len(val) else train, epochs, batch_size, seed, log)
    else:
        _fit_autoencoder(model, train, epochs, batch_size, seed, log)
    model.eval()
    tensors = {}
    for name in ("train", "val"):  # the statistics cover every image of the split, read in chunks
        if ds.manifest["splits"][name]["count"] >= 2:
            for k, v in real_stats(model, ds.chunks(name), ds.num_classes).items():
                tensors[f"{name}.{k}"] = v
    # the dataset and the weights: a network retrained with another --seed or --epochs is another
    # feature space, and its FIDs must not pass for comparable with the first one's
    weights = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        weights.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    backbone = (f"lf-{'classifier' if labelled else 'autoencoder'}@{ds.content_hash.split(':')[-1][:12]}"
                f".{weights.hexdigest()[:8]}")
    config = {
        "kind": "latentforge.feature_net",
        "backbone": backbone,
        "dataset_content_hash": ds.content_hash,
        "val_accuracy": val_acc,
        "epochs": epochs,
        "seed": seed,
        "module": describe(model),
        "train_seconds": round(time.time() - t0, 1),
    }
    store_network(dataset_dir, FEATURES_DIR, model, config, tensors, overwrite=overwrite)
    acc = f", validation accuracy {val_acc:.2%}" if val_acc is not None else ""
    log(f"feature network {backbone} stored in {Path(dataset_dir) / FEATURES_DIR}{acc} ({time.time() - t0:.0f}s)")
    return config


def load_stored_network(dataset_dir: str | Path, subdir: str, what: str, cls: type, fix: str = "") -> tuple:
    """A network stored beside a prepared dataset (`<dataset>/<subdir>/config.json` + weights):
    checked to belong to this dataset's content and to be a `cls`, before its weights load.

    Returns:
        (model in eval mode, frozen, on the CPU; its config).

    Raises:
        DataError: none stored, one trained on other data, or one that cannot be loaded (`fix` is
            appended to each message: how to make a new one).
    """
    ds = PreparedDataset(dataset_dir)
    folder = Path(dataset_dir) / subdir
    if not (folder / "config.json").is_file():
        raise DataError(f"{dataset_dir} has no {what} yet{fix}")
    config = read_json(folder / "config.json")
    if config.get("dataset_content_hash") != ds.content_hash:
        raise DataError(f"the {what} in {folder} was trained on other data{fix}")
    try:
        # a planted config.json must not allocate more than the weights file beside it holds
        from latentforge.checkpoint import check_weights_describe

        check_weights_describe(config["module"], folder / "model.safetensors", what="config.json")
        model = build_module(config["module"])
        if not isinstance(model, cls):
            raise ValueError(f"{config['module'].get('class')} is not a {cls.__name__}")
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
    except (KeyError, TypeError, ValueError, RuntimeError, LatentForgeError) as e:
        raise DataError(f"the {what} in {folder} cannot be loaded ({e}){fix}") from e
    return model.eval().requires_grad_(False), config


def store_network(dataset_dir: str | Path, subdir: str, model, config: dict, tensors: dict | None = None,
                  overwrite: bool = True) -> None:
    """Write a network beside a dataset, all at once (a staged folder renamed into place):
    model.safetensors, config.json and, given `tensors`, real_stats.safetensors."""
    with staged_dir(Path(dataset_dir) / subdir, overwrite=overwrite) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        if tensors is not None:
            save_file(tensors, str(tmp / "real_stats.safetensors"))
        atomic_write_json(tmp / "config.json", config)


def load_feature_net(dataset_dir: str | Path, device: str = "cpu") -> FeatureNet:
    """The stored feature network of a prepared dataset.

    Raises:
        DataError: no features yet, or features computed for different data.
    """
    folder = Path(dataset_dir) / FEATURES_DIR
    model, config = load_stored_network(dataset_dir, FEATURES_DIR, "feature network", FeatureClassifier,
                                        fix=f"; run: latentforge data features {dataset_dir}")
    model = model.to(device)
    raw = load_file(str(folder / "real_stats.safetensors"))
    real = {}
    for split in ("train", "val"):
        if f"{split}.mu" in raw:
            real[split] = RealStats(raw[f"{split}.mu"], raw[f"{split}.sigma"], raw[f"{split}.features"],
                                    raw.get(f"{split}.labels"), raw.get(f"{split}.class_share"))
    return FeatureNet(model, config["backbone"], config.get("val_accuracy"), real, folder)


def ensure_feature_net(dataset_dir: str | Path, log=print) -> FeatureNet:
    """Load the dataset's feature network, training it first when it is missing or stale."""
    try:
        return load_feature_net(dataset_dir)
    except DataError:
        train_feature_net(dataset_dir, log=log)
        return load_feature_net(dataset_dir)
