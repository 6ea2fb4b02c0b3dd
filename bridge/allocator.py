"""The C allocator's settings for a process that moves files of megabytes through memory (glibc only).

glibc gives each allocation above its mmap threshold a mapping of its own, and gives free memory at the
top of its heap back to the system beyond its trim threshold; both thresholds start low (128 KiB) and only
adapt to what was freed before. A daemon receiving DICOM files holds buffers of one to four megabytes
(socket reads joined into chunks, multipart parts, files read for hashing) for a moment each, so by default
every one is a fresh mapping whose pages the kernel zeroes and faults in again: measured with a REST import
of 3 MB files, 1600-2100 minor page faults per file and 8-11 ms of system time per file; with the settings
below, about 70 faults and 7 ms, and 10-15 % more files per second (docs/dicom.md, "Performance"). The
imaging pool's workers, which read, check and stage an import's files, set them too (bridge.imaging.pool).

Allocations up to 16 MiB therefore come from the heap (a CT volume of hundreds of megabytes still gets
its own mapping, returned at once), and up to 64 MiB of free heap is kept for the next file. That bounds
what the process keeps beyond its need at 64 MiB per allocator arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 16 << 20
TRIM_THRESHOLD_BYTES = 64 << 20


def tune_for_large_buffers() -> bool:
    """Apply the thresholds above when the process runs on glibc; whether they were applied. Elsewhere
    (Windows, macOS, musl) the allocator is left as it is: their allocators have no such switches."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl has no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    log.debug("allocator thresholds", extra={"applied": applied})
    return applied
