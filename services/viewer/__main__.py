"""``python -m services.viewer --config FILE`` is ``plantsight run viewer --config FILE``."""
import sys

from services.cli import main

main(["run", "viewer", *sys.argv[1:]])
