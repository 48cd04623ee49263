"""viewer: the web page people look at — live cameras with overlays, the alert log with evidence, health.

Plain HTML, CSS and a little JavaScript from ``static/``, served by this process next to a JSON API
under ``/api/`` that the pages use (and anyone else may: docs/viewer.md). Everything but ``/healthz``,
``/readyz`` and the login page needs a token (`auth.py`). Live video is MJPEG: the browser shows
``/api/cameras/<id>/live.mjpg`` in an ``<img>``; one rendering per camera and frame is shared by all
viewers, so ten people watching cost what one does. An alert's evidence clip plays the same way
(``/api/alerts/<id>/clip.mjpg``): browsers do not play the MPEG-4 Part 2 that ``clip.mp4`` holds, and
encoding a format they play (VP8) costs the alert service many times the CPU of mp4v for every frame of
every alert, so the clip is decoded and sent as JPEG pictures only while someone watches it.

Requests are dispatched by one table, ``ROUTES``: a method and a path pattern name the handler, so every
URL the viewer answers, and whether it needs a token, reads in one place.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, quote

import cv2
import redis

from services.viewer.auth import LOGOUT_COOKIE, OPERATOR, Tokens
from services.viewer.data import ViewerData, valid_alert_id
from shared.acks import BadVerdict, UnknownAlert, acknowledge
from shared.endpoints import HttpRequest, HttpResponse
from shared.messages import DecodeError
from shared.overlay import draw, encode_jpeg
from shared.service import Service
from shared.streams.connection import REDIS_DOWN

STATIC = Path(__file__).with_name("static")
# page name (the one app.js dispatches on) → (the page's <main> in static/, its title); one layout for all
PAGES = {"grid": ("grid.html", "Cameras"), "alerts": ("alerts.html", "Alerts"), "health": ("health.html", "Health"),
         "camera": ("camera.html", "Camera"), "alert": ("alert.html", "Alert")}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
EVIDENCE_TYPES = {"snapshot.jpg": "image/jpeg", "clip.mp4": "video/mp4", "evidence.json": "application/json"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; media-src 'self'; "
                               "style-src 'self'; script-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
}
LIVE_PERIOD_S = 0.25  # MJPEG: at most four pictures a second per camera, plenty to watch a process
LIVE_KEEPALIVE_S = 10.0  # the same picture again after this long, so a stream whose viewer left ends
# A same-site path: browsers read "/\\host" and "/<tab>/host" as "//host", another site.
SAFE_PATH = re.compile(r"/(?![/\\])[^\\\s]*")
BOUNDARY = "plantsightframe"
MJPEG_TYPE = f"multipart/x-mixed-replace; boundary={BOUNDARY}"
MAX_CLIP_PLAYS = 4  # clips playing at once (each decodes and encodes its own pictures); more get 503


class Route(NamedTuple):
    """One line of the route table.

    ``methods``: the methods it answers, space-separated, ``"*"`` for all that the HTTP server passes
    on (GET, HEAD, POST); ``pattern``: a regular expression the whole path must match; ``handler``: the
    name of the `ViewerService` method that answers, called as ``handler(req, who, **groups, **args)``
    with the pattern's named groups and the route's fixed ``args``; ``public``: answered without a token
    (the login page and what it needs).
    """

    methods: str
    pattern: str
    handler: str
    public: bool = False
    args: dict[str, str] = {}


class Who(NamedTuple):
    """The caller: their role (READ, OPERATOR, or None without a valid token) and how they proved it
    (``"bearer"``, ``"cookie"`` or ``""``)."""

    role: str | None
    how: str


# The first route whose methods hold the request's method and whose pattern matches its path (without a
# trailing "/") answers; a path no route matches is 404, and so is a handler's None. Every route but the
# public ones needs a token, checked before the handler runs. Under a camera or an alert, a path that no
# other route takes still says when the camera is unknown or the id is not a UUID.
ROUTES = (
    # the login page and what it needs: no token
    Route("*", r"/static/(?P<name>.*)", "static", public=True),
    Route("GET HEAD", r"/login", "login_form", public=True),
    Route("POST", r"/login", "login", public=True),
    Route("*", r"/logout", "logout", public=True),
    # the JSON API: reads, and one write (acknowledging an alert)
    Route("GET HEAD", r"/api/me", "api_me"),
    Route("GET HEAD", r"/api/cameras", "api_cameras"),
    Route("GET HEAD", r"/api/cameras/(?P<camera>[^/]*)", "api_camera"),
    Route("GET HEAD", r"/api/cameras/(?P<camera>[^/]*)/frame\.jpg", "api_frame"),
    Route("GET HEAD", r"/api/cameras/(?P<camera>[^/]*)/live\.mjpg", "api_live"),
    Route("GET HEAD", r"/api/cameras/(?P<camera>[^/]*)/.*", "api_camera_other"),
    Route("GET HEAD", r"/api/alerts", "api_alerts"),
    Route("GET HEAD", r"/api/alerts/(?P<alert_id>[^/]*)", "api_alert"),
    Route("GET HEAD", r"/api/alerts/(?P<alert_id>[^/]*)/(?P<name>snapshot\.jpg|clip\.mp4|evidence\.json)",
          "api_evidence"),
    Route("GET HEAD", r"/api/alerts/(?P<alert_id>[^/]*)/clip\.mjpg", "api_clip"),
    Route("GET HEAD", r"/api/alerts/(?P<alert_id>[^/]*)/.*", "api_alert_other"),
    Route("GET HEAD", r"/api/streams", "api_streams"),
    Route("GET HEAD", r"/api/services", "api_services"),
    Route("GET HEAD", r"/api/shadow", "api_shadow"),
    Route("POST", r"/api/alerts/(?P<alert_id>[^/]*)/ack", "ack"),
    Route("POST", r"(?P<path>/api/.*)", "post_not_allowed"),
    # the pages: one layout around each page's <main>
    Route("*", r"/", "page", args={"name": "grid"}),
    Route("*", r"/alerts", "page", args={"name": "alerts"}),
    Route("*", r"/health", "page", args={"name": "health"}),
    Route("*", r"/cameras/[^/]+", "page", args={"name": "camera"}),
    Route("*", r"/alerts/[^/]+", "page", args={"name": "alert"}),
)
_COMPILED = tuple((frozenset(r.methods.split()), re.compile(r.pattern), r) for r in ROUTES)


def find_route(method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    """The first route for ``method`` and ``path`` with the pattern's named groups, or None."""
    for methods, pattern, route in _COMPILED:
        if "*" in methods or method in methods:
            m = pattern.fullmatch(path)
            if m:
                return route, m.groupdict()
    return None


def mjpeg_part(jpeg: bytes, header: str, value) -> bytes:
    """One part of a ``multipart/x-mixed-replace`` MJPEG stream, with one header saying which picture it is."""
    return (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n"
            f"{header}: {value}\r\n\r\n").encode() + jpeg + b"\r\n"


def _json(data, code: int = 200) -> HttpResponse:
    return HttpResponse(code, json.dumps(data, default=str).encode(), "application/json",
                        dict(SECURITY_HEADERS))


def _error(code: int, message: str) -> HttpResponse:
    return _json({"error": message}, code)


class ViewerService(Service):
    name = "viewer"

    def __init__(self, cfg, tokens: Tokens | None = None, **kw):
        self.tokens = tokens or Tokens()  # before anything else: no token, no viewer
        super().__init__(cfg, **kw)
        self.data = ViewerData(cfg, self.r)
        self._renders: dict[str, tuple[float, str, bytes]] = {}  # camera → (time, frame id, jpeg)
        self._render_locks = {c.id: threading.Lock() for c in cfg.cameras}  # one render per camera at a time
        self._bad_overlay: set[str] = set()
        self._bad_frame: set[str] = set()
        self._clip_plays = 0
        self._clip_lock = threading.Lock()

    def step(self) -> None:
        self.r.ping()  # readiness follows Redis; the pages do their reads on the HTTP threads
        self.stop.wait(1.0)

    # --- pictures --------------------------------------------------------------------------
    def render(self, camera: str) -> tuple[str, bytes] | None:
        """(frame id, JPEG) of the camera's newest picture with its results drawn; shared for LIVE_PERIOD_S."""
        with self._render_locks[camera]:
            cached = self._renders.get(camera)
            if cached and time.monotonic() - cached[0] < LIVE_PERIOD_S:
                return cached[1], cached[2]
            try:
                got = self.data.picture(camera)
            except DecodeError as e:  # a frame that does not decode: keep the last good picture, say why once
                if camera not in self._bad_frame:
                    self._bad_frame.add(camera)
                    self.log.warning("camera %s: %s (showing the last good picture)", camera, e)
                return (cached[1], cached[2]) if cached else None
            if got is None:
                return None
            image, results, frame_id = got
            if cached and cached[1] == frame_id:
                jpeg = cached[2]
            else:
                try:
                    picture = draw(image, results, self.data.zones(camera))
                except ValueError as e:  # a result the overlay cannot read: show the frame, say why once
                    if camera not in self._bad_overlay:
                        self._bad_overlay.add(camera)
                        self.log.warning("camera %s: %s (showing the frame without overlays)", camera, e)
                    picture = draw(image, {})
                jpeg = encode_jpeg(picture, quality=80)
            self._renders[camera] = (time.monotonic(), frame_id, jpeg)
            return frame_id, jpeg

    def live(self, camera: str):
        """multipart/x-mixed-replace chunks: a new part whenever the camera's picture changes."""
        last, sent = None, time.monotonic()
        while not self.stop.is_set():
            try:
                got = self.render(camera)
            except (*REDIS_DOWN, redis.RedisError) as e:  # Redis away for a moment: the stream waits for it
                self.log.debug("live view of camera %s: %s", camera, e)
                got = None
            if got is not None and (got[0] != last or time.monotonic() - sent >= LIVE_KEEPALIVE_S):
                last, sent = got[0], time.monotonic()
                yield mjpeg_part(got[1], "X-Frame-Id", got[0])
            self.stop.wait(LIVE_PERIOD_S)

    def play_clip(self, alert_id: str, file: Path):
        """multipart/x-mixed-replace chunks: the clip's pictures as JPEG at its own pace (1 to 30 a second),
        once; the stream ends with the clip. Each part says which picture it is (``X-Clip-Frame``, from 0)."""
        with self._clip_lock:
            self._clip_plays += 1
        cap = cv2.VideoCapture(str(file))
        try:
            fps = cap.get(cv2.CAP_PROP_FPS) if cap.isOpened() else 0.0
            period = 1.0 / min(30.0, max(1.0, fps or 10.0))
            index, next_t = 0, time.monotonic()
            while not self.stop.is_set():
                ok, picture = cap.read()
                if not ok:
                    break
                ok, jpeg = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 80])
                if ok:
                    yield mjpeg_part(jpeg.tobytes(), "X-Clip-Frame", index)
                index += 1
                next_t += period
                self.stop.wait(max(0.0, next_t - time.monotonic()))
            if index == 0 and not self.stop.is_set():
                self.log.warning("alert %s: %s has no picture that decodes", alert_id, file.name)
        finally:
            cap.release()
            with self._clip_lock:
                self._clip_plays -= 1

    # --- HTTP: the gate, then the route table ------------------------------------------------------
    def handle_http(self, req: HttpRequest) -> HttpResponse | None:
        path = req.path.rstrip("/") or "/"
        found = find_route(req.method, path)
        who = Who(*self.tokens.role(req.headers))
        if who.role is None and not (found and found[0].public):
            return self.refuse(req, path)
        if found is None:
            return None
        route, groups = found
        return getattr(self, route.handler)(req, who, **groups, **route.args)

    def refuse(self, req: HttpRequest, path: str) -> HttpResponse:
        """A request without a valid token: 401 from the API; a page sends the browser to the login form,
        or, with a valid ``?token=`` link, sets the cookie and sends it on without the token in the address."""
        if path.startswith("/api/"):
            return HttpResponse(401, b'{"error": "a token is required (Authorization: Bearer ...)"}',
                                "application/json", {"WWW-Authenticate": 'Bearer realm="plantsight"'})
        link_token = (req.query.get("token") or [None])[0]
        if not link_token:
            return HttpResponse(303, b"", headers={"Location": "/login?next=" + quote(path)})
        if self.tokens.role_of_token(link_token) is None:
            return self.login_page(401, "That link's token is not valid.")
        rest = "&".join(f"{quote(k)}={quote(x)}" for k, vs in req.query.items() if k != "token" for x in vs)
        target = (path if SAFE_PATH.fullmatch(path) else "/") + (f"?{rest}" if rest else "")
        cookie = self.tokens.cookie_header(link_token, self.secure(req))
        return HttpResponse(303, b"", headers={"Location": target, "Set-Cookie": cookie})

    def page(self, req: HttpRequest, who: Who, name: str) -> HttpResponse:
        """static/layout.html around the page's own <main> (fixed strings only: no data goes into HTML)."""
        main, title = PAGES[name]
        html = ((STATIC / "layout.html").read_text().replace("{{title}}", title).replace("{{page}}", name)
                .replace("{{main}}", (STATIC / main).read_text()))
        return HttpResponse(200, html.encode(), CONTENT_TYPES[".html"], dict(SECURITY_HEADERS))

    def secure(self, req: HttpRequest) -> bool:
        """Mark the cookie Secure when people reach the viewer over HTTPS (a TLS proxy in front)."""
        return (req.headers.get("X-Forwarded-Proto", "").lower() == "https"
                or (self.cfg.alerts.public_url or "").startswith("https://"))

    def static(self, req: HttpRequest, who: Who, name: str) -> HttpResponse:
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            return HttpResponse(404, b"not found\n")
        ctype = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        return HttpResponse(200, path.read_bytes(), ctype, dict(SECURITY_HEADERS))

    def login_page(self, code: int = 200, message: str = "") -> HttpResponse:
        page = (STATIC / "login.html").read_text().replace("{{message}}", message)
        return HttpResponse(code, page.encode(), CONTENT_TYPES[".html"], dict(SECURITY_HEADERS))

    def login_form(self, req: HttpRequest, who: Who) -> HttpResponse:
        return self.login_page()

    def login(self, req: HttpRequest, who: Who) -> HttpResponse:
        form = parse_qs(req.body.decode(errors="replace"))
        token = (form.get("token") or [""])[0].strip()
        nxt = (form.get("next") or ["/"])[0]
        if not SAFE_PATH.fullmatch(nxt):
            nxt = "/"  # never an open redirect
        if self.tokens.role_of_token(token) is None:
            self.log.warning("viewer login refused (wrong token)")
            return self.login_page(401, "That token is not valid.")
        cookie = self.tokens.cookie_header(token, self.secure(req))
        return HttpResponse(303, b"", headers={"Location": nxt, "Set-Cookie": cookie})

    def logout(self, req: HttpRequest, who: Who) -> HttpResponse:
        return HttpResponse(303, b"", headers={"Location": "/login", "Set-Cookie": LOGOUT_COOKIE})

    # --- the JSON API ------------------------------------------------------------------------------
    def api_me(self, req: HttpRequest, who: Who) -> HttpResponse:
        return _json({"role": who.role})

    def api_cameras(self, req: HttpRequest, who: Who) -> HttpResponse:
        return _json(self.data.cameras())

    def unknown_camera(self, camera: str) -> HttpResponse | None:
        """404 for a camera the config does not name, else None."""
        return None if camera in self.data.cameras_cfg else _error(404, f"no camera {camera!r}")

    def api_camera(self, req: HttpRequest, who: Who, camera: str) -> HttpResponse:
        return self.unknown_camera(camera) or _json(self.data.camera(camera))

    def api_frame(self, req: HttpRequest, who: Who, camera: str) -> HttpResponse:
        if refused := self.unknown_camera(camera):
            return refused
        got = self.render(camera)
        if got is None:
            return _error(404, f"camera {camera!r} has no frame in the stream yet")
        return HttpResponse(200, got[1], "image/jpeg", {**SECURITY_HEADERS, "X-Frame-Id": got[0]})

    def api_live(self, req: HttpRequest, who: Who, camera: str) -> HttpResponse:
        if refused := self.unknown_camera(camera):
            return refused
        return HttpResponse(200, self.live(camera), MJPEG_TYPE, dict(SECURITY_HEADERS))

    def api_camera_other(self, req: HttpRequest, who: Who, camera: str) -> HttpResponse | None:
        return self.unknown_camera(camera)  # a camera's other paths: 404 either way, naming an unknown camera

    def api_alerts(self, req: HttpRequest, who: Who) -> HttpResponse:
        q = {k: v[0] for k, v in req.query.items() if v}
        limit = int(q["limit"]) if q.get("limit", "").isdigit() else 200
        return _json(self.data.alerts(q.get("camera"), q.get("rule"), q.get("severity"), q.get("state"),
                                      limit=min(limit, 2000)))

    @staticmethod
    def invalid_alert(alert_id: str) -> HttpResponse | None:
        """404 for an id that is not a UUID, else None."""
        return None if valid_alert_id(alert_id) else _error(404, "alert ids are UUIDs")

    def api_alert(self, req: HttpRequest, who: Who, alert_id: str) -> HttpResponse:
        if refused := self.invalid_alert(alert_id):
            return refused
        alert = self.data.alert(alert_id)
        return _json(alert) if alert else _error(404, f"no alert {alert_id}")

    def api_evidence(self, req: HttpRequest, who: Who, alert_id: str, name: str) -> HttpResponse:
        if refused := self.invalid_alert(alert_id):
            return refused
        file = self.data.evidence_path(alert_id, name)
        if file is None:
            return _error(404, f"alert {alert_id} has no {name}")
        headers = dict(SECURITY_HEADERS)
        if name == "clip.mp4":
            headers["Content-Disposition"] = f'attachment; filename="{alert_id}.mp4"'
        return HttpResponse(200, file.read_bytes(), EVIDENCE_TYPES[name], headers)

    def api_clip(self, req: HttpRequest, who: Who, alert_id: str) -> HttpResponse:
        if refused := self.invalid_alert(alert_id):
            return refused
        file = self.data.evidence_path(alert_id, "clip.mp4")
        if file is None:
            return _error(404, f"alert {alert_id} has no clip.mp4")
        if self._clip_plays >= MAX_CLIP_PLAYS:
            return _error(503, f"{MAX_CLIP_PLAYS} clips are playing already: try again, or download clip.mp4")
        return HttpResponse(200, self.play_clip(alert_id, file), MJPEG_TYPE, dict(SECURITY_HEADERS))

    def api_alert_other(self, req: HttpRequest, who: Who, alert_id: str) -> HttpResponse | None:
        return self.invalid_alert(alert_id)  # an alert's other paths: 404 either way, naming a bad id

    def api_streams(self, req: HttpRequest, who: Who) -> HttpResponse:
        return _json(self.data.streams())

    def api_services(self, req: HttpRequest, who: Who) -> HttpResponse:
        return _json(self.data.services())

    def api_shadow(self, req: HttpRequest, who: Who) -> HttpResponse:
        return _json(self.data.shadows())

    def post_not_allowed(self, req: HttpRequest, who: Who, path: str) -> HttpResponse:
        return _error(405, f"POST is not allowed on {path}")

    def ack(self, req: HttpRequest, who: Who, alert_id: str) -> HttpResponse:
        if who.role != OPERATOR:
            return _error(403, "acknowledging needs the operator token")
        if who.how == "cookie" and req.headers.get("X-Requested-With") != "plantsight":
            return _error(403, "a page must send X-Requested-With: plantsight")  # no cross-site form posts
        if not valid_alert_id(alert_id):
            return _error(404, "alert ids are UUIDs")
        try:
            body = json.loads(req.body or b"{}")
        except ValueError:
            return _error(400, "the body must be JSON (or empty)")
        note = str(body.get("note", ""))[:500] if isinstance(body, dict) else ""
        verdict = body.get("verdict") if isinstance(body, dict) else None
        try:
            record = acknowledge(self.r, self.keys.prefix, alert_id, by=f"viewer ({who.how})", note=note,
                                 verdict=verdict)
        except BadVerdict as e:
            return _error(400, str(e))
        except UnknownAlert:
            return _error(404, f"no alert {alert_id}")
        self.log.info("alert %s acknowledged from the viewer (verdict: %s)", alert_id, record.get("verdict") or "none")
        return _json({"id": alert_id, "ack": record})


_unhandled = sorted({r.handler for r in ROUTES} - set(dir(ViewerService)))
if _unhandled:  # a typo in the table fails at import, not on the first request that takes the route
    raise TypeError(f"ROUTES name handlers that ViewerService lacks: {', '.join(_unhandled)}")
