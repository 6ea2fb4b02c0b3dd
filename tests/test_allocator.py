"""The allocator thresholds the daemon sets for files of megabytes (bridge.allocator)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from bridge import allocator

ON_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Three files' buffers of 4 MB held at once, then freed, twenty times over (as the daemon receives files);
# prints the minor page faults of those twenty rounds.
PROBE = """
import resource, sys
from bridge import allocator
if sys.argv[1] == "tuned":
    allocator.tune_for_large_buffers()
def files():
    held = [b"x" * (4 << 20) for _ in range(3)]
    del held
files()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    files()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_thresholds_apply_on_glibc_and_are_left_alone_elsewhere() -> None:
    assert allocator.tune_for_large_buffers() is ON_GLIBC
    assert allocator.tune_for_large_buffers() is ON_GLIBC  # twice is harmless


@pytest.mark.skipif(not ON_GLIBC, reason="only glibc has these thresholds (CI runs on Debian)")
def test_buffers_of_megabytes_are_reused_instead_of_faulted_in_again() -> None:
    plain, tuned = faults("plain"), faults("tuned")
    # by default every round maps its 12 MB afresh (~3000 faults a round); tuned, the heap keeps them
    assert plain > 20 * 1000
    assert tuned < plain / 10
