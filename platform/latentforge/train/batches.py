"""Deterministic batches from an in-memory split (local runs and exactness tests).

Each epoch is a seeded permutation of the split; global batch i of an epoch is
perm[i*B:(i+1)*B] and rank r keeps its contiguous slice. The stream is a pure function of
(seed, batches consumed), so resuming at a position needs no replay.
"""

from __future__ import annotations

from typing import Iterator

import torch

from latentforge.algorithms.batch import Batch
from latentforge.data.dataset import Split
from latentforge.images import to_model_range
from latentforge.data.stream import epoch_seed
from latentforge.errors import ConfigError


class InMemoryBatches:
    """Global batches over a split, this worker's slice of each.

    Args:
        split: images (N, C, H, W) uint8 and labels.
        global_batch_size: images per global batch (a multiple of `world_size`).
        seed: seeds each epoch's permutation.
        rank, world_size: this worker's place.
        device: where batches are delivered.
    """

    def __init__(self, split: Split, global_batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu"):
        if global_batch_size % world_size:
            raise ConfigError(
                f"train.global_batch_size={global_batch_size} is not divisible by {world_size} workers; "
                "choose a multiple of the worker count"
            )
        if len(split) < global_batch_size:
            raise ConfigError(
                f"train.global_batch_size={global_batch_size} is larger than the training split ({len(split)} images)"
            )
        self.split, self.global_batch_size, self.seed = split, global_batch_size, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.local = global_batch_size // world_size
        self.rows = len(split)
        self.batches_per_epoch = len(split) // global_batch_size

    # How an epoch's order is made, saved with a checkpoint: a resume read in another order would
    # repeat some images of the epoch and skip others (StreamBatches gives this order too when the
    # split fits one shuffle window).
    order = "whole-split"

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.split), generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))

    def iterate(self, start: int = 0) -> Iterator[Batch]:
        """Yield batches forever, starting after `start` global batches have been consumed."""
        epoch, i = divmod(start, self.batches_per_epoch)
        while True:
            perm = self._perm(epoch)
            for j in range(i, self.batches_per_epoch):
                g0 = j * self.global_batch_size + self.rank * self.local
                idx = perm[g0 : g0 + self.local]
                images = to_model_range(self.split.images[idx])
                labels = None if self.split.labels is None else self.split.labels[idx]
                yield Batch(images, labels).to(self.device)
            epoch, i = epoch + 1, 0
