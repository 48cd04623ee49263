"""``python -m services.preprocess --config FILE`` is ``plantsight run preprocess --config FILE``."""
import sys

from services.cli import main

main(["run", "preprocess", *sys.argv[1:]])
