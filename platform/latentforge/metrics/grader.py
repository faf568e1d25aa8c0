"""An independent grader for edits: a second classifier per labelled dataset, stored in
`<dataset>/grader/`, that scores edit success and interpolation label changes in `edit-eval`.

The dataset's feature network both fits the InterFaceGAN class boundaries and would score the
edits made along them: an edit can learn to fool the network that drew it. The grader shares
nothing with it: another architecture (models.classifier.GraderClassifier), another seed, and
other images: it is trained on the validation split, which the feature network never saw, and
its accuracy is measured on the training split, which the grader never saw.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from latentforge.data.dataset import PreparedDataset
from latentforge.errors import DataError
from latentforge.models.architectures import describe
from latentforge.models.classifier import GraderClassifier

GRADER_DIR = "grader"
GRADER_SEED = 1  # the feature network's default is 0


@dataclass
class Grader:
    model: GraderClassifier
    name: str  # e.g. 'lf-grader@3f2a9c1b0d4e'
    accuracy: float  # on the training split (which it never saw)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] → predicted classes (N,)."""
        device = next(self.model.parameters()).device
        return torch.cat([self.model(images[i : i + batch_size].to(device).float()).argmax(1).cpu()
                          for i in range(0, len(images), batch_size)])


def train_grader(dataset_dir: str | Path, epochs: int | None = None, seed: int = GRADER_SEED, log=print) -> dict:
    """Train and store the dataset's grader (on its validation split).

    Raises:
        DataError: an unlabelled dataset, or too few validation images to learn from.
    """
    from latentforge.metrics.features import _accuracy, _fit_classifier, store_network

    t0 = time.time()
    ds = PreparedDataset(dataset_dir)
    if ds.num_classes < 2:
        raise DataError(f"{dataset_dir} has no class labels: there is nothing for an edit grader to judge")
    train, val = ds.load("train"), ds.load("val")
    if len(val) < 10 * ds.num_classes:
        raise DataError(f"{dataset_dir}'s validation split has {len(val)} images, too few to train a grader on "
                        f"({10 * ds.num_classes} at least); prepare it with a larger validation fraction")
    epochs = epochs or max(10, min(80, 40_000 // len(val)))
    c, h, _ = ds.image_shape
    torch.manual_seed(seed)
    model = GraderClassifier(channels=c, resolution=h, num_classes=ds.num_classes)
    log(f"training the edit grader of {dataset_dir} on its {len(val)} validation images ({epochs} epochs)")
    _fit_classifier(model, val, train, epochs, min(64, len(val)), seed, log, what="grader")
    model.eval()
    accuracy = _accuracy(model, train)
    name = f"lf-grader@{ds.content_hash.split(':')[-1][:12]}"
    config = {"kind": "latentforge.grader", "name": name, "dataset_content_hash": ds.content_hash,
              "trained_on": "val", "accuracy_on_train_split": accuracy, "epochs": epochs, "seed": seed,
              "module": describe(model), "train_seconds": round(time.time() - t0, 1)}
    store_network(dataset_dir, GRADER_DIR, model, config)
    log(f"edit grader {name}: accuracy {accuracy:.2%} on the {len(train)} training images it never saw "
        f"({time.time() - t0:.0f}s)")
    return config


def load_grader(dataset_dir: str | Path) -> Grader:
    """The stored grader of a dataset.

    Raises:
        DataError: none yet, or one trained on other data.
    """
    from latentforge.metrics.features import load_stored_network

    model, config = load_stored_network(dataset_dir, GRADER_DIR, "edit grader", GraderClassifier)
    return Grader(model, config["name"], config["accuracy_on_train_split"])


def ensure_grader(dataset_dir: str | Path, log=print) -> Grader:
    """Load the dataset's grader, training it first when it is missing or stale."""
    try:
        return load_grader(dataset_dir)
    except DataError:
        train_grader(dataset_dir, log=log)
        return load_grader(dataset_dir)
