"""A real network camera (MJPEG over HTTP) that dies and comes back."""

from __future__ import annotations

import re

import msgpack
import pytest

from tests.conftest import free_port
from tests.support.mjpeg import MjpegCamera

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_a_dead_ip_camera_is_reconnected_with_backoff_and_alerted(up_pipeline, r):
    cam = MjpegCamera(free_port(), fps=10)
    cam.start()
    try:
        cams = [{"id": "ipcam", "source": cam.url, "fps": 10, "tasks": ["classify"], "frozen_s": 0, "black_s": 0}]
        up = up_pipeline(cams, alerts={"camera_offline_s": 3})

        def alerts():
            return [(a["rule"], a["state"]) for a in
                    (msgpack.unpackb(f[b"m"], raw=False) for _, f in r.xrange(f"{up.prefix}:alerts"))]

        def gauge(name):
            return up.counter("ingest", name, camera="ipcam")

        up.wait_for(lambda: len(up.results()) >= 5 and gauge("plantsight_camera_up") == 1, 120, "live results")
        cam.stop()
        up.wait_for(lambda: gauge("plantsight_camera_up") == 0, 30, "camera_up 0")
        up.wait_for(lambda: ("camera-offline", "firing") in alerts(), 30, "camera-offline alert")
        up.wait_for(lambda: gauge("plantsight_camera_reconnects_total") >= 3, 60, "reconnect attempts")
        before = len(up.results())
        cam.start()
        up.wait_for(lambda: gauge("plantsight_camera_up") == 1 and len(up.results()) > before + 5, 90,
                    "frames again after the camera came back")
        up.wait_for(lambda: ("camera-offline", "resolved") in alerts(), 30, "camera-offline resolved")
        assert alerts().count(("camera-offline", "firing")) == 1
        delays = [float(d) for d in re.findall(r"camera ipcam: .*; reconnecting in ([\d.]+) s", up.tail(2000))]
        # Exponential backoff with full jitter: the n-th delay lies in [0, min(30, 0.5 * 2**n)].
        assert len(delays) >= 3
        assert all(d <= min(30.0, 0.5 * 2 ** n) + 0.05 for n, d in enumerate(delays)), delays
        assert len(set(delays)) == len(delays)  # jittered: no two the same
        seqs = [m["seq"] for m in up.results()]
        assert len(seqs) == len(set(seqs))  # seq never repeats across the reconnect
        assert up.stop() == 0
    finally:
        cam.stop()
