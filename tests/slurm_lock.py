"""One SLURM test module at a time across pytest-xdist workers: an exclusive file lock held for the module's run.

tests/test_slurm.py starts (and stops) ../shared/slurm_local.sh's SLURM with its munged; tests/test_slurm_netns.py
runs its own two-node SLURM but shares munged, and either may install SLURM first. Run side by side, one module's
teardown could stop the munged the other's jobs authenticate with, and two installs could collide on apt's lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from typing import Iterator

LOCK = os.path.join(tempfile.gettempdir(), "pipeline-tests-slurm.lock")


@contextlib.contextmanager
def exclusive(timeout: float = 420.0) -> Iterator[None]:
    """Holds the SLURM tests' lock for the block; waits up to ``timeout`` s for another module to finish."""
    with open(LOCK, "a", encoding="utf-8") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"another SLURM test module held {LOCK} for over {timeout:.0f} s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
