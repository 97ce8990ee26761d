"""Keep the memory a training step frees for the next step, instead of returning it to the OS.

A training step allocates and frees the same few-MiB arrays every batch (activations,
gradients). glibc's malloc hands big blocks back to the kernel when they are freed (munmap, or
trimming the top of the heap), so the next step takes page faults to get them back zeroed, and
in a multithreaded process each unmap also interrupts the other cores to flush their TLBs.
Measured on the MNIST reference net at 2 threads (benchmarks/bench_train.py): 1,440 page faults
and 9 ms of system time per 46 ms step; with the thresholds below, none, and 40 ms per step.

Raising malloc's mmap and trim thresholds fixes that for the whole process (the memory stays
in the heap, at most what a step had in use at its peak is kept; nothing is allocated up
front). Linux/glibc only; a no-op elsewhere, when the user set malloc's own environment
variables (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), which then win, or with
CONVTRAIN_MALLOC_DEFAULTS=1 (glibc's own behaviour, e.g. to measure the difference:
`CONVTRAIN_MALLOC_DEFAULTS=1 python benchmarks/step_cost.py`).
"""

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20   # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 256 * 2**20
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_done = None


def keep_freed_memory_for_reuse() -> bool:
    """Set glibc's malloc thresholds once per process; True if they are in effect."""
    global _done
    if _done is None:
        _done = _set_thresholds()
    return _done


def _set_thresholds() -> bool:
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _USER_SETTINGS):
        return False
    if os.environ.get("CONVTRAIN_MALLOC_DEFAULTS", "0") not in ("", "0"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # glibc returns 1 on success; the mmap threshold first: setting either turns off glibc's
    # dynamic adjustment of both, and a trim threshold alone made things worse (every big
    # block mmapped: 3,700 faults per MNIST step)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
