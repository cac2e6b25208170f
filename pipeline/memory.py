"""Return freed heap memory to the operating system, so that stage one's resident memory stays flat.

glibc's malloc raises its mmap threshold after large blocks are freed, so later large blocks
(activations, shard arrays) come from the heap, which then fragments and grows with the number of
batches. Measured with efficientnet_lite0 on cifar10-small (benchmarks/extract_memory.py): the
main process peak grew 19% from 600 to 6,000 images without trimming.
"""

from __future__ import annotations

import ctypes
import logging
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
