"""Polling with a deadline: a test waits for what real processes do, and fails saying what it waited for."""

from __future__ import annotations

import time

import pytest


def wait_until(cond, seconds: float, what: str, poll: float = 0.005) -> None:
    """Fail with ``what`` unless ``cond()`` turns true within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:g} s waiting for {what}")
        time.sleep(poll)
