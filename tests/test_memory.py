import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates and frees a 64 MiB tensor (writing every page) 21 times and prints the page faults
# of the last nine, after keep_freed_memory() when asked. The first allocations may still
# fault their pages in: up to the eighth, seen in about one run of two.
FAULT_COUNT = """
import resource, sys
from torch_lstmcap.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
import torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):
    torch.ones(16 << 20)
before = faults()
for _ in range(9):
    torch.ones(16 << 20)
print(applied, faults() - before)
"""


def page_faults(mode: str, **env) -> tuple[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", FAULT_COUNT, mode],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    applied, faults = result.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's malloc's")
def test_freed_memory_is_reused_without_new_page_faults():
    _, returned = page_faults("default")
    applied, kept = page_faults("keep")

    assert applied == "True"
    # Returned to the system, each 64 MiB block is faulted in again: 16,384 pages of 4 KiB.
    assert returned > 9 * 10_000
    assert kept < returned / 20


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's malloc's")
def test_the_users_own_malloc_settings_are_left_alone():
    applied, faults = page_faults("keep", MALLOC_TRIM_THRESHOLD_="131072")

    assert applied == "False"
    assert faults > 9 * 10_000
