"""Tests of keep_heap (large blocks reused from the heap instead of faulted in again) and release_free_heap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sets glibc's malloc thresholds")

# Prints the minor page faults of allocating, writing and freeing a 64 MiB tensor 5 times, before
# and after keep_heap. 64 MiB is above glibc's largest dynamic mmap threshold (32 MiB). A heap
# kept for reuse grows over the first blocks, because each aligned allocation requests a little
# more than the block freed before it, so 10 blocks warm it up before the second count.
FAULTS = """
import resource
import torch
from pipeline.memory import keep_heap

def faults(count):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(count):
        block = torch.ones(64 * 2**20 // 4)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults(5)
set_once = keep_heap()
faults(10)
print(default, set_once, faults(5), keep_heap())
"""


def test_keep_heap_reuses_large_blocks():
    completed = subprocess.run([sys.executable, "-c", FAULTS], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    default, set_once, faults, again = completed.stdout.split()
    pages = 64 * 2**20 // 4096

    # by default each block is mapped afresh, so every one of its pages faults
    assert int(default) >= 5 * pages
    assert set_once == "True"
    # with the heap kept and warmed up, the blocks reuse pages already faulted in
    assert int(faults) <= 0.1 * pages
    assert again == "True"


# Prints the resident MiB with the heap kept, after a 256 MiB tensor was freed, and again after
# release_free_heap.
RELEASE = """
import os
import torch
from pipeline.memory import keep_heap, release_free_heap

def resident_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

keep_heap()
before = resident_mib()
block = torch.ones(256 * 2**20 // 4)
del block
after_free = resident_mib()
released = release_free_heap()
print(before, after_free, released, resident_mib())
"""


def test_release_free_heap_returns_freed_block():
    completed = subprocess.run([sys.executable, "-c", RELEASE], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    before, after_free, released, after_release = completed.stdout.split()

    assert float(after_free) - float(before) > 200  # the freed tensor stays resident on the kept heap
    assert released == "True"
    assert float(after_free) - float(after_release) > 200
