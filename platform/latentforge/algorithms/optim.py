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


def match_parameter_layouts(opt: torch.optim.Optimizer) -> None:
    """Put each per-parameter state tensor (Adam's moments) in its parameter's memory layout. A
    checkpoint keeps the layout of the run that wrote it, and `load_state_dict` keeps it too; a
    resume that picks another layout (channels_last is on for a CPU's bf16 and off for CUDA fp32)
    left NHWC moments beside NCHW weights, and the fused kernel, which walks both in memory
    order, paired each weight with another weight's moments, silently."""
    for p, state in opt.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)  # p's strides, v's values
