"""Keep freed host memory in a LatentForge process instead of handing it back to the kernel.

A training step allocates the same activations and gradients every step and frees them all by its
end; a Serve replica does the same per batch of requests. glibc's malloc serves blocks over its
mmap threshold with fresh `mmap`s and gives the top of its heap back to the kernel once more than
its trim threshold is free, so each step's tensors land on fresh pages, and every first write to a
4 KiB page is a page fault plus the kernel zeroing it. dcgan-mnist took 5,000 such faults per
training step in bf16 and 13,000 in fp32, and a batch of 32 generate requests 18,000
(docs/performance.md, "Host memory kept between steps").

Raising both thresholds (`mallopt`) keeps the freed memory in the process for the next step: the
peak resident size is unchanged, it is simply not returned between steps. This is what PyTorch's
CPU tuning guide gets by preloading jemalloc or tcmalloc, without a library to install. It is set
by the CLI for every verb and the demo, by `run_training` (plain, Ray Train and Tune workers), by the Serve
replicas and by `bench train`'s plain loop.

A user who sets glibc's malloc themselves (`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TOP_PAD_`, `GLIBC_TUNABLES`) or preloads another allocator is left alone, and `LATENTFORGE_KEEP_HOST_MEMORY=0` turns this off
(set it where the process starts: Ray's workers inherit it from a local cluster's driver).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling on 64-bit: larger blocks are still mmapped (and returned)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: about 2 GiB free at the top before trimming
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps (address space only: pages count once written)

USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                 "GLIBC_TUNABLES")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
OPT_OUT = "LATENTFORGE_KEEP_HOST_MEMORY"

_applied: str | None = None


def why_not(environ=None) -> str | None:
    """Why the thresholds are left as they are in this process, or None when they can be raised."""
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT, "1") == "0":
        return f"{OPT_OUT}=0"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not glibc's malloc"
    user = [k for k in USER_SETTINGS if k in environ]
    if user:
        return f"{user[0]} is set by the user"
    preload = environ.get("LD_PRELOAD", "")
    other = [a for a in OTHER_ALLOCATORS if a in preload]
    if other:
        return f"{other[0]} is preloaded"
    return None


def keep_freed_host_memory() -> str:
    """Raise glibc's trim and mmap thresholds in this process (once; later calls are free).

    Returns:
        What was done, for a log line: "kept" or "left as is: <reason>".
    """
    global _applied
    if _applied is None:
        reason = why_not()
        if reason is None:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = all(mallopt(p, v) == 1 for p, v in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                      (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
            reason = None if ok else "mallopt refused a setting"
        _applied = "kept" if reason is None else f"left as is: {reason}"
    return _applied
