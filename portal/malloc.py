"""glibc malloc settings for a process that streams large buffers.

Streaming an image allocates and frees buffers of 256 KiB to a few MiB
thousands of times a second (uvloop's socket reads, uvicorn's body messages,
chunks, records). glibc serves blocks above its mmap threshold (128 KiB at
start; it adapts, but trimming undoes it) with a fresh ``mmap`` and gives
freed heap tops back to the kernel, so nearly every buffer is page-faulted
in again on first touch. Measured on the 2-core bench machine: uvicorn
draining a 1 GiB body spent 0.8 s of kernel time doing that, 0.2 s with
these settings, and received 1.3 GB/s instead of 0.8 GB/s.

Memory stays bounded: the heap keeps at most ``TRIM_THRESHOLD`` of free
space, and what streaming holds at once is a few buffers per transfer.
An operator's own ``MALLOC_*`` environment settings win.
"""
import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MiB = 1024 * 1024
# Above the largest streaming buffer (4 MiB); larger blocks still get their own mmap.
MMAP_THRESHOLD = 8 * MiB
# Twice that, so a buffer freed at the top of the heap is kept for the next one;
# larger values bought no speed and cost ~10 MiB of peak RSS in the benchmark.
TRIM_THRESHOLD = 16 * MiB
TOP_PAD = 2 * MiB
# Each thread that allocates (the event loop, the sealing and hashing threads,
# the executor's) would get its own arena, each keeping up to TRIM_THRESHOLD
# free: two arenas took the 4 GiB benchmark's peak RSS from 138-140 MiB to
# 130-133 (one: 123) at the same speed.
ARENA_MAX = 2
OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                     "MALLOC_ARENA_MAX")


def is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def tune_for_streaming() -> bool:
    """Apply the settings once at process start; False where they do not apply."""
    if not is_glibc() or any(os.environ.get(n) for n in OPERATOR_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (M_TOP_PAD, TOP_PAD), (M_ARENA_MAX, ARENA_MAX)))
    if not ok:
        log.warning("malloc tuning for streaming was refused; large transfers will be slower")
    return ok
