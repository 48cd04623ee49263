"""The environment of a plantsight child process: none of the caller's settings, a private config folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Where `plantsight up` keeps the viewer token it makes: one folder per test session, never the user's own.
TEST_CONFIG_HOME = Path(tempfile.mkdtemp(prefix="plantsight-test-config-"))


def env_without_plantsight() -> dict:
    """The environment for a child process: no PLANTSIGHT_* from the caller, and a private config directory
    (where `plantsight up` keeps the viewer token it makes) so tests never touch the user's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANTSIGHT_")}
    env["XDG_CONFIG_HOME"] = str(TEST_CONFIG_HOME)
    return env
