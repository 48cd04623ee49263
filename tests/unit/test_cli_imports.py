"""The command line and the light services start without importing torch (fast start, small RSS)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.paths import ROOT


@pytest.mark.parametrize("module", ["services.cli", "services.ingest.service", "services.alerting.service",
                                    "services.supervisor"])
def test_module_does_not_import_torch(module):
    code = (f"import sys, {module}; {module}.parser() if hasattr({module}, 'parser') else None; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
