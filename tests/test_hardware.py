"""Process-wide CPU settings that cnnlab makes before training."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PAGE_FAULTS_PER_ALLOCATION = """
import resource, statistics, sys, torch
from cnnlab.hardware import keep_freed_memory_for_reuse
if sys.argv[1] == "keep":
    assert keep_freed_memory_for_reuse()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # 64 MiB, written, freed: 16,384 pages
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median: now and then the heap grows once more (other allocations took part of the block).
print(statistics.median(faults))
"""


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="glibc only")
def test_freed_memory_is_reused_without_page_faults():
    """A training step frees and reallocates the same large activations: by default glibc returns
    them to the system and faults every page in again; with the setting, they are reused."""

    def faults(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS_PER_ALLOCATION, mode], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return float(out.stdout)

    assert faults("default") > 10_000
    assert faults("keep") < 100
