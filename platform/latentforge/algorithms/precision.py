"""Numeric precision and memory layout of forward passes (pure PyTorch).

bf16 autocast needs no loss scaler (bf16 has fp32's exponent range). Only forward passes run
under it: the step functions cast logits and decoder outputs to fp32 before any loss, so losses,
EMA and optimiser state stay fp32. Gradient penalties take the input gradient of D's fp32 logits
with respect to fp32 inputs; it flows back through D's bf16 layers, and the penalty itself (the
norm and its square) is computed in fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
AUTO = "auto"  # a config value, resolved per device by `resolve_precision` before anything runs


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


def native_bf16(device_type: str = "cpu") -> bool:
    """Whether bf16 runs natively here (AVX512-BF16/AMX CPUs, Ampere+ GPUs); elsewhere it is
    emulated and slower than fp32."""
    try:
        if device_type == "cuda":
            # native only: a T4 or V100 "supports" bf16 by emulation, slower than its fp32
            return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device_type: str) -> str:
    """The precision a config's `name` means on this device: 'auto' is 'bf16' where bf16 runs
    natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs) and 'fp32' where it would be emulated (6-7x
    slower than fp32 on an AVX2 CPU: docs/performance.md); 'fp32' and 'bf16' mean themselves."""
    if name == AUTO:
        return "bf16" if native_bf16(device_type) else "fp32"
    return name


def resolve_channels_last(value: bool | str, precision: str, device_type: str) -> bool:
    """Whether a config's `train.channels_last` means NHWC on this device, for the (resolved)
    `precision`: 'auto' is on for CPUs, where oneDNN's convolutions prefer NHWC in fp32 as well as
    bf16 (every preset trained 1.1-1.3x faster in fp32 on an AVX2 CPU; bf16 + channels_last is the
    fast path on AVX512-BF16: docs/performance.md), and on CUDA only with bf16, whose tensor-core
    kernels want NHWC (NVIDIA's deep-learning performance guide); True and False mean themselves."""
    if value == AUTO:
        return device_type == "cpu" or resolve_precision(precision, device_type) == "bf16"
    return bool(value)


def resolved_config(cfg, device_type: str):
    """`cfg` with `train.precision: auto` and `train.channels_last: auto` replaced by what
    `device_type` trains with (anything else unchanged): what checkpoints and the tracker record.
    A run file keeps 'auto', so a resumed run picks again on the machine it resumes on."""
    t = cfg.train
    if t.precision != AUTO and t.channels_last != AUTO:
        return cfg
    used = precision_for(t, device_type)
    return cfg.model_copy(update={"train": t.model_copy(update={"precision": used.name,
                                                                "channels_last": used.channels_last})})


def emulation_warning(precision: str, device_type: str) -> str | None:
    """A warning for a bf16 run on a device that only emulates bf16, else None.

    On a CPU without AVX512-BF16 or AMX, autocast still runs bf16 but in software: a
    stylegan2-mnist step took 3.0 s in bf16 + channels_last against 0.47 s in fp32 on such a CPU
    (2-core AMD EPYC with AVX2)."""
    if precision != "bf16" or native_bf16(device_type):
        return None
    where = "this CPU has no AVX512-BF16 or AMX" if device_type == "cpu" else f"this {device_type} device lacks bf16"
    return (f"warning: train.precision=bf16 but {where}, so bf16 is emulated and several times slower than fp32; "
            "set train.precision=fp32 here, or auto, which picks bf16 only where it is native")


def inference_precision(trained: str, device_type: str) -> str:
    """The precision to generate in by default: the one the model trained in, unless that is bf16
    and this device only emulates it (a model trained in bf16 on a GPU, served on an older CPU)."""
    trained = resolve_precision(trained, device_type)
    return "fp32" if trained == "bf16" and not native_bf16(device_type) else trained


def precision_for(train_cfg, device: torch.device | str) -> Precision:
    """The `Precision` of a `TrainConfig` on `device` (each 'auto' resolved for that device)."""
    device_type = torch.device(device).type
    name = resolve_precision(train_cfg.precision, device_type)
    return Precision(name, device_type, resolve_channels_last(train_cfg.channels_last, name, device_type))
