"""Tests of the heap guard that keeps stage one's resident memory flat."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from pipeline.memory import HeapGuard, resident_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")


def test_resident_bytes_grows_with_touched_memory():
    before = resident_bytes()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, every page written
    after = resident_bytes()
    assert before is not None and before > 0
    assert after - before > 48 * 2**20
    del block


def test_guard_trims_on_growth_and_raises_limit():
    guard = HeapGuard(growth=0.05)
    guard.check()
    assert guard.trims == 0  # the first check sets the limit
    first_limit = guard.limit
    assert first_limit > resident_bytes()
    guard.check()
    assert guard.trims == 0  # no growth, no trim

    block = np.ones(max(resident_bytes() // 2, 64 * 2**20) // 8)  # memory in use, half the resident size
    guard.check()
    assert guard.trims == 1
    assert guard.limit > first_limit
    assert guard.limit > resident_bytes()  # a trim cannot free memory in use, so the limit moves above it
    guard.check()
    assert guard.trims == 1
    del block
