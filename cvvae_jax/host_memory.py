"""Give the host heap that a compile freed back to the operating system.

glibc's free() returns memory to the OS only from the top of a heap, so memory that
XLA's compiler frees can stay resident. On a CPU backend the compiled program's buffers
are host memory as well, but allocations that large are mmap'd afresh and never reuse
that heap: after compiling the paper-width train step (17x256x256, fp32) the process
held 6.40 GiB, and `malloc_trim` took it to 4.98 GiB before the step's 17 GiB of
temporaries (RSS read from /proc/self/status).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    # musl and non-Linux C libraries have no malloc_trim; nothing to give back there.
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_heap() -> bool:
    """Return glibc's free heap pages to the OS (`malloc_trim(0)`); False where there is none."""
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))
