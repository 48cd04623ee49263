"""A real MJPEG-over-HTTP camera (multipart/x-mixed-replace, as IP cameras serve), stoppable and restartable."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2

from shared.data.scenes import make_scene


class MjpegCamera:
    def __init__(self, port: int, fps: float = 10.0, scene: str = "process"):
        self.port, self.fps, self.scene = port, fps, make_scene(scene)
        self.server: ThreadingHTTPServer | None = None
        self.running = threading.Event()
        self.frames_sent = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/video.mjpg"

    def start(self) -> None:
        cam = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                seq = 0
                try:
                    while cam.running.is_set():
                        image, _ = cam.scene.render(seq)
                        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                         + str(len(jpg)).encode() + b"\r\n\r\n" + jpg.tobytes() + b"\r\n")
                        cam.frames_sent += 1
                        seq += 1
                        time.sleep(1.0 / cam.fps)
                except (BrokenPipeError, ConnectionResetError):
                    return  # the reader went away

            def log_message(self, *a):
                pass

        self.running.set()
        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """The camera dies: open streams end and new connections are refused."""
        self.running.clear()
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
