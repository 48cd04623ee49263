"""``python -m services.inference --config FILE`` is ``plantsight run infer --config FILE``."""
import sys

from services.cli import main

main(["run", "infer", *sys.argv[1:]])
