"""The optimiser every model trains with: Adam, run by PyTorch's fused kernel."""

from __future__ import annotations

import torch

FUSED_DEVICES = ("cpu", "cuda")  # where torch.optim.Adam(fused=True) runs


def adam(params, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam over `params`, fused where PyTorch supports it: one kernel walks every parameter
    instead of about ten small ops per tensor. On a CPU the default is that per-tensor loop
    (dcgan-mnist's G update: 0.58 ms looped, 0.37 ms fused); on CUDA the default is `foreach`,
    and fused is fewer launches still. Same update up to float rounding (1.6e-7 relative after 5
    steps)."""
    params = list(params)
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=fused or None)
