"""Host memory that a training step frees goes back to the operating system (glibc malloc).

glibc serves an allocation of at least its mmap threshold with a mapping of its own, unmapped
on free; smaller ones come from its heaps, which keep freed memory for reuse. The threshold
starts at 128 KiB and, by default, rises to the size of each mapped block that is freed (up to
32 MiB). A training step frees many blocks of a few MB (activations, DeepSpeed ZeRO-3's
gathered layers and reduce buckets), so after the first step blocks of those sizes come from
the heaps, which fragment: the process keeps what it freed and its resident memory climbs
above what it holds. Fixing the threshold (``mallopt``, which also turns the rise off) keeps
large blocks mapped and returned. Measured (BENCHMARKS.md, "ZeRO memory per rank"): bert-base
shape at 4 CPU ranks, peak RSS per rank ZeRO-3 2689 -> 2073 MB, DDP 3170 -> 2978 MB.

On GPUs the tensors live in device memory (PyTorch's caching allocator), so this only changes
the host side; on systems without glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def set_mmap_threshold(mb: float) -> bool:
    """Serve allocations of at least ``mb`` MiB from their own mappings, freed back to the OS.
    0 leaves glibc's dynamic default. Returns whether the setting took effect."""
    if mb <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(mb * 2**20)) == 1
