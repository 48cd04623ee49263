"""End-to-end fixtures: ``up_pipeline`` writes a config and runs `plantsight up` as a real process.

The `Up` it returns, and the other end-to-end helpers, live in ``tests/support/pipeline.py``.
"""

from __future__ import annotations

import pytest

from tests.support.pipeline import Up


@pytest.fixture
def up_pipeline(tmp_path, r, redis_server, service_ports):
    started: list[Up] = []

    def start(cameras: list[dict], *, models: dict | None = None, alerts: dict | None = None,
              inference: dict | None = None, streams: dict | None = None, extra_env: dict | None = None,
              prefix: str = "e2e", replicas: dict[str, int] | None = None) -> Up:
        services = {s: {**v, **({"replicas": replicas[s]} if s in (replicas or {}) else {})}
                    for s, v in service_ports.items()}
        cfg = {"redis": {"url": redis_server.url, "prefix": prefix}, "services": services,
               "cameras": cameras,
               "models": models or {"classify": {"arch": "simple_cnn"}, "detect": {"arch": "simple_yolo"},
                                    "segment": {"arch": "unet_small"}, "thermal": {"arch": "thermal_cnn"}},
               "inference": inference or {"device": "cpu", "max_batch": 8, "max_wait_ms": 30, "threads": 1},
               "streams": {"claim_idle_ms": 2000, **(streams or {})}}
        # evidence goes to the test's folder, never into the checkout
        cfg["alerts"] = {"evidence_dir": str(tmp_path / "evidence"), **(alerts or {})}
        up = Up(cfg, tmp_path, r, extra_env)
        started.append(up)
        return up

    yield start
    for up in started:
        if up.proc.poll() is None:
            up.stop()
