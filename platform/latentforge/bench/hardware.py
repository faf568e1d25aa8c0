"""Hardware yardsticks: a measured matmul peak and FLOP counting for training steps."""

from __future__ import annotations

import time

import torch

from latentforge.devices import settle


def _best_seconds(fn, repeats: int, device: str) -> float:
    for _ in range(2):
        fn()
    settle(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        settle(device)
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak_gflops(n: int | None = None, repeats: int = 10, device: str = "cpu", dtype=torch.float32) -> float:
    """Achieved GFLOP/s of an n x n matrix product with all threads: the practical peak to compare
    against. n defaults to 1024 on a CPU and 8192 on a GPU: on an H200, 1024² bf16 products reach
    about 90 TFLOP/s of the ~790 that 8192² products do, which made every fraction of peak look 9×
    better.

    On a CPU the product is timed twice, as `torch.mm` and as the same GEMM through oneDNN (a 1×1
    convolution over n channels at 32×32 = 1024 pixels, channels_last), and the faster counts.
    `torch.mm` in fp32 goes to a BLAS that may not use the CPU's widest units: on an AMD EPYC with
    AVX512 it reached 185 GFLOP/s where oneDNN, which runs the models' convolutions, reached 390, so
    every fp32 share of the peak read twice too high and bf16's advantage over fp32 twice too large."""
    n = n or (1024 if device == "cpu" else 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = _best_seconds(lambda: a @ b, repeats, device)
    if device == "cpu" and n % 32 == 0:
        x = torch.randn(1, n, 32, n // 32, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(n, n, 1, 1, dtype=dtype).contiguous(memory_format=torch.channels_last)
        best = min(best, _best_seconds(lambda: torch.nn.functional.conv2d(x, w), repeats, device))
    return 2 * n**3 / best / 1e9


def count_flops(fn) -> float:
    """FLOPs executed by `fn()` (forward and backward matmuls/convolutions), via torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())
