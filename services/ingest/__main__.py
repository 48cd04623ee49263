"""``python -m services.ingest --config FILE`` is ``plantsight run ingest --config FILE``."""
import sys

from services.cli import main

main(["run", "ingest", *sys.argv[1:]])
