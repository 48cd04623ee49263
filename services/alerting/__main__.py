"""``python -m services.alerting --config FILE`` is ``plantsight run alert --config FILE``."""
import sys

from services.cli import main

main(["run", "alert", *sys.argv[1:]])
