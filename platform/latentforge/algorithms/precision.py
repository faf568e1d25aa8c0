"""Numeric precision and memory layout of forward passes (pure PyTorch).

bf16 autocast needs no loss scaler (bf16 has fp32's exponent range). Only forward passes run
under it: the step functions cast logits and decoder outputs to fp32 before any loss, so losses,
gradient penalties (their input gradients are taken in fp32), EMA and optimiser state stay fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """How forward passes run on one device."""

    name: str = "fp32"  # 'fp32' | 'bf16'
    device_type: str = "cpu"  # 'cpu' | 'cuda'
    channels_last: bool = False  # NHWC batches (the modules are converted once, when built)

    def __post_init__(self):
        if self.name not in PRECISIONS:
            raise ValueError(f"unknown precision {self.name!r}; choose one of: {', '.join(PRECISIONS)}")

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: plain fp32)."""
        return PRECISIONS[self.name]

    def autocast(self):
        """A context for forward passes: bf16 autocast, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Lay out a (B, C, H, W) batch as the modules expect."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


FP32 = Precision()


def precision_for(train_cfg, device: torch.device | str) -> Precision:
    """The `Precision` of a `TrainConfig` on `device`."""
    return Precision(train_cfg.precision, torch.device(device).type, train_cfg.channels_last)
