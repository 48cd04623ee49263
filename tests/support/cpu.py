"""CPU work of a known size, for tests that measure whose threads' CPU is counted."""

from __future__ import annotations

import time


def burn(seconds: float) -> None:
    t0 = time.thread_time()
    while time.thread_time() - t0 < seconds:
        sum(range(1000))
