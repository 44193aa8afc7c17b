"""host_memory: freed heap pages go back to the OS."""

import ctypes
import ctypes.util
import sys

import pytest

from cvvae_jax import host_memory

MiB = 2**20


def _rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._malloc_trim() is None,
                    reason="needs glibc's malloc_trim")
def test_release_freed_heap_returns_pages_held_behind_a_live_chunk():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    # 64 KiB chunks sit below glibc's mmap threshold, so they come from the heap; the
    # chunk allocated last stays, which keeps free() from shrinking the heap top, as a
    # compile's long-lived allocations do.
    chunks = [libc.malloc(64 * 1024) for _ in range(3201)]
    for p in chunks:
        ctypes.memset(p, 1, 64 * 1024)
    *freed, pin = chunks
    for p in freed:
        libc.free(p)
    held = _rss_bytes()
    assert host_memory.release_freed_heap()
    released = held - _rss_bytes()
    libc.free(pin)
    assert released > 150 * MiB, f"{released / MiB:.0f} MiB released of 200 freed"
