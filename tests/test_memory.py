"""Tests of keep_heap: large blocks come from the heap and are reused instead of faulted in again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sets glibc's malloc thresholds")

# Prints the minor page faults of allocating, writing and freeing a 64 MiB tensor 5 times, before
# and after keep_heap. 64 MiB is above glibc's largest dynamic mmap threshold (32 MiB). A heap
# kept for reuse grows over the first blocks, because each aligned allocation asks for a little
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
kept = keep_heap()
faults(10)
print(default, kept, faults(5), keep_heap())
"""


def test_keep_heap_reuses_large_blocks():
    completed = subprocess.run([sys.executable, "-c", FAULTS], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    default, kept, faults, again = completed.stdout.split()
    pages = 64 * 2**20 // 4096

    # by default each block is mapped afresh, so every one of its pages faults
    assert int(default) >= 5 * pages
    assert kept == "True"
    # with the heap kept and warmed up, the blocks reuse pages already faulted in
    assert int(faults) <= 0.1 * pages
    assert again == "True"
