"""A small convolutional classifier used as a dataset's feature network for evaluation."""

from __future__ import annotations

import torch
from torch import nn

from latentforge.models.blocks import resolution_plan


class FeatureClassifier(nn.Module):
    """image (B, C, H, W) in [-1, 1] → features (B, feature_dim) and class logits.

    Two conv-BN-ReLU x2 + max-pool stages (VGG-style), adaptive pooling to at most 4x4, a `feature_dim`
    ReLU embedding (the evaluation features, as Inception's pool3 is for FID), then a linear
    classifier. With `num_classes=0` the module is a pure feature extractor (trained as the
    encoder of an autoencoder for unlabeled data).

    Args:
        channels: image channels.
        resolution: image side (8..64).
        num_classes: classes, or 0 for an encoder only.
        width: channels of the first stage (the second has 2x).
        feature_dim: size of the feature embedding.
    """

    def __init__(self, *, channels: int, resolution: int, num_classes: int, width: int = 16, feature_dim: int = 128):
        super().__init__()
        resolution_plan(resolution)  # validates the resolution
        self.init_args = dict(channels=channels, resolution=resolution, num_classes=num_classes, width=width,
                              feature_dim=feature_dim)
        self.num_classes, self.feature_dim = num_classes, feature_dim
        pooled = max(1, min(4, resolution // 4))
        def conv(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *conv(channels, width), *conv(width, width), nn.MaxPool2d(2),
            *conv(width, 2 * width), *conv(2 * width, 2 * width), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(pooled), nn.Flatten(),
            nn.Linear(2 * width * pooled * pooled, feature_dim), nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes) if num_classes else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, feature_dim), non-negative."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes); the features when there is no head."""
        h = self.body(x)
        return h if self.head is None else self.head(self.dropout(h))


class GraderClassifier(nn.Module):
    """An independent judge of edits: image (B, C, H, W) in [-1, 1] → class logits.

    Deliberately unlike FeatureClassifier (which fits InterFaceGAN boundaries and computes the
    metrics): strided 5x5 convolutions with GroupNorm and SiLU instead of 3x3 conv-BN-ReLU pairs
    with max-pooling, global average pooling instead of a pooled embedding, and trained on other
    images with another seed (metrics.grader). An edit that only fools one network's features
    does not fool both.

    Args:
        channels: image channels.
        resolution: image side (8..256).
        num_classes: classes (at least 2).
        width: channels of the first stage (doubled at each of the three stages).
    """

    def __init__(self, *, channels: int, resolution: int, num_classes: int, width: int = 24):
        super().__init__()
        if not 8 <= resolution <= 256 or num_classes < 2 or not 4 <= width <= 256:
            raise ValueError(f"GraderClassifier: resolution 8..256, num_classes >= 2, width 4..256 "
                             f"(got {resolution}, {num_classes}, {width})")
        self.init_args = dict(channels=channels, resolution=resolution, num_classes=num_classes, width=width)
        self.num_classes = num_classes
        layers, c_in = [], channels
        for i in range(3):
            c_out = width * 2**i
            layers += [nn.Conv2d(c_in, c_out, 5, 2, 2), nn.GroupNorm(min(8, c_out), c_out), nn.SiLU()]
            c_in = c_out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2))
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
