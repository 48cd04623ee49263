"""Real network cameras (RTSP from GStreamer, MJPEG over HTTP) that die and come back."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import msgpack
import pytest

from tests.support.mjpeg import MjpegCamera
from tests.support.ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_SCRIPT = Path(__file__).resolve().parents[1] / "support" / "rtsp_camera.py"


class RtspCamera:
    """GStreamer's RTSP server in its own process (Debian's python3-gi and gst-rtsp-server)."""

    def __init__(self, port: int):
        probe = subprocess.run([SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
                                "from gi.repository import GstRtspServer"], capture_output=True)
        if probe.returncode:
            pytest.skip("no GStreamer RTSP server: apt-get install gir1.2-gst-rtsp-server-1.0 python3-gi "
                        "gstreamer1.0-plugins-{base,good,ugly} (.ci/run does)")
        self.port, self.proc = port, None
        self.url = f"rtsp://127.0.0.1:{port}/cam"

    def start(self) -> None:
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(RTSP_SCRIPT), str(self.port)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        assert self.proc.stdout.readline().strip() == b"ready"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("kind", ["rtsp", "mjpeg"])
def test_a_dead_ip_camera_is_reconnected_with_backoff_and_alerted(up_pipeline, r, kind):
    cam = RtspCamera(free_port()) if kind == "rtsp" else MjpegCamera(free_port(), fps=10)
    cam.start()
    try:
        cams = [{"id": "ipcam", "source": cam.url, "fps": 10, "tasks": ["classify"], "frozen_s": 0, "black_s": 0}]
        up = up_pipeline(cams, alerts={"camera_offline_s": 3})

        def alerts():
            return [(a["rule"], a["state"]) for a in
                    (msgpack.unpackb(f[b"m"], raw=False) for _, f in r.xrange(up.keys.alerts))]

        def gauge(name):
            return up.counter("ingest", name, camera="ipcam")

        up.wait_for(lambda: len(up.results()) >= 5 and gauge("plantsight_camera_up") == 1, 120, "live results")
        up.wait_for(lambda: ("camera-offline", "firing") not in alerts()[-1:], 30, "no offline alert open")
        seen = len(alerts())  # a slow first connection may already have raised (and resolved) one
        cam.stop()
        up.wait_for(lambda: gauge("plantsight_camera_up") == 0, 30, "camera_up 0")
        up.wait_for(lambda: ("camera-offline", "firing") in alerts()[seen:], 30, "camera-offline alert")
        up.wait_for(lambda: gauge("plantsight_camera_reconnects_total") >= 3, 60, "reconnect attempts")
        before = len(up.results())
        time.sleep(1)  # let a reconnect or two fail against the dead port first
        cam.start()
        up.wait_for(lambda: gauge("plantsight_camera_up") == 1 and len(up.results()) > before + 5, 90,
                    "frames again after the camera came back")
        up.wait_for(lambda: ("camera-offline", "resolved") in alerts()[seen:], 30, "camera-offline resolved")
        assert alerts()[seen:].count(("camera-offline", "firing")) == 1
        delays = [float(d) for d in re.findall(r"camera ipcam: .*; reconnecting in ([\d.]+) s", up.tail(2000))]
        # Exponential backoff with full jitter: the n-th delay lies in [0, min(30, 0.5 * 2**n)].
        assert len(delays) >= 3
        ceilings = [min(30.0, 0.5 * 2 ** n) for n in range(len(delays))]
        assert all(d <= c + 0.005 for d, c in zip(delays, ceilings)), delays
        assert len(set(delays)) > 1 and any(d < 0.9 * c for d, c in zip(delays, ceilings))  # jittered
        seqs = [m["seq"] for m in up.results()]
        assert len(seqs) == len(set(seqs))  # seq never repeats across the reconnect
        assert up.stop() == 0
    finally:
        cam.stop()
