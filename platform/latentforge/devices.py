"""Whether the GPUs a command asks for exist, checked before any work starts (pure PyTorch; the
Ray check takes the cluster's numbers as arguments)."""

from __future__ import annotations

import contextlib

import torch

from latentforge.errors import ConfigError


def require_cuda(flag: str, fallback: str) -> None:
    """Refuse `flag` (e.g. '--gpus') where this process sees no CUDA device, instead of failing
    inside PyTorch's CUDA initialisation with a driver traceback.

    Raises:
        ConfigError: no CUDA device; the message says what to do instead (`fallback`).
    """
    if not torch.cuda.is_available():
        raise ConfigError(f"{flag}: this process sees no CUDA GPU (no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides it); "
                          f"{fallback}, or run it on a GPU machine")


def check_cluster_gpus(workers: int, cluster_gpus: float, joined: bool, log=print,
                       workers_flag: str = "--workers", gpus_flag: str = "--gpus") -> None:
    """`--gpus` on Ray Train asks one GPU per worker. A local cluster that has fewer would leave
    the run waiting for them forever, so that is refused; a cluster joined by address may add GPU
    nodes through its autoscaler, so there the wait is only said.

    Args:
        workers_flag: the setting that chose `workers`, named in the way out ('--workers' for a
            train, 'workers_per_trial' for a sweep, whose trials each ask that many).
        gpus_flag: the setting that asked for GPUs ('--gpus'; a sweep's YAML can say it too).

    Raises:
        ConfigError: a local cluster with fewer GPUs than workers.
    """
    if cluster_gpus >= workers:
        return
    have = f"this Ray cluster has {cluster_gpus:g} GPU(s) and {gpus_flag} with {workers} worker(s) asks {workers}"
    if not joined:
        raise ConfigError(f"{have}: drop {gpus_flag} to train on the CPU, lower {workers_flag} to {int(cluster_gpus)}"
                          if cluster_gpus >= 1 else f"{have}: drop {gpus_flag} to train on the CPU, or run on a GPU machine")
    log(f"warning: {have}; the run waits until the cluster (its autoscaler) adds GPU nodes")


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and convolutions, both switches (PyTorch's defaults differ: matmul
    off, cuDNN on). Off for scoring and sampling, so a GPU's FID is computed with the fp32 math the
    CPU's real statistics were."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


@contextlib.contextmanager
def tf32_off():
    """TF32 off inside (a training run's `train.tf32` is process-wide): the FID a run reports while
    it trains, and its sample grids, use the fp32 math its real statistics were computed with."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_tf32(False)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def inference_device(device: str, flag: str, fallback: str) -> str:
    """`device` for sampling or scoring: a CUDA device must be visible (`require_cuda`, naming
    `flag` and `fallback`), and runs with TF32 off, so that its images and features come from the
    fp32 math of the CPU's (cuDNN's default is TF32)."""
    if torch.device(device).type == "cuda":
        require_cuda(flag, fallback)
        set_tf32(False)
    return device


def on_device(module: torch.nn.Module, device: str | torch.device) -> bool:
    """Whether `module`'s parameters are on `device` ('cuda' matches any CUDA device, 'cuda:1' only that one)."""
    have, want = next(module.parameters()).device, torch.device(device)
    return have.type == want.type and (want.index is None or have.index == want.index)


def settle(device: str | torch.device) -> None:
    """Wait for the work queued on `device` (CUDA runs ahead of the host; a CPU has nothing queued):
    before a clock is read, so that a timing covers the work it names."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
