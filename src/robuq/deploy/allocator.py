"""Keep freed memory in the process instead of returning it to the OS after every large tensor.

glibc serves blocks above its mmap threshold (128 KiB at first, adjusted up to 32 MiB) with fresh
pages from the kernel and returns them when freed, so a layer whose temporaries are a few MiB pays
for zeroed pages on every call (on a 2-core CPU an exported DiT-S/2 forward took 586 ms without the
setting and 450 ms with it, in one side measurement, and its timings were bimodal). PyTorch's CPU performance guide recommends jemalloc or tcmalloc for the same reason;
raising glibc's thresholds gets most of it without a preloaded library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.lru_cache(maxsize=None)
def retain_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if glibc accepted both.

    A no-op returning False on other C libraries. Memory freed stays mapped for reuse, so the resident
    size no longer shrinks after a peak; peak memory itself is unchanged.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = min(trim_threshold, 2**31 - 1)
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim))
