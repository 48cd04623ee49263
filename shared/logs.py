"""Log format of every plantsight process: one line per record on stderr, naming the service and its pid."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO", service: str = "plantsight") -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {service}[%(process)d] %(name)s: %(message)s")
