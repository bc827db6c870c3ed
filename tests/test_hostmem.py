"""Freed step buffers go back to the OS (hncse_dist/hostmem.py), and the Trainer sets it up."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hncse_dist.hostmem import set_mmap_threshold

# One process, one pattern of a training step on the host: a 16 MB buffer freed once (glibc then
# raises its mmap threshold to 16 MB), then rounds of 40 x 4 MB step buffers interleaved with
# small allocations that outlive the round (what the step keeps: stats, bank rows, caches).
# The resident memory after the buffers are freed says whether the process gave them back.
PATTERN = r"""
import json, sys, torch
from hncse_dist.hostmem import set_mmap_threshold
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
took = set_mmap_threshold(float(sys.argv[1]))
first = torch.ones(4 * 2**20)  # 16 MB, freed: the dynamic threshold rises past the 4 MB buffers
del first
kept, after = [], []
base = rss_mb()
for _ in range(3):
    big = []
    for _ in range(40):
        big.append(torch.ones(2**20))  # 4 MB
        kept.append(torch.ones(1024))  # 4 KB that stays
    del big
    after.append(rss_mb() - base)
print(json.dumps({"took": took, "retained_mb": after}))
"""


def run_pattern(threshold_mb: float) -> dict:
    out = subprocess.run([sys.executable, "-c", PATTERN, str(threshold_mb)], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_step_buffers_are_returned_with_the_threshold_and_kept_without():
    default, fixed = run_pattern(0), run_pattern(1)
    assert default["took"] is False and fixed["took"] is True
    # glibc's default: the 160 MB of freed buffers stay in the process (the heap is pinned by
    # the small allocations above them); with the threshold fixed at 1 MB they are unmapped.
    assert min(default["retained_mb"]) > 100, default
    assert max(fixed["retained_mb"]) < 20, fixed


def test_threshold_values():
    assert set_mmap_threshold(0) is False  # glibc's default left as it is
    if sys.platform.startswith("linux"):
        assert set_mmap_threshold(1.0) is True

