"""Return freed heap memory to the operating system, so that stage one's resident memory stays flat.

glibc's malloc raises its mmap threshold after large blocks are freed, so later large blocks
(activations, shard arrays) come from the heap, which then fragments and grows with the number of
batches. Measured with efficientnet_lite0 on cifar10-small (benchmarks/extract_memory.py): the
main process peak grew 19% from 600 to 6,000 images without trimming, 8% and 17% in two runs with a
trim every 8 batches, and 1% with a trim after every batch, which cost about 5% of the speed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL("libc.so.6")
        except OSError:
            logger.debug("libc.so.6 not found; heap trimming is off")
    return _libc


def trim_heap() -> bool:
    """Ask glibc to release free heap memory (malloc_trim); return False where that is unavailable."""
    libc = _load_libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))


def resident_bytes() -> int | None:
    """Return this process's resident memory in bytes (Linux /proc/self/statm), or None where unavailable."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapGuard:
    """Trim the heap whenever resident memory has grown more than ``growth`` above its level after the first batch.

    Trimming costs speed, because the memory it returns must be faulted in again, so a fixed
    schedule either trims too often or lets the peak drift. The guard reads the resident size
    after each batch (a read of /proc/self/statm) and trims only when it crossed the limit. When
    memory is still above the limit right after a trim, the memory is in use, and the limit moves up.
    """

    def __init__(self, growth: float = 0.05) -> None:
        self.growth = growth
        self.limit: int | None = None
        self.trims = 0

    def check(self) -> None:
        resident = resident_bytes()
        if resident is None:
            return
        if self.limit is None:
            self.limit = int(resident * (1 + self.growth))
            return
        if resident <= self.limit:
            return
        trim_heap()
        self.trims += 1
        after = resident_bytes() or resident
        if after > self.limit:
            self.limit = int(after * (1 + self.growth))
