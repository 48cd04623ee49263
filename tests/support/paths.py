"""Where things are: the checkout, the real media folder beside it, and the folder for what a person looks at."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"
ARTIFACTS = ROOT / "artifacts"  # screenshots and other things a person may want to look at after a run
