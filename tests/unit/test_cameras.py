"""Camera sources: classification, synthetic/file/folder/stream/usb readers and Backoff."""

from __future__ import annotations

import functools
import http.server
import random
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from services.ingest.cameras import (
    SOURCE_TYPES,
    Backoff,
    CameraSource,
    Encoded,
    SourceError,
    classify_source,
    open_source,
)
from shared.data.scenes import make_scene
from shared.imaging import encode

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
VIDEO = DATA / "video" / "Megamind.avi"
PHOTOS = ("fruits.jpg", "baboon.jpg", "building.jpg")

need_video = pytest.mark.skipif(not VIDEO.is_file(), reason=f"shared test media missing: {VIDEO}")
need_photos = pytest.mark.skipif(not all((DATA / p).is_file() for p in PHOTOS),
                                 reason=f"shared test photos missing in {DATA}")


def test_classify_source(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    cases = {
        "synthetic://thermal": "synthetic", "synthetic://process?w=64&h=48": "synthetic",
        "rtsp://cam.local:554/stream1": "stream", "RTSP://10.0.0.2/live": "stream",
        "http://10.0.0.3/mjpg/video.mjpg": "stream", "https://cam/x": "stream",
        "/dev/video0": "usb", "/dev/video12": "usb", "0": "usb", " 3 ": "usb",
        str(tmp_path): "folder", f"file://{tmp_path}": "folder",
        str(video): "file", "/no/such/clip.avi": "file", "relative/clip.mkv": "file",
    }
    for source, kind in cases.items():
        assert classify_source(source) == kind, source
        src = open_source(source, fps=5)
        assert isinstance(src, SOURCE_TYPES[kind]) and src.kind == kind
    assert set(SOURCE_TYPES) == {"synthetic", "file", "folder", "stream", "usb"}
    assert all(issubclass(c, CameraSource) for c in SOURCE_TYPES.values())
    live = {k: c.live for k, c in SOURCE_TYPES.items()}
    assert live == {"synthetic": False, "file": False, "folder": False, "stream": True, "usb": True}


def test_classify_rejects_empty_and_unknown_schemes():
    with pytest.raises(SourceError, match="empty"):
        classify_source("  ")
    with pytest.raises(SourceError, match=r"ftp://"):
        classify_source("ftp://host/x.avi")


def test_bad_fps():
    with pytest.raises(SourceError, match="fps"):
        open_source("synthetic://thermal", fps=0)


def test_synthetic_source_matches_scene():
    src = open_source("synthetic://surface?w=96&h=64&seed=4", fps=10)
    assert not src.live
    with src:
        frames = [src.read() for _ in range(5)]
    scene = make_scene("surface", width=96, height=64, seed=4)
    for seq, frame in enumerate(frames):
        assert frame.shape == (64, 96, 3) and frame.dtype == np.uint8
        assert frame.tobytes() == scene.render(seq)[0].tobytes()
    src.open()  # a reopened synthetic camera goes on counting
    assert src.read().tobytes() == scene.render(5)[0].tobytes()
    src.close()


def test_synthetic_thermal_is_uint16():
    with open_source("synthetic://thermal", fps=10) as src:
        frame = src.read()
    assert frame.shape == (120, 160, 1) and frame.dtype == np.uint16


def test_synthetic_replay_sends_the_first_n_frames_encoded_in_a_loop():
    scene = make_scene("process", width=96, height=64, seed=2)
    with open_source("synthetic://process?w=96&h=64&seed=2&replay=3", fps=10) as src:
        frames = [src.read() for _ in range(7)]
    assert all(isinstance(f, Encoded) and f.enc == "jpeg" and f.shape == (64, 96, 3) and f.dtype == "uint8"
               for f in frames)
    assert [f.data for f in frames[3:6]] == [f.data for f in frames[:3]] and frames[6].data == frames[0].data
    assert len({f.data for f in frames}) == 3
    for seq in range(3):  # each is the scene's frame, encoded as ingest encodes rendered frames
        assert frames[seq].data == encode(scene.render(seq)[0], 90)[1]
    thumb = frames[0].thumbnail()  # 1/8 size for the frozen/black checks
    assert thumb.shape == (8, 12, 3)


def test_synthetic_replay_of_a_thermal_scene_is_lossless_png():
    with open_source("synthetic://thermal?w=48&h=32&replay=2", fps=10) as src:
        f = src.read()
    want = make_scene("thermal", width=48, height=32).render(0)[0]
    assert f.enc == "png" and f.shape == (32, 48, 1) and f.dtype == "uint16"
    assert np.array_equal(f.thumbnail(), want)


@pytest.mark.parametrize("bad", ["0", "x", "1001", ""])
def test_synthetic_replay_count_is_checked_naming_the_source(bad):
    with pytest.raises(SourceError, match=rf"synthetic://process\?replay={bad}.*replay={bad!r} must be a whole"):
        open_source(f"synthetic://process?replay={bad}", fps=10)


def test_unknown_scene_names_it():
    src = open_source("synthetic://kitchen", fps=10)
    with pytest.raises(SourceError, match=r"kitchen.*process, equipment, surface, thermal"):
        src.open()


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "clip.avi"
    src = open_source(str(missing), fps=10)
    with pytest.raises(SourceError, match=r"no such file.*clip\.avi"):
        src.open()
    src.close()  # closing a source that never opened is fine


def test_not_a_video_fails(tmp_path):
    bogus = tmp_path / "clip.avi"
    bogus.write_bytes(b"this is not a video at all" * 10)
    src = open_source(str(bogus), fps=10)
    with pytest.raises(SourceError, match=r"clip\.avi"):
        src.open()
        src.read()
    src.close()


@need_video
def test_video_file_reads_every_frame_then_ends():
    src = open_source(str(VIDEO), fps=24, loop=False)
    assert src.kind == "file" and not src.live
    src.open()
    n, first = 0, None
    while (frame := src.read()) is not None:
        assert frame.shape == (528, 720, 3) and frame.dtype == np.uint8
        first = frame if first is None else first
        n += 1
        assert n <= 270
    assert n == 270
    assert src.read() is None  # stays ended
    src.close()
    # RGB order: the first frame equals OpenCV's BGR frame reversed
    cap = cv2.VideoCapture(str(VIDEO))
    ok, bgr = cap.read()
    cap.release()
    assert ok and np.array_equal(first, bgr[:, :, ::-1])


@need_video
def test_video_file_loops():
    with open_source(str(VIDEO), fps=24, loop=True) as src:
        frames = [src.read() for _ in range(272)]
    assert all(f is not None and f.shape == (528, 720, 3) for f in frames)
    assert np.array_equal(frames[270], frames[0])  # frame 271 is frame 1 again
    assert np.array_equal(frames[271], frames[1])
    assert not np.array_equal(frames[0], frames[1])


@need_photos
def test_folder_in_sorted_order_then_none(tmp_path):
    for name in PHOTOS:
        shutil.copy(DATA / name, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    src = open_source(str(tmp_path), fps=2, loop=False)
    assert src.kind == "folder" and not src.live
    with src:
        frames = [src.read() for _ in range(3)]
        assert src.read() is None and src.read() is None
    for name, frame in zip(sorted(PHOTOS), frames):
        expected = cv2.cvtColor(cv2.imread(str(DATA / name)), cv2.COLOR_BGR2RGB)
        assert frame.dtype == np.uint8 and np.array_equal(frame, expected), name


@need_photos
def test_folder_loops(tmp_path):
    for name in PHOTOS[:2]:
        shutil.copy(DATA / name, tmp_path / name)
    with open_source(str(tmp_path), fps=2, loop=True) as src:
        frames = [src.read() for _ in range(5)]
    assert [f.shape for f in frames[:2]] == [f.shape for f in frames[2:4]]
    assert np.array_equal(frames[0], frames[2]) and np.array_equal(frames[1], frames[3])


def test_folder_16bit_and_gray(tmp_path):
    thermal = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 13 + 29000).astype(np.uint16)
    gray = (np.arange(48 * 64).reshape(48, 64) % 251).astype(np.uint8)
    assert cv2.imwrite(str(tmp_path / "a_thermal.png"), thermal)
    assert cv2.imwrite(str(tmp_path / "b_gray.png"), gray)
    with open_source(str(tmp_path), fps=2, loop=False) as src:
        t, g = src.read(), src.read()
        assert src.read() is None
    assert t.dtype == np.uint16 and t.shape == (48, 64, 1) and np.array_equal(t[:, :, 0], thermal)
    assert g.dtype == np.uint8 and g.shape == (48, 64, 3) and np.array_equal(g[:, :, 1], gray)


@need_photos
def test_corrupt_image_names_the_file(tmp_path):
    shutil.copy(DATA / "fruits.jpg", tmp_path / "a.jpg")
    (tmp_path / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with open_source(str(tmp_path), fps=2, loop=False) as src:
        assert src.read().shape[2] == 3
        with pytest.raises(SourceError, match=r"b_broken\.png"):
            src.read()


def test_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    src = open_source(str(tmp_path), fps=2)
    with pytest.raises(SourceError, match=r"no images"):
        src.open()


def test_unreachable_stream_and_missing_usb():
    for source in ("http://127.0.0.1:1/cam.mjpg", "/dev/video63"):
        src = open_source(source, fps=5)
        assert src.live
        with pytest.raises(SourceError, match=source.replace(".", r"\.")):
            src.open()
        src.close()


@need_video
def test_http_stream_reads_frames_then_fails_at_the_end():
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(VIDEO.parent))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{VIDEO.name}"
        src = open_source(url, fps=24)
        assert src.kind == "stream"
        src.open()
        with open_source(str(VIDEO), fps=24) as ref:
            for _ in range(3):
                assert np.array_equal(src.read(), ref.read())
        with pytest.raises(SourceError, match="read failed"):
            for _ in range(400):
                src.read()
        src.close()
    finally:
        server.shutdown()
        server.server_close()


def test_read_before_open():
    with pytest.raises(SourceError, match="before open"):
        open_source("synthetic://process", fps=5).read()


def test_backoff_grows_is_capped_and_jittered():
    delays = []
    for k in range(200):
        b = Backoff(base=0.5, cap=30.0, rng=random.Random(k))
        delays.append([b.next() for _ in range(10)])
    arr = np.array(delays)
    ceilings = [min(30.0, 0.5 * 2 ** n) for n in range(10)]
    assert (arr >= 0).all() and (arr <= np.array(ceilings)).all() and arr.max() <= 30.0
    means = arr.mean(axis=0)
    assert all(means[i + 1] > means[i] for i in range(6))  # grows until the cap
    assert means[-1] == pytest.approx(15.0, rel=0.15)  # full jitter under the cap averages cap/2
    assert len({round(d, 9) for d in arr[:, 3]}) > 150  # jittered, not all equal


def test_backoff_reset():
    b = Backoff(base=1.0, cap=8.0, rng=random.Random(1))
    for _ in range(10):
        assert b.next() <= 8.0
    assert b.ceiling == 8.0 and b.attempts == 10
    b.reset()
    assert b.attempts == 0 and b.ceiling == 1.0 and b.next() <= 1.0
    with pytest.raises(ValueError):
        Backoff(base=0, cap=1)


def test_a_slowly_moving_line_is_not_frozen_but_a_repeated_picture_is():
    from services.ingest.service import StillImage
    from shared.data.scenes import make_scene

    scene = make_scene("surface", seed=3)
    moving = StillImage()
    verdicts = [moving.update(scene.render(seq)[0])[0] for seq in range(60)]
    assert not all(verdicts[1:]), "a line creeping past must not read as frozen for 60 frames"
    assert sum(verdicts) < 50

    still = StillImage()
    frame = scene.render(0)[0]
    rng = np.random.default_rng(0)
    noisy = [np.clip(frame + rng.normal(0, 1.0, frame.shape), 0, 255).astype(np.uint8) for _ in range(20)]
    assert [still.update(img)[0] for img in noisy] == [False] + [True] * 19


def _camera_workers(monkeypatch, *ids: str, fps: float):
    """Ingest camera workers on a clock the test moves (``clock[0]``), with no Redis behind them."""
    import logging
    import types

    import redis

    from services.ingest import service as ingest
    from shared.config import CameraConfig

    clock = [1000.0]
    monkeypatch.setattr(ingest.time, "time", lambda: clock[0])
    svc = types.SimpleNamespace(r=redis.Redis(), keys=types.SimpleNamespace(frames="t:frames"),
                                cfg=types.SimpleNamespace(streams=types.SimpleNamespace(frames_maxlen=10)),
                                log=logging.getLogger("test"))
    return clock, [ingest.CameraWorker(svc, CameraConfig(id=i, source="synthetic://process", fps=fps,
                                                         tasks=["classify"]))
                   for i in ids]


def test_a_camera_looping_a_few_pictures_is_not_frozen_however_its_frames_fall_on_the_checks(monkeypatch):
    """Checks every CHECK_EVERY_S of a 3-picture loop at 5 fps would see the same picture every time."""
    import math

    from services.ingest import service as ingest

    pictures = [np.full((48, 64, 3), v, np.uint8) for v in (40, 120, 200)]
    fps = 5.0
    assert math.ceil(ingest.CHECK_EVERY_S * fps) % len(pictures) == 0  # every 3rd frame: the sampling that aliased
    clock, (looping, frozen) = _camera_workers(monkeypatch, "loop", "frozen", fps=fps)
    for i in range(60):  # 12 s
        clock[0] += 1 / fps
        looping.check_image(pictures[i % len(pictures)])
        frozen.check_image(pictures[0])
        since = looping.status["frozen_since"]
        assert not since or clock[0] - since < 1.5 / fps  # still for a frame at most, never for seconds
    # frozen from its second look on: at most 1.5 × CHECK_EVERY_S and a frame after its first
    assert frozen.status["frozen_since"] and clock[0] - frozen.status["frozen_since"] >= 12 - 1.5 * 0.5 - 2 / fps


def test_a_still_camera_is_looked_at_twice_a_check_not_on_every_frame(monkeypatch):
    """A frozen camera at 30 fps: two looks per check (the check and the frame after it), not 30 a second."""
    from services.ingest import service as ingest

    clock, (still,) = _camera_workers(monkeypatch, "still", fps=30.0)
    looks = []
    real_update = still.still.update
    monkeypatch.setattr(still.still, "update", lambda img: looks.append(clock[0]) or real_update(img))
    picture = np.full((48, 64, 3), 90, np.uint8)
    for _ in range(300):  # 10 s
        clock[0] += 1 / 30
        still.check_image(picture)
    assert still.status["frozen_since"] and still.status["frozen_since"] - looks[0] < 1.5 * ingest.CHECK_EVERY_S + 0.05
    gaps = np.diff(looks)
    second = gaps < 0.05  # the look on the frame after a still one
    assert 10 / (1.5 * ingest.CHECK_EVERY_S) <= (~second).sum() <= 10 / (0.5 * ingest.CHECK_EVERY_S)
    # every check that found it still looked once more (the last one may have had no frame left), not on and on
    assert second.sum() in ((~second).sum(), (~second).sum() - 1)
    assert len(looks) <= 2 * 10 / (0.5 * ingest.CHECK_EVERY_S) + 1  # 300 frames: at most 81 looks
