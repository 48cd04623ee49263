"""The viewer's HTTP side: a real `ViewerService` HTTP server on a free port over a real Redis.

Routing, tokens, cookies, the CSRF guard of acknowledgements, static files, the rendered picture and the
MJPEG stream, checked over real sockets (httpx; raw ``http.client`` where a client would normalise the path).
"""

from __future__ import annotations

import http.client
import secrets
import socket
import time
import uuid

import cv2
import httpx
import numpy as np
import pytest

from services.viewer.auth import COOKIE, Tokens
from services.viewer.service import MAX_CLIP_PLAYS, SECURITY_HEADERS, ViewerService
from shared.config import load_config
from shared.data.scenes import make_scene
from shared.imaging import decode_frame, encode
from shared.keys import Keys
from shared.messages import Alert, Frame, Result
from shared.overlay import BOX_COLOURS, draw
from shared.streams.producer import Producer
from tests.support.ports import free_port
from tests.support.waiting import wait_until

READ = "read-" + secrets.token_hex(16)
OPERATOR = "oper-" + secrets.token_hex(16)
BELT = [[10, 10], [60, 10], [60, 40], [10, 40]]
CSP = SECURITY_HEADERS["Content-Security-Policy"]


class Viewer:
    def __init__(self, redis_server, r, prefix, tmp_path):
        self.cfg = load_config(data={
            "redis": {"url": redis_server.url, "prefix": prefix},
            "cameras": [
                {"id": "press-1", "source": "synthetic://process", "fps": 4, "tasks": ["classify", "detect"],
                 "zones": {"belt": BELT}},
                {"id": "kiln-1", "source": "synthetic://thermal", "fps": 10, "tasks": ["thermal"]},
            ],
            "models": {"classify": {"arch": "simple_cnn"}},
            "alerts": {"evidence_dir": str(tmp_path / "evidence")}},
            environ={})
        self.r, self.keys = r, Keys(prefix)
        tokens = Tokens({"PLANTSIGHT_VIEWER_TOKEN": READ, "PLANTSIGHT_VIEWER_OPERATOR_TOKEN": OPERATOR})
        self.port = free_port()
        self.svc = ViewerService(self.cfg, tokens=tokens, port=self.port)
        self.svc._connect()
        self.svc.start_http()
        self.base = f"http://127.0.0.1:{self.port}"
        self.frames = Producer(r, self.keys.frames, maxlen=2000)
        self.results = Producer(r, self.keys.results, maxlen=10000)
        self.alerts = Producer(r, self.keys.alerts, max_age_s=86400)
        self.seq = 0
        self.client = httpx.Client(timeout=10, follow_redirects=False)  # one client: a fresh one per call is slow

    def stop(self) -> None:
        self.client.close()
        self.svc.stop.set()
        self.svc.http.shutdown()
        self.svc.http.server_close()

    def request(self, method: str, path: str, token: str | None, **kw) -> httpx.Response:
        """One request with exactly the headers given: the client's cookie jar is emptied after each."""
        headers = kw.pop("headers", {}) | ({"Authorization": f"Bearer {token}"} if token else {})
        try:
            return self.client.request(method, self.base + path, headers=headers, **kw)
        finally:
            self.client.cookies.clear()

    def get(self, path: str, token: str | None = READ, **kw) -> httpx.Response:
        return self.request("GET", path, token, **kw)

    def post(self, path: str, token: str | None = OPERATOR, **kw) -> httpx.Response:
        return self.request("POST", path, token, **kw)

    def raw_get(self, path: str, token: str | None = READ) -> tuple[int, bytes]:
        """GET with the path sent exactly as given (httpx would resolve ``..`` before sending)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    # --- what the pipeline writes -------------------------------------------------------------------------
    def frame(self, camera: str, image: np.ndarray) -> str:
        self.seq += 1
        enc, data = encode(image, 95)
        frame = Frame(camera=camera, seq=self.seq, ts=time.time_ns(), enc=enc, shape=image.shape,
                      dtype=str(image.dtype), data=data)
        return self.frames.add(frame.to_msgpack(), cam=camera)

    def result(self, camera: str, task: str, frame_id: str, out: dict) -> Result:
        res = Result(camera=camera, seq=self.seq, ts=time.time_ns(), task=task, frame_id=frame_id,
                     model="net@1", out=out)
        self.results.add(res.to_msgpack(), cam=camera, task=task)
        return res

    def alert(self) -> Alert:
        alert_id = Alert.identity("leak", "press-1", f"{self.seq}-0")
        a = Alert(id=alert_id, rule="leak", severity="warning", state="firing", camera="press-1", task="detect",
                  ts=time.time_ns(), value=1.0, threshold=1.0, message="leak on press-1", frame_id="1-0",
                  labels={"episode": alert_id})
        self.alerts.add(a.to_msgpack(), cam=a.camera, task=a.task)
        return a


@pytest.fixture
def viewer(redis_server, r, prefix, tmp_path):
    v = Viewer(redis_server, r, prefix, tmp_path)
    yield v
    v.stop()


def scene_image(seq: int = 3) -> np.ndarray:
    image, _ = make_scene("process", seed=1).render(seq)
    return image


DETECT = {"boxes": [[20.0, 30.0, 90.0, 80.0, 0.91, 1]], "classes": ["person", "leak"]}
CLASSIFY = {"label": "anomaly", "index": 1, "probs": [0.1, 0.9], "classes": ["normal", "anomaly"]}


def cookie_of(resp: httpx.Response) -> str:
    return resp.headers["Set-Cookie"].split(";", 1)[0]


# --- tokens and routing -----------------------------------------------------------------------------------
def test_only_health_answers_without_a_token_and_codes_are_exact(viewer):
    assert viewer.get("/healthz", token=None).status_code == 200
    assert viewer.get("/readyz", token=None).text == "ready\n"
    for path in ("/api/cameras", "/api/me", "/api/alerts", "/api/streams", "/api/services",
                 "/api/cameras/press-1/frame.jpg", "/api/cameras/press-1/live.mjpg", "/api/nothing-here"):
        resp = viewer.get(path, token=None)
        assert resp.status_code == 401, path
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="plantsight"'
        assert viewer.get(path, token="x" * 40).status_code == 401, path
        assert viewer.get(path + "?token=" + READ, token=None).status_code == 401, path  # links are for pages
    for path in ("/", "/alerts", "/health", "/cameras/press-1", "/alerts/" + str(uuid.uuid4())):
        resp = viewer.get(path, token=None)
        assert resp.status_code == 303 and resp.headers["Location"].startswith("/login?next=/"), path
    assert viewer.get("/alerts", token=None).headers["Location"] == "/login?next=/alerts"

    assert viewer.get("/api/me").json() == {"role": "read"}
    assert viewer.get("/api/me", token=OPERATOR).json() == {"role": "operator"}
    assert [c["id"] for c in viewer.get("/api/cameras").json()] == ["press-1", "kiln-1"]
    assert viewer.get("/api/cameras/press-1").json()["id"] == "press-1"
    for path in ("/api/nothing-here", "/api/cameras/ghost-1", "/api/cameras/ghost-1/frame.jpg",
                 "/api/cameras/press-1/other", "/api/alerts/not-a-uuid", f"/api/alerts/{uuid.uuid4()}",
                 f"/api/alerts/{uuid.uuid4()}/snapshot.jpg", f"/api/alerts/{uuid.uuid4()}/notes.txt",
                 "/api/cameras/press-1/frame.jpg", "/no-such-page", "/cameras/a/b"):
        assert viewer.get(path).status_code == 404, path
    assert viewer.post("/api/cameras").status_code == 405
    assert viewer.post(f"/api/alerts/{uuid.uuid4()}/ack", token=READ).status_code == 403
    assert viewer.post(f"/api/alerts/{uuid.uuid4()}/ack").status_code == 404
    assert viewer.post("/api/alerts/not-a-uuid/ack").status_code == 404
    assert viewer.post(f"/api/alerts/{uuid.uuid4()}/ack", token=None).status_code == 401


def test_pages_json_and_static_files_carry_csp_and_nosniff(viewer):
    a = viewer.alert()
    cases = {"/": "text/html; charset=utf-8", "/alerts": "text/html; charset=utf-8",
             "/health": "text/html; charset=utf-8", "/cameras/press-1": "text/html; charset=utf-8",
             f"/alerts/{a.id}": "text/html; charset=utf-8", "/api/cameras": "application/json",
             "/api/alerts": "application/json", f"/api/alerts/{a.id}": "application/json",
             "/api/streams": "application/json", "/static/app.js": "text/javascript; charset=utf-8",
             "/static/style.css": "text/css; charset=utf-8"}
    for path, ctype in cases.items():
        resp = viewer.get(path)
        assert resp.status_code == 200, path
        assert resp.headers["Content-Type"] == ctype, path
        assert resp.headers["Content-Security-Policy"] == CSP, path
        assert resp.headers["X-Content-Type-Options"] == "nosniff", path
        assert resp.headers["Cache-Control"] == "no-store", path
    login = viewer.get("/login", token=None)
    assert login.status_code == 200 and login.headers["Content-Security-Policy"] == CSP
    assert 'name="token"' in login.text and "{{message}}" not in login.text
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP and "frame-ancestors 'none'" in CSP
    for path in ("/", "/alerts", "/static/app.js"):
        body = viewer.get(path, token=OPERATOR).text
        assert READ not in body and OPERATOR not in body, path


def test_a_token_link_sets_the_cookie_and_drops_the_token_from_the_address(viewer):
    resp = viewer.get(f"/alerts?state=firing&token={READ}&camera=press-1", token=None)
    assert resp.status_code == 303
    assert resp.headers["Location"] == "/alerts?state=firing&camera=press-1"
    set_cookie = resp.headers["Set-Cookie"]
    assert set_cookie.startswith(COOKIE + "=") and READ not in set_cookie
    assert "; HttpOnly" in set_cookie and "; SameSite=Strict" in set_cookie and "; Path=/" in set_cookie
    assert viewer.get(f"/?token={OPERATOR}", token=None).headers["Location"] == "/"
    cookie = cookie_of(resp)
    assert viewer.get("/api/me", token=None, headers={"Cookie": cookie}).json() == {"role": "read"}
    assert viewer.get("/alerts", token=None, headers={"Cookie": cookie}).status_code == 200

    bad = viewer.get("/?token=wrong-token-wrong-token", token=None)
    assert bad.status_code == 401 and "Set-Cookie" not in bad.headers and "not valid" in bad.text
    forged = viewer.get("/api/me", token=None, headers={"Cookie": f"{COOKIE}={READ}"})  # the token is not a session
    assert forged.status_code == 401
    out = viewer.get("/logout", token=None, headers={"Cookie": cookie})
    assert out.status_code == 303 and out.headers["Location"] == "/login"
    assert out.headers["Set-Cookie"].startswith(f"{COOKIE}=;") and "Max-Age=0" in out.headers["Set-Cookie"]


def test_the_login_form_sets_the_cookie_and_never_redirects_off_site(viewer):
    wrong = viewer.post("/login", token=None, data={"token": "y" * 40, "next": "/alerts"})
    assert wrong.status_code == 401 and "Set-Cookie" not in wrong.headers
    assert "That token is not valid." in wrong.text
    right = viewer.post("/login", token=None, data={"token": OPERATOR, "next": "/alerts?state=firing"})
    assert right.status_code == 303 and right.headers["Location"] == "/alerts?state=firing"
    set_cookie = right.headers["Set-Cookie"]
    assert OPERATOR not in set_cookie and "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    assert viewer.get("/api/me", token=None, headers={"Cookie": cookie_of(right)}).json() == {"role": "operator"}
    assert viewer.post("/login", token=None, data={"token": READ}).headers["Location"] == "/"
    for nxt in ("//evil.example/", "https://evil.example/", "evil.example", "///evil.example"):
        resp = viewer.post("/login", token=None, data={"token": READ, "next": nxt})
        assert (resp.status_code, resp.headers["Location"]) == (303, "/"), nxt


def test_no_redirect_goes_to_a_backslash_host(viewer):
    """Browsers read ``/\\evil.example`` (and ``/<tab>/evil.example``) as ``//evil.example``: another host."""
    for nxt in ("/\\evil.example", "/\\/evil.example", "/\t/evil.example"):
        resp = viewer.post("/login", token=None, data={"token": READ, "next": nxt})
        assert (resp.status_code, resp.headers["Location"]) == (303, "/"), nxt
    conn = http.client.HTTPConnection("127.0.0.1", viewer.port, timeout=10)
    try:  # a ?token= link on such a path: the cookie, and a redirect that stays on this site
        conn.request("GET", f"/\\evil.example?token={READ}")
        resp = conn.getresponse()
        resp.read()
        location = resp.getheader("Location")
        assert resp.status == 303 and location.startswith("/") and location[1:2] not in ("/", "\\"), location
    finally:
        conn.close()


def test_acknowledging_with_the_cookie_needs_the_page_header(viewer):
    a = viewer.alert()
    path = f"/api/alerts/{a.id}/ack"
    read_cookie = cookie_of(viewer.post("/login", token=None, data={"token": READ}))
    oper_cookie = cookie_of(viewer.post("/login", token=None, data={"token": OPERATOR}))
    page = {"X-Requested-With": "plantsight"}
    # a cross-site form post carries no custom header
    assert viewer.post(path, token=None, headers={"Cookie": oper_cookie}).status_code == 403
    assert viewer.post(path, token=None, headers={"Cookie": oper_cookie, "X-Requested-With": "XMLHttpRequest"}
                       ).status_code == 403
    assert viewer.post(path, token=None, headers={"Cookie": read_cookie} | page).status_code == 403
    assert viewer.get(f"/api/alerts/{a.id}").json()["ack"] is None
    ok = viewer.post(path, token=None, headers={"Cookie": oper_cookie} | page, json={"note": "seen"})
    assert ok.status_code == 200, ok.text
    ack = ok.json()["ack"]
    assert ok.json()["id"] == a.id and ack["by"] == "viewer (cookie)" and ack["note"] == "seen"
    assert viewer.get(f"/api/alerts/{a.id}").json()["ack"] == ack
    assert viewer.post(path, json={"note": "again"}).json()["ack"] == ack  # bearer: no header needed; first wins
    bad_body = viewer.post(path, content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad_body.status_code == 400

    # a verdict, added later to the acknowledgement, the way the page's buttons send it; then it stays
    assert ack["verdict"] is None and (ack["rule"], ack["camera"]) == ("leak", "press-1")
    assert viewer.post(path, token=None, headers={"Cookie": oper_cookie}, json={"verdict": "confirmed"}
                       ).status_code == 403
    bad = viewer.post(path, token=None, headers={"Cookie": oper_cookie} | page, json={"verdict": "yes"})
    assert bad.status_code == 400 and bad.json() == {"error": "verdict 'yes' is not one of: confirmed, false_alarm"}
    judged = viewer.post(path, token=None, headers={"Cookie": oper_cookie} | page, json={"verdict": "confirmed"})
    assert judged.status_code == 200 and judged.json()["ack"] == {**ack, "verdict": "confirmed"}
    assert viewer.post(path, json={"verdict": "false_alarm"}).json()["ack"] == judged.json()["ack"]
    listed = {row["id"]: row for row in viewer.get("/api/alerts").json()}
    assert listed[a.id]["ack"]["verdict"] == "confirmed"

    viewer.seq += 1
    b = viewer.alert()  # another alert, acknowledged and judged at once
    assert b.id != a.id
    one = viewer.post(f"/api/alerts/{b.id}/ack", json={"verdict": "false_alarm", "note": "steam, not smoke"})
    assert (one.json()["ack"]["by"], one.json()["ack"]["verdict"]) == ("viewer (bearer)", "false_alarm")


def test_static_files_cannot_be_reached_outside_the_static_folder(viewer):
    assert viewer.raw_get("/static/app.js")[0] == 200
    assert viewer.raw_get("/static/app.js", token=None)[0] == 200  # the login page needs it
    for path in ("/static/../service.py", "/static/%2e%2e/service.py", "/static/..%2fservice.py",
                 "/static/%2e%2e%2fservice.py", "/static/..%2Fservice.py", "/static/..", "/static/.",
                 "/static/", "/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/pyproject.toml",
                 "/static//etc/passwd", "/static/.%2e/service.py", "/static/..\\service.py",
                 "/static/%5c..%5cservice.py", "/static/nothing.js"):
        code, body = viewer.raw_get(path)
        assert code == 404, path
        assert b"ViewerService" not in body and b"root:" not in body and b"[project]" not in body, path


# --- pictures -----------------------------------------------------------------------------------------------
def test_frame_jpeg_is_the_picture_at_the_frame_size_with_overlays(viewer):
    image = scene_image()
    frame_id = viewer.frame("press-1", image)
    viewer.result("press-1", "detect", frame_id, DETECT)
    viewer.result("press-1", "classify", frame_id, CLASSIFY)
    resp = viewer.get("/api/cameras/press-1/frame.jpg")
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "image/jpeg"
    assert resp.headers["X-Frame-Id"] == frame_id and resp.headers["X-Content-Type-Options"] == "nosniff"
    got = cv2.cvtColor(cv2.imdecode(np.frombuffer(resp.content, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert got.shape == image.shape

    (_, fields), = viewer.r.xrange(viewer.keys.frames, frame_id, frame_id)
    base = decode_frame(Frame.from_msgpack(fields[b"m"]))
    want = draw(base, {"detect": DETECT, "classify": CLASSIFY}, {"belt": BELT})
    assert float(np.abs(got.astype(int) - want.astype(int)).mean()) < 4.0  # the same picture, JPEG apart
    assert float(np.abs(got.astype(int) - base.astype(int)).mean()) > 2.0  # with the drawings on it
    edge = got[55, 19:22].astype(int)  # the box's left side, in the leak class colour
    assert np.abs(edge - np.array(BOX_COLOURS[1])).sum(axis=1).min() < 90, edge

    # a thermal camera: 16-bit centikelvin frame, coloured, at its size
    kelvin = np.full((60, 80), 30000, np.uint16)
    kelvin[20:30, 40:50] = 45000
    kiln_id = viewer.frame("kiln-1", kelvin)
    viewer.result("kiln-1", "thermal", kiln_id, {"max_k": 450.0, "avg_k": 305.0, "min_k": 300.0,
                                                 "hotspots": [[45, 25, 450.0]]})
    resp = viewer.get("/api/cameras/kiln-1/frame.jpg")
    assert resp.status_code == 200 and resp.headers["X-Frame-Id"] == kiln_id
    assert cv2.imdecode(np.frombuffer(resp.content, np.uint8), cv2.IMREAD_UNCHANGED).shape == (60, 80, 3)


def test_a_result_the_overlay_cannot_read_still_shows_the_frame(viewer):
    frame_id = viewer.frame("press-1", scene_image())
    viewer.result("press-1", "detect", frame_id, {"boxes": [[1, 2, 3]], "classes": []})
    resp = viewer.get("/api/cameras/press-1/frame.jpg")
    assert resp.status_code == 200 and resp.headers["X-Frame-Id"] == frame_id
    assert cv2.imdecode(np.frombuffer(resp.content, np.uint8), cv2.IMREAD_COLOR).shape == (240, 320, 3)


class Mjpeg:
    """Reads multipart/x-mixed-replace parts off a raw socket, each with a deadline."""

    def __init__(self, port: int, path: str, token: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        self.buf = b""
        head = self._until(b"\r\n\r\n", time.monotonic() + 10)
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = dict(line.split(": ", 1) for line in lines[1:])

    def _until(self, marker: bytes, deadline: float) -> bytes | None:
        while marker not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                raise EOFError("the server closed the stream")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(marker)
        return head

    def part(self, within: float) -> tuple[str | None, bytes] | None:
        """(X-Frame-Id, JPEG) of the next part, or None when none comes within `within` seconds; ``meta``
        keeps the part's headers."""
        deadline = time.monotonic() + within
        head = self._until(b"\r\n\r\n", deadline)
        if head is None:
            return None
        meta = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
        n = int(meta["Content-Length"])
        while len(self.buf) < n + 2:
            self.sock.settimeout(max(0.1, deadline - time.monotonic() + 5))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the stream inside a part")
            self.buf += chunk
        body, self.buf = self.buf[:n], self.buf[n + 2:]
        self.meta = meta
        return meta.get("X-Frame-Id"), body

    def close(self):
        self.sock.close()


def test_live_mjpeg_sends_a_part_only_when_the_picture_changes(viewer):
    first = viewer.frame("press-1", scene_image(1))
    viewer.result("press-1", "classify", first, CLASSIFY)
    live = Mjpeg(viewer.port, "/api/cameras/press-1/live.mjpg", READ)
    try:
        assert live.status == 200
        assert live.headers["Content-Type"] == "multipart/x-mixed-replace; boundary=plantsightframe"
        assert live.headers["X-Content-Type-Options"] == "nosniff"
        frame_id, jpeg = live.part(5)
        assert frame_id == first
        assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (240, 320, 3)
        assert live.part(1.5) is None  # six polls, the same picture: nothing sent
        second = viewer.frame("press-1", scene_image(2))
        assert live.part(1.5) is None  # a frame without results yet is not the picture
        viewer.result("press-1", "classify", second, CLASSIFY)
        assert live.part(5)[0] == second
        third = viewer.frame("press-1", scene_image(3))
        viewer.result("press-1", "detect", third, DETECT)
        assert live.part(5)[0] == third
        assert live.part(1.0) is None
    finally:
        live.close()


def test_a_frame_that_does_not_decode_does_not_end_the_live_stream(viewer):
    first = viewer.frame("press-1", scene_image(1))
    viewer.result("press-1", "classify", first, CLASSIFY)
    live = Mjpeg(viewer.port, "/api/cameras/press-1/live.mjpg", READ)
    try:
        assert live.part(5)[0] == first
        broken = Frame(camera="press-1", seq=viewer.seq + 1, ts=time.time_ns(), enc="jpeg", shape=(240, 320, 3),
                       dtype="uint8", data=b"\xff\xd8 not a jpeg")
        viewer.seq += 1
        bad_id = viewer.frames.add(broken.to_msgpack(), cam="press-1")
        viewer.result("press-1", "classify", bad_id, CLASSIFY)
        time.sleep(1.0)  # the viewer polls the broken picture a few times
        good = viewer.frame("press-1", scene_image(2))
        viewer.result("press-1", "classify", good, CLASSIFY)
        assert live.part(5)[0] == good
    finally:
        live.close()
    assert viewer.get("/api/cameras/press-1/frame.jpg").headers["X-Frame-Id"] == good


GREYS = (20, 60, 100, 140, 180, 220)


def write_clip(viewer, alert_id: str, fps: float) -> None:
    """An evidence clip as the alert service writes it (mp4v): one flat grey picture per level in GREYS."""
    d = viewer.cfg.alerts.evidence_dir / alert_id
    d.mkdir(parents=True)
    writer = cv2.VideoWriter(str(d / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), fps, (160, 120))
    assert writer.isOpened()
    for level in GREYS:
        writer.write(np.full((120, 160, 3), level, np.uint8))
    writer.release()


def test_an_alert_clip_plays_in_the_browser_as_mjpeg_once_and_in_order(viewer):
    a = viewer.alert()
    path = f"/api/alerts/{a.id}/clip.mjpg"
    assert viewer.get(path).status_code == 404  # no clip written (yet)
    assert viewer.get(path, token=None).status_code == 401
    write_clip(viewer, a.id, fps=20)
    play = Mjpeg(viewer.port, path, READ)
    try:
        assert play.status == 200
        assert play.headers["Content-Type"] == "multipart/x-mixed-replace; boundary=plantsightframe"
        assert play.headers["Content-Security-Policy"] == CSP
        seen = []
        for _ in GREYS:
            _, jpeg = play.part(5)
            picture = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            assert picture.shape == (120, 160, 3)
            seen.append((int(play.meta["X-Clip-Frame"]), round(float(picture.mean()))))
        assert [i for i, _ in seen] == list(range(len(GREYS)))
        assert all(abs(mean - level) <= 6 for (_, mean), level in zip(seen, GREYS)), seen  # YUV rounding: 3-4
        with pytest.raises(EOFError):  # played once: the stream ends with the clip
            play.part(5)
    finally:
        play.close()


def test_at_most_max_clip_plays_clips_play_at_once_and_a_leaving_viewer_frees_its_place(viewer):
    a = viewer.alert()
    write_clip(viewer, a.id, fps=1)  # six seconds long
    path = f"/api/alerts/{a.id}/clip.mjpg"
    plays = [Mjpeg(viewer.port, path, READ) for _ in range(MAX_CLIP_PLAYS)]
    try:
        for play in plays:
            assert play.part(5) is not None  # each is playing
        resp = viewer.get(path)
        assert resp.status_code == 503 and "clips are playing already" in resp.json()["error"]
    finally:
        for play in plays:
            play.close()
    # the server notices a closed stream at its next picture (one second at 1 fps)
    wait_until(lambda: viewer.svc._clip_plays == 0, 10, "the closed clip streams to end", poll=0.1)
    again = Mjpeg(viewer.port, path, READ)
    try:
        assert again.status == 200 and again.part(5) is not None
    finally:
        again.close()
