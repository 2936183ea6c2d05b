"""The CPU peak-memory probe of the benchmarks (``benchmarks.common.peak_extra_bytes``): resident-set growth."""

import os

import pytest
import torch

from benchmarks import common

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")


def _touch(n: int, elements: int = 40_000):
    return [torch.ones(elements) for _ in range(n)]  # n x 160 KB, every page written


def test_cpu_peak_counts_memory_reused_from_freed_heap_chunks():
    """Chunks freed by earlier work stay resident in glibc's heap and a new call reuses them without growing the
    RSS; the probe must still see the call's 80 MB, on every call (it read 0 from the second call on)."""
    peaks = []
    for n in (3000, 1000, 1000):
        earlier = _touch(n)
        del earlier
        peaks += [common.peak_extra_bytes(lambda: _touch(500), torch.device("cpu")) / 2**20 for _ in range(3)]
    assert all(60 < peak < 200 for peak in peaks), peaks


def test_cpu_peak_is_near_zero_for_a_call_that_keeps_nothing_large():
    assert common.peak_extra_bytes(lambda: torch.ones(16).sum(), torch.device("cpu")) < 8 * 2**20
