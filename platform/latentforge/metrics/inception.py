"""The standard Inception-v3 backbone, for users who have its weights on disk.

Nothing is downloaded: the user points at a torchvision `inception_v3` state dict (for example
`inception_v3_google-0cc3c7bd.pth`). Images are resized to 299x299, greyscale is repeated to
RGB, and the 2048-d pool features give FID/KID/precision/recall comparable with papers that
use torchvision's Inception (not bit-identical to the TF-FID port). Real statistics are cached
in the dataset's features folder under the weights' hash; results name this backbone.
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

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class InceptionFeatures(nn.Module):
    """Adapter with the FeatureClassifier interface: `features(x)` (2048-d pool) and `head`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.head = net.fc
        net.fc = nn.Identity()
        self.num_classes, self.feature_dim = self.head.out_features, 2048

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() + 1) / 2  # [-1, 1] → [0, 1]
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x - _MEAN.to(x)) / _STD.to(x))


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def load_inception(weights: str | Path) -> InceptionFeatures:
    """torchvision Inception-v3 with the user's weights (loaded with weights_only=True).

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
    return InceptionFeatures(net).eval().requires_grad_(False)


def load_inception_net(dataset_dir: str | Path, weights: str | Path, log=print) -> FeatureNet:
    """A FeatureNet on Inception-v3, with the dataset's real statistics (computed once, cached)."""
    model = load_inception(weights)
    tag = _file_hash(Path(weights))
    cache = Path(dataset_dir) / FEATURES_DIR / f"inception-{tag}.safetensors"
    ds = PreparedDataset(dataset_dir)
    if cache.is_file():
        raw = load_file(str(cache))
    else:
        log(f"computing Inception-v3 real statistics of {dataset_dir} (once; cached in {cache})")
        raw = {}
        for split in ("train", "val"):
            data = ds.load(split)
            if len(data) >= 2:
                raw.update({f"{split}.{k}": v for k, v in real_stats(model, data, 0).items()})
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".partial")
        save_file(raw, str(tmp))
        tmp.replace(cache)
    real = {s: RealStats(raw[f"{s}.mu"], raw[f"{s}.sigma"], raw[f"{s}.features"], None, None)
            for s in ("train", "val") if f"{s}.mu" in raw}
    return FeatureNet(model, f"torchvision-inception-v3@{tag}", None, real, cache)
