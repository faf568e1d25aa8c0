"""Hardware yardsticks: a measured matmul peak and FLOP counting for training steps."""

from __future__ import annotations

import time

import torch


def matmul_peak_gflops(n: int | None = None, repeats: int = 10, device: str = "cpu", dtype=torch.float32) -> float:
    """Achieved GFLOP/s of an n x n matmul with all threads: the practical peak to compare against.
    n defaults to 1024 on a CPU and 8192 on a GPU: on an H200, 1024² bf16 products reach about 90
    TFLOP/s of the ~790 that 8192² products do, which made every fraction of peak look 9× better."""
    n = n or (1024 if device == "cpu" else 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def count_flops(fn) -> float:
    """FLOPs executed by `fn()` (forward and backward matmuls/convolutions), via torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())
