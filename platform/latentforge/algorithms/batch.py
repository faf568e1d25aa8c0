"""The unit of data every step function consumes."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Batch:
    """A worker's share of one global batch."""

    images: torch.Tensor  # (B, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor | None = None  # (B,) int64, None for unlabeled data

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            self.images.to(device, non_blocking=True),
            None if self.labels is None else self.labels.to(device, non_blocking=True),
        )

    def __len__(self) -> int:
        return self.images.shape[0]


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (or the module itself).

    Sampling and any forward that must not take part in gradient all-reduce go through this:
    a forward through the DDP wrapper is a collective (buffer broadcast) even under no_grad.
    """
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def no_sync_unless(module: nn.Module, last: bool):
    """DDP's `no_sync` on every gradient-accumulation micro-batch but the last (gradients are
    all-reduced once per update); a no-op for plain modules and on the last micro-batch."""
    if last or not isinstance(module, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def grad_norm(params) -> torch.Tensor:
    """Total L2 norm of the gradients of `params` (0 when none have gradients)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
