"""The viewer against a running `plantsight up --demo`: its JSON API, its tokens, and a real Chromium.

One demo pipeline (real Redis, every service a real process) serves the whole module; the browser test
drives Debian's chromium through chromedriver and keeps its screenshots under ``artifacts/viewer/``.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid

import cv2
import httpx
import numpy as np
import pytest

from shared.config import demo_config
from shared.keys import Keys
from shared.messages import Frame
from tests.support.demo import OPERATOR, READ, SERVICES, Demo
from tests.support.paths import ARTIFACTS

pytestmark = pytest.mark.slow

DEMO = demo_config({"PLANTSIGHT_DEMO_MODELS": "/nonexistent"})
CAMERAS = {c.id: c for c in DEMO.cameras}
PREFIX = DEMO.redis.prefix


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = Demo(tmp_path_factory.mktemp("viewer"), trained=True)
    try:
        d.wait_for(lambda: d.get("/api/cameras").status_code == 200 and all(
            set(c["latest"]) == set(CAMERAS[c["id"]].tasks) for c in d.get("/api/cameras").json()),
            240, "a result of every demo camera through the viewer")
        yield d
    finally:
        d.stop()


def test_without_a_token_only_health_answers(demo):
    assert httpx.get(demo.base + "/healthz").status_code == 200
    assert httpx.get(demo.base + "/readyz").status_code == 200
    for path in ("/api/cameras", "/api/alerts", "/api/streams", f"/api/cameras/{next(iter(CAMERAS))}/frame.jpg"):
        resp = demo.get(path, token=None)
        assert resp.status_code == 401, path
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert demo.get(path, token="not-the-token-at-all").status_code == 401, path
    page = demo.get("/", token=None, follow_redirects=False)
    assert page.status_code == 303 and page.headers["Location"].startswith("/login")
    login = demo.get("/login", token=None)
    assert login.status_code == 200 and 'name="token"' in login.text


def test_cameras_lists_every_demo_camera_with_its_latest_results(demo):
    rows = demo.get("/api/cameras").json()
    assert [c["id"] for c in rows] == list(CAMERAS)
    for c in rows:
        assert c["up"] is True, c
        assert c["tasks"] == list(CAMERAS[c["id"]].tasks)
        assert c["fps"] > 0
    one = demo.get("/api/cameras/kiln-1").json()
    assert set(one["results"]) == {"thermal"}
    out = one["results"]["thermal"]["out"]
    assert out["max_k"] >= out["avg_k"] >= out["min_k"]
    assert set(one["history"]) == {"thermal"} and len(one["history"]["thermal"]) >= 1
    assert demo.get("/api/cameras/no-such-camera").status_code == 404


def test_frame_jpeg_is_the_camera_picture_at_its_size(demo):
    for cam_id in CAMERAS:
        resp = demo.get(f"/api/cameras/{cam_id}/frame.jpg")
        assert resp.status_code == 200 and resp.headers["Content-Type"] == "image/jpeg"
        img = cv2.imdecode(np.frombuffer(resp.content, np.uint8), cv2.IMREAD_COLOR)
        frame_id = resp.headers["X-Frame-Id"]
        (_, fields), = demo.r.xrange(f"{PREFIX}:frames", frame_id, frame_id)
        frame = Frame.from_msgpack(fields[b"m"])
        assert frame.camera == cam_id
        assert img.shape[:2] == tuple(frame.shape[:2]), cam_id


def test_live_mjpeg_sends_each_new_picture(demo):
    seen = []
    with httpx.Client(timeout=20) as client:
        with client.stream("GET", demo.base + "/api/cameras/kiln-1/live.mjpg",
                           headers={"Authorization": f"Bearer {READ}"}) as resp:
            assert resp.status_code == 200
            assert resp.headers["Content-Type"].startswith("multipart/x-mixed-replace; boundary=")
            buf = b""
            for chunk in resp.iter_bytes():
                buf += chunk
                while b"\r\n\r\n" in buf:
                    head, _, rest = buf.partition(b"\r\n\r\n")
                    meta = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
                    n = int(meta["Content-Length"])
                    if len(rest) < n + 2:
                        break
                    assert cv2.imdecode(np.frombuffer(rest[:n], np.uint8), cv2.IMREAD_COLOR) is not None
                    seen.append(meta["X-Frame-Id"])
                    buf = rest[n + 2:]
                if len(seen) >= 3:
                    break
    assert len(seen) == 3 and len(set(seen)) == 3, seen  # a part only when the picture changed


def test_streams_and_services_show_the_whole_pipeline(demo):
    names = Keys(PREFIX)
    rows = {row["stream"]: row for row in demo.get("/api/streams").json()}
    assert set(rows) == {s for s, _ in names.all(DEMO.tasks())}
    assert rows[names.frames]["group"] == "preprocess" and rows[names.frames]["length"] > 0
    assert "reasons" in rows[names.deadletter]
    services = demo.wait_for(lambda: [s for s in demo.get("/api/services").json() if s["up"] and s["ready"]]
                             if len({s["service"] for s in demo.get("/api/services").json()
                                     if s["up"] and s["ready"]}) == len(SERVICES) else None,
                             30, "every service's heartbeat")
    assert {s["service"] for s in services} == set(SERVICES)
    assert {s["port"] for s in services} == set(demo.ports.values())


def test_a_token_link_sets_an_http_only_cookie_without_the_token(demo):
    resp = demo.get(f"/alerts?state=firing&token={READ}", token=None, follow_redirects=False)
    assert resp.status_code == 303
    assert resp.headers["Location"] == "/alerts?state=firing"  # the token leaves the address bar
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and READ not in cookie
    value = cookie.split(";", 1)[0]
    page = httpx.get(demo.base + "/alerts", headers={"Cookie": value})
    assert page.status_code == 200 and "<table" in page.text
    assert httpx.get(demo.base + "/api/me", headers={"Cookie": value}).json() == {"role": "read"}
    bad = demo.get("/?token=wrong-token-wrong-token", token=None, follow_redirects=False)
    assert bad.status_code == 401
    form = httpx.post(demo.base + "/login", data={"token": OPERATOR, "next": "//evil.example/"},
                      follow_redirects=False)
    assert form.status_code == 303 and form.headers["Location"] == "/"  # no open redirect


def _an_alert(demo, need_snapshot: bool = False) -> dict:
    """An alert nobody has acknowledged (with its snapshot written, if asked)."""
    def find():
        for a in demo.get("/api/alerts").json():
            if a["ack"] is None and (not need_snapshot or "snapshot.jpg" in a["evidence"]):
                return a
        return None
    return demo.wait_for(find, 120, "an unacknowledged alert" + (" with a snapshot" if need_snapshot else ""))


def test_acknowledging_needs_the_operator_token_and_sticks(demo):
    alert = _an_alert(demo)
    path = f"/api/alerts/{alert['id']}/ack"
    assert demo.post(path, token=READ).status_code == 403
    assert demo.post(path, token=None).status_code == 401
    assert demo.post(f"/api/alerts/{uuid.uuid4()}/ack").status_code == 404
    assert demo.post("/api/alerts/not-a-uuid/ack").status_code == 404
    first = demo.post(path, json={"note": "seen, maintenance informed"})
    assert first.status_code == 200, first.text
    ack = first.json()["ack"]
    assert ack["note"] == "seen, maintenance informed"
    assert demo.post(path).json()["ack"] == ack  # the first acknowledgement stands
    assert demo.get(f"/api/alerts/{alert['id']}").json()["ack"] == ack
    listed = {a["id"]: a for a in demo.get("/api/alerts").json()}
    assert listed[alert["id"]]["ack"] == ack


def test_no_token_appears_in_pages_or_logs(demo):
    for path in ("/", "/alerts", "/health", f"/cameras/{next(iter(CAMERAS))}", "/static/app.js"):
        body = demo.get(path).text
        assert READ not in body and OPERATOR not in body, path
    log = demo.tail(100000)
    assert READ not in log and OPERATOR not in log


# --- a real browser ------------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(what: str, predicate, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"the browser did not show {what} within {timeout:.0f} s")


def test_a_browser_sees_live_cameras_opens_an_alert_and_acknowledges_it(demo, browser):
    from selenium.webdriver.common.by import By

    shots = ARTIFACTS / "viewer"
    shots.mkdir(parents=True, exist_ok=True)
    browser.get(f"{demo.base}/?token={OPERATOR}")
    assert "token=" not in browser.current_url
    cards = _wait("a card per camera", lambda: (lambda c: c if len(c) == len(CAMERAS) else None)(
        browser.find_elements(By.CSS_SELECTOR, ".card")))
    assert [c.get_attribute("data-camera") for c in cards] == list(CAMERAS)
    loaded = "return arguments[0].complete && arguments[0].naturalWidth > 0"
    for card in cards:
        img = card.find_element(By.TAG_NAME, "img")
        _wait(f"camera {card.get_attribute('data-camera')}'s picture", lambda: browser.execute_script(loaded, img))
    first = {c.get_attribute("data-camera"): c.find_element(By.TAG_NAME, "img").screenshot_as_png for c in cards}
    browser.save_screenshot(str(shots / "grid.png"))

    def changed():
        return {c.get_attribute("data-camera") for c in cards
                if c.find_element(By.TAG_NAME, "img").screenshot_as_png != first[c.get_attribute("data-camera")]}
    assert _wait("every camera's picture change", lambda: changed() == set(CAMERAS) or None, 60)

    alert = _an_alert(demo, need_snapshot=True)
    browser.get(f"{demo.base}/alerts")
    row = _wait("the alert in the log", lambda: browser.find_elements(By.CSS_SELECTOR,
                                                                      f'tr[data-alert="{alert["id"]}"] a'))
    browser.save_screenshot(str(shots / "alerts.png"))
    row[0].click()
    _wait("the alert page", lambda: alert["id"] in browser.current_url)
    snap = browser.find_element(By.ID, "snapshot")
    _wait("the alert's snapshot", lambda: browser.execute_script(loaded, snap))
    size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", snap)
    expect = cv2.imdecode(np.frombuffer(demo.get(f"/api/alerts/{alert['id']}/snapshot.jpg").content, np.uint8),
                          cv2.IMREAD_COLOR).shape
    assert size == [expect[1], expect[0]]
    button = browser.find_element(By.ID, "ack")
    _wait("the acknowledge button", button.is_displayed)
    browser.save_screenshot(str(shots / "alert.png"))
    button.click()
    _wait("the acknowledgement on the page",
          lambda: "acknowledged by" in browser.find_element(By.ID, "ack-state").text)
    browser.save_screenshot(str(shots / "alert-acknowledged.png"))
    assert demo.get(f"/api/alerts/{alert['id']}").json()["ack"]["by"].startswith("viewer")

    # the evidence clip plays in the snapshot's place (MJPEG): its pictures replace the snapshot's
    demo.wait_for(lambda: "clip.mp4" in demo.get(f"/api/alerts/{alert['id']}").json()["evidence"], 60,
                  "the alert's clip")
    play = browser.find_element(By.ID, "play")
    _wait("the play button", play.is_displayed)
    before = snap.screenshot_as_png
    play.click()
    _wait("the clip in the snapshot's place", lambda: "/clip.mjpg?play=1" in snap.get_attribute("src")
          and browser.execute_script(loaded, snap) and snap.screenshot_as_png != before)
    browser.save_screenshot(str(shots / "alert-clip.png"))
    (shots / "alert.json").write_text(json.dumps(demo.get(f"/api/alerts/{alert['id']}").json(), indent=2))
