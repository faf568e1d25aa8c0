"""Keep freed host memory in a LatentForge process instead of handing it back to the kernel.

A training step allocates the same activations and gradients every step and frees them all by its
end; a Serve replica does the same per batch of requests. glibc's malloc serves blocks over its
mmap threshold with fresh `mmap`s and gives the top of its heap back to the kernel once more than
its trim threshold is free, so each step's tensors land on fresh pages, and every first write to a
4 KiB page is a page fault plus the kernel zeroing it. dcgan-mnist took 5,000 such faults per
training step in bf16 and 13,000 in fp32, and a batch of 32 generate requests 18,000
(docs/performance.md, "Host memory kept between steps").

Raising both thresholds (`mallopt`) keeps the freed memory in the process for the next step. The
peak resident size stayed within 4% in every measurement, but memory is no longer returned to the
kernel after a peak: a long-lived process stays at its high-water mark. Setting them also turns
off glibc's dynamic mmap threshold (which follows the largest freed mmapped block up to 32 MiB).
PyTorch's CPU tuning guide gets a similar effect by preloading jemalloc or tcmalloc; this needs no
library to install. It is set by the CLI for every verb and the demo, by `run_training` (plain,
Ray Train and Tune workers), by the Serve replicas and by `bench train`'s plain loop.

A user who sets glibc's malloc themselves (`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TOP_PAD_`, `MALLOC_MMAP_MAX_`, or `glibc.malloc.*` in `GLIBC_TUNABLES`) or preloads
jemalloc, tcmalloc or mimalloc is left alone, and `LATENTFORGE_KEEP_HOST_MEMORY=0` (or false / no /
off) turns this off; `ray_init` passes it on to the workers of the cluster it starts or joins.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from typing import Callable, Mapping

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling on 64-bit: larger blocks are still mmapped (and returned)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: about 2 GiB free at the top before trimming
# Blocks over 32 MiB (most of a step's activations at 128 px) are still mmapped and faulted in
# every step. Keeping them too (M_MMAP_MAX = 0) cost 26% more peak memory at 128 px with this
# glibc (2.36): its posix_memalign, which PyTorch allocates with, asks for size + alignment, so an
# equal-sized freed block never fits and the heap fragments (docs/performance.md). A preloaded
# jemalloc or tcmalloc, which this module leaves alone, is the tool at those sizes.
# Grow the heap in 64 MiB steps. Also keeps glibc's per-thread heaps (64 MiB at most) from being
# unmapped once free, which matters where training runs in a thread (Ray Train) or requests do (Serve).
TOP_PAD = 64 << 20
SETTINGS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))

USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
OPT_OUT = "LATENTFORGE_KEEP_HOST_MEMORY"
OFF, ON = ("0", "false", "no", "off"), ("", "1", "true", "yes", "on")

_applied: str | None = None


def why_not(environ: Mapping[str, str] | None = None) -> str | None:
    """Why the thresholds are left as they are in this process, or None when they can be raised."""
    environ = os.environ if environ is None else environ
    choice = environ.get(OPT_OUT, "").strip().lower()
    if choice in OFF:
        return f"{OPT_OUT}={environ[OPT_OUT]}"
    if choice not in ON:
        return f"{OPT_OUT}={environ[OPT_OUT]!r} is not understood: use 0 (off) or 1 (the default)"
    user = [k for k in USER_SETTINGS if k in environ]
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES (glibc.malloc.*)")
    if user:
        return f"{user[0]} is set by the user"
    other = [a for a in OTHER_ALLOCATORS if a in environ.get("LD_PRELOAD", "")]
    if other:
        return f"{other[0]} is preloaded"
    try:
        if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
            return "not glibc's malloc"
    except OSError as e:  # libc_ver reads the interpreter's binary
        return f"could not tell the C library ({e})"
    return None


def set_thresholds(mallopt: Callable[[int, int], int]) -> str | None:
    """Apply `SETTINGS` through `mallopt`, stopping at the first refusal; None, or what was refused."""
    for param, value in SETTINGS:
        if mallopt(param, value) != 1:
            return f"mallopt refused parameter {param} = {value}"
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
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (AttributeError, OSError) as e:
                reason = f"no mallopt in this process ({e})"
            else:
                mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                reason = set_thresholds(mallopt)
        _applied = "kept" if reason is None else f"left as is: {reason}"
    return _applied
