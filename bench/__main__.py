"""``python -m bench MODE …`` (also ``plantsight bench MODE …``): pipeline, transport, ingest, engines, soak, quality,
small-data.

Each mode prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import sys

MODES = {
    "pipeline": "bench.pipeline",
    "transport": "bench.transport",
    "ingest": "bench.ingest",
    "engines": "bench.engines",
    "soak": "bench.soak",
    "quality": "bench.quality",
    "small-data": "bench.small_data",
}
USAGE = "usage: python -m bench {" + ",".join(MODES) + "} [options]   (MODE --help for its options)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in MODES:
        print(USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib
    import os

    from services.supervisor import SERVICE_ENV

    # The bare models run in the environment the services run in (OpenMP reads it when torch loads).
    for key, value in SERVICE_ENV.items():
        os.environ.setdefault(key, value)
    module = importlib.import_module(MODES[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
