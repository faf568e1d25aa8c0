"""The standard Inception-v3 backbone, for users who have its weights on disk.

Nothing is downloaded: the user points at a torchvision `inception_v3` state dict (for example
`inception_v3_google-0cc3c7bd.pth`). Greyscale is repeated to RGB, images are resized to
299x299 by one of two named protocols, and the 2048-d pool features give FID/KID/precision/recall:

- `clean` (the default; Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN
  Evaluation", clean-fid): images quantised to 8 bits as saved files would be, then resized with
  PIL's bicubic kernel, antialiased (torch's `antialias=True` bicubic is that kernel).
- `legacy` (pytorch-fid, torchmetrics): a bilinear resize of the float images, no antialiasing.

The weights torchvision ships for Inception-v3 are Google's port, and torchvision forces
`transform_input=True` for them: the model maps ImageNet-normalised input back to
(x - 0.5) / 0.5. Feeding ImageNet-normalised pixels to a model built without that transform, as
this module did before, shifted every feature. Here the network gets (x - 0.5) / 0.5 of [0, 1]
pixels, which equals what torchvision's own pipeline feeds its layers (checked in the tests
against torchvision with `transform_input=True`, and FID against torchmetrics on the same
features). Real statistics are cached per weights hash *and* protocol, and results name both, so
the two protocols are never mixed.

Published FIDs use another network: the 2015 TensorFlow FID-Inception graph (pytorch-fid's
`pt_inception-2015-12-05` port, with its own pooling), not torchvision's ImageNet weights. This
backbone's numbers compare runs and datasets with each other, not with a paper's table.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from latentforge.data.dataset import PreparedDataset
from latentforge.errors import LatentForgeError
from latentforge.metrics.features import FEATURES_DIR, FeatureNet, RealStats, real_stats

PROTOCOLS = ("clean", "legacy")
SIZE = 299


def resize_for_inception(x01: torch.Tensor, protocol: str) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] → (N, C, 299, 299) in [0, 1] by the named protocol."""
    if protocol == "clean":
        x01 = (x01.clamp(0, 1) * 255).round() / 255  # what a saved 8-bit image holds
        return F.interpolate(x01, size=(SIZE, SIZE), mode="bicubic", antialias=True, align_corners=False)
    if protocol == "legacy":
        return F.interpolate(x01, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    raise LatentForgeError(f"unknown Inception protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


class InceptionFeatures(nn.Module):
    """Adapter with the FeatureClassifier interface: `features(x)` (2048-d pool) and `head`."""

    def __init__(self, net: nn.Module, protocol: str = "clean"):
        super().__init__()
        resize_for_inception(torch.zeros(1, 3, 2, 2), protocol)  # an unknown protocol fails here
        self.net, self.protocol = net, protocol
        self.head = net.fc
        net.fc = nn.Identity()
        self.num_classes, self.feature_dim = self.head.out_features, 2048

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() + 1) / 2  # [-1, 1] → [0, 1]
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = resize_for_inception(x, self.protocol)
        return self.net((x - 0.5) / 0.5)  # = torchvision's transform_input applied to ImageNet-normalised input


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def load_inception(weights: str | Path, protocol: str = "clean") -> InceptionFeatures:
    """torchvision Inception-v3 with the user's weights (loaded with weights_only=True), its input
    prepared by `protocol` ("clean" or "legacy").

    Raises:
        LatentForgeError: missing file or weights that do not fit the architecture.
    """
    from torchvision.models import inception_v3

    weights = Path(weights)
    if not weights.is_file():
        raise LatentForgeError(f"Inception weights {weights} do not exist; give the path of a torchvision inception_v3 state dict")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LatentForgeError(f"cannot load {weights} safely as a state dict: {e}") from e
    net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LatentForgeError(f"{weights} is not a torchvision inception_v3 state dict: {e}") from e
    return InceptionFeatures(net, protocol).eval().requires_grad_(False)


def load_inception_net(dataset_dir: str | Path, weights: str | Path, protocol: str = "clean", log=print) -> FeatureNet:
    """A FeatureNet on Inception-v3, with the dataset's real statistics (computed once per weights
    and protocol, cached)."""
    model = load_inception(weights, protocol)
    tag = _file_hash(Path(weights))
    cache = Path(dataset_dir) / FEATURES_DIR / f"inception-{protocol}-{tag}.safetensors"
    ds = PreparedDataset(dataset_dir)
    if cache.is_file():
        raw = load_file(str(cache))
    else:
        log(f"computing Inception-v3 real statistics of {dataset_dir} (once; cached in {cache})")
        raw = {}
        for split in ("train", "val"):  # a chunk at a time: a split larger than memory is never read whole
            if ds.manifest["splits"][split]["count"] >= 2:
                raw.update({f"{split}.{k}": v for k, v in real_stats(model, ds.chunks(split), 0).items()})
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".partial")
        save_file(raw, str(tmp))
        tmp.replace(cache)
    real = {s: RealStats(raw[f"{s}.mu"], raw[f"{s}.sigma"], raw[f"{s}.features"], None, None)
            for s in ("train", "val") if f"{s}.mu" in raw}
    return FeatureNet(model, f"torchvision-inception-v3-{protocol}@{tag}", None, real, cache)
