"""ingest: one thread per camera reads frames, stamps ``seq`` and ``ts``, and publishes to ``{P}:frames``.

Back-pressure per camera: at most ``queue`` of a camera's frames wait for the stage that reads
``{P}:frames`` (preprocess; with ``inference.read_from: frames`` infer's group of every task, and a frame
waits until all of them have read it). When full, ``block`` waits, ``drop_newest`` skips the new frame,
``drop_oldest`` deletes the camera's oldest frame that no reader has read yet (atomically, so a frame is
never both dropped and processed). Every frame is counted once in ``frames_total{stage="ingest"}``.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import deque

import cv2
import numpy as np

from services.ingest.cameras import Backoff, Encoded, SourceError, open_source
from shared import metrics
from shared.config import CameraConfig, ConfigError, OnFull
from shared.imaging import encode
from shared.messages import Frame
from shared.service import Service
from shared.streams.connection import REDIS_DOWN, ensure_group
from shared.streams.groups import Position, ask_position, parse_id, position_of, wait_then_ask
from shared.streams.producer import Producer

STAGE = "ingest"
SEQ_BLOCK = 1000  # seq numbers reserved in Redis at a time, so a restarted ingest never repeats one
DELIVERED_EVERY_S = 0.002  # how fresh the shared view of what the readers have read must be when a camera asks
BLOCKED_WAIT_S = 0.1  # a blocked camera asks where the readers are when they write, or after this long without a write
BLOCKED_POLL_S = 0.01  # but not more often than this (they write all the time on a fast machine)
CHECK_EVERY_S = 0.5  # frozen/black checks per camera about this often, jittered (seconds matter there, not frames)


class StillImage:
    """Tells a frozen camera (the same picture over and over, give or take sensor noise) from a live one.

    Each image is shrunk to 32×24 and compared with the first image of the still period, not with the
    previous frame: a slowly moving scene (a line creeping past) differs little from frame to frame
    but drifts away from that reference, while a frozen one never does.
    """

    TOLERANCE = 0.5  # mean absolute difference on the 8-bit scale

    def __init__(self):
        self.reference: np.ndarray | None = None

    def update(self, image: np.ndarray) -> tuple[bool, float]:
        """(still, mean 8-bit level) for the next image."""
        thumb = cv2.resize(image, (32, 24), interpolation=cv2.INTER_AREA).astype(np.float32)
        if image.dtype == np.uint16:
            thumb /= 257.0  # compare on the 8-bit scale
        still = self.reference is not None and float(np.abs(thumb - self.reference).mean()) < self.TOLERANCE
        if not still:
            self.reference = thumb
        return still, float(thumb.mean())


class CameraWorker(threading.Thread):
    """Reads one camera until stopped; never gives up on a camera that fails."""

    def __init__(self, svc: "IngestService", cam: CameraConfig):
        super().__init__(name=f"camera-{cam.id}", daemon=True)
        self.svc, self.cam = svc, cam
        self.producer = Producer(svc.r, svc.keys.frames, maxlen=svc.cfg.streams.frames_maxlen)
        self.waiting: deque[str] = deque()  # ids of this camera's frames not yet read by every reader
        # and those sent but not yet answered (producer.unanswered): they wait too, newest of all
        self.seq = self.seq_end = 0
        self.frames_read = 0
        self.log = svc.log.getChild(cam.id)
        self._fps_t, self._fps_n = time.monotonic(), 0
        self.still = StillImage()
        self._next_check = 0.0  # time.time() of the next look at the picture
        self._look_again = False  # the last look found the picture still: look at the next frame too
        self._jitter = random.Random(cam.id)
        self.status = {"up": 0, "fps": 0.0, "last_frame": 0.0, "frozen_since": 0.0, "black_since": 0.0,
                       "reconnects": 0, "error": ""}

    def run(self) -> None:
        stop, cam = self.svc.stop, self.cam
        backoff = Backoff(base=0.5, cap=30.0)
        source = None
        opened = False
        next_t = time.monotonic()
        while not stop.is_set():
            if cam.max_frames is not None and self.frames_read >= cam.max_frames:
                self.log.info("camera %s: read its %d frames", cam.id, cam.max_frames)
                break
            try:
                if not opened:
                    # Built anew on every attempt: a path that was missing may now be a folder or a file.
                    source = open_source(cam.source, fps=cam.fps, loop=cam.loop)
                    source.open()
                    opened = True
                    metrics.CAMERA_UP.labels(camera=cam.id).set(1)
                    self.status.update(up=1, error="")
                    backoff.reset()
                image = source.read()
            except SourceError as e:
                metrics.CAMERA_UP.labels(camera=cam.id).set(0)
                metrics.CAMERA_FPS.labels(camera=cam.id).set(0)
                delay = backoff.next()
                self.log.warning("camera %s: %s; reconnecting in %.2f s", cam.id, e, delay)
                if source is not None:
                    source.close()
                opened = False
                metrics.CAMERA_RECONNECTS.labels(camera=cam.id).inc()
                self.status.update(up=0, fps=0.0, error=str(e)[:200], reconnects=self.status["reconnects"] + 1)
                stop.wait(delay)
                continue
            if image is None:
                self.log.info("camera %s: source ended", cam.id)
                break
            self.publish(image)
            if not source.live:  # files, folders and synthetic scenes are paced to the configured fps
                next_t = max(next_t + 1.0 / cam.fps, time.monotonic() - 1.0)
                stop.wait(max(0.0, next_t - time.monotonic()))
        if source is not None:
            source.close()
        self.producer.close()
        metrics.CAMERA_UP.labels(camera=cam.id).set(0)
        metrics.CAMERA_FPS.labels(camera=cam.id).set(0)
        self.status.update(up=0, fps=0.0)

    # --- one frame ------------------------------------------------------------------
    def publish(self, image: np.ndarray | Encoded) -> None:
        """Send one frame: pixels are encoded here; bytes a camera already encoded go as they are."""
        cam = self.cam
        self.frames_read += 1
        metrics.FRAMES.labels(camera=cam.id, stage=STAGE).inc()
        self._tick_fps()
        self.check_image(image)
        ts = time.time_ns()
        if isinstance(image, Encoded):
            enc, data, shape, dtype = image.enc, image.data, image.shape, image.dtype
        else:
            (enc, data), shape, dtype = encode(image, cam.jpeg_quality), image.shape, str(image.dtype)
        seq = None  # taken once per frame, so retries while Redis is away leave no gaps
        while not self.svc.stop.is_set():
            try:
                refused = self.make_room()
                if refused:
                    metrics.DROPPED.labels(camera=cam.id, stage=STAGE, reason=refused).inc()
                    return
                seq = self.next_seq() if seq is None else seq
                frame = Frame(camera=cam.id, seq=seq, ts=ts, enc=enc, shape=shape, dtype=dtype, data=data)
                self.producer.send(frame.to_msgpack(), cam=cam.id)  # its id is read when it is needed
                return
            except REDIS_DOWN as e:
                self.log.warning("camera %s: Redis unavailable (%s); holding the frame", cam.id, e)
                self.svc.stop.wait(1.0)
        metrics.DROPPED.labels(camera=cam.id, stage=STAGE, reason="shutdown").inc()

    def next_seq(self) -> int:
        if self.seq >= self.seq_end:
            self.seq_end = int(self.svc.r.hincrby(self.svc.keys.seq, self.cam.id, SEQ_BLOCK))
            self.seq = self.seq_end - SEQ_BLOCK
        self.seq += 1
        return self.seq - 1

    def in_flight(self) -> int:
        """This camera's frames on ``{P}:frames`` that some reader has not read yet (as far as we know)."""
        return len(self.waiting) + self.producer.unanswered

    def collect_ids(self) -> None:
        """Take the ids Redis has answered for the frames sent; wait for them only when no id is known."""
        self.waiting.extend(self.producer.answers(wait=not self.waiting))

    def make_room(self) -> str | None:
        """Apply the camera's ``on_full`` policy; returns the reason when the new frame is dropped."""
        cam = self.cam
        while self.in_flight() >= cam.queue:
            self.collect_ids()
            self.forget_delivered()
            if self.in_flight() < cam.queue:
                break
            if cam.on_full is OnFull.block:
                while self.in_flight() >= cam.queue:  # the poller asks Redis: no question of our own here
                    self.collect_ids()
                    self.svc.wait_delivered(parse_id(self.waiting[0]))
                    if self.svc.stop.is_set():
                        return "shutdown"
                    self.forget_delivered(self.svc.known_delivered())
            elif cam.on_full is OnFull.drop_newest:
                return "queue_full"
            else:
                oldest = self.waiting.popleft()
                gone = self.producer.drop_if_undelivered(oldest, self.svc.groups)
                if gone == 1:
                    metrics.DROPPED.labels(camera=cam.id, stage=STAGE, reason="queue_full").inc()
                elif gone == 0:
                    metrics.DROPPED.labels(camera=cam.id, stage=STAGE, reason="trimmed").inc()
        return None

    def forget_delivered(self, last: tuple[int, int] | None = None) -> None:
        last = self.svc.delivered() if last is None else last
        while self.waiting and parse_id(self.waiting[0]) <= last:
            self.waiting.popleft()

    def check_image(self, image: np.ndarray | Encoded) -> None:
        """Track since when the image is unchanged (frozen) or dark (black), for the health alerts.

        The picture is looked at after a random 0.5–1.5 × ``CHECK_EVERY_S``, so never in step with a camera
        that loops a few pictures (a folder of 3 pictures at 5 fps looked at every 0.6 s shows the same
        picture each time), and once more on the very next frame after a look that found it still: a
        loop shows another picture there, a frozen camera the same one. A camera that looked still used
        to be looked at on every frame, and most plant cameras look still most of the time: a 1/8-size
        JPEG decode still does the whole entropy decoding, 0.5 ms of the 0.9 of a full decode here.
        """
        now = time.time()
        self.status["last_frame"] = now
        if now < self._next_check and not self._look_again:
            return
        self._next_check = now + CHECK_EVERY_S * self._jitter.uniform(0.5, 1.5)
        second_look, self._look_again = self._look_again, False
        eight_bit = (image.dtype == "uint8") if isinstance(image, Encoded) else image.dtype == np.uint8
        if isinstance(image, Encoded):
            image = image.thumbnail()
            if image is None:
                return  # the reader dead-letters the bytes that do not decode, naming the frame
        frozen, mean8 = self.still.update(image)
        self._look_again = frozen and not second_look
        black = eight_bit and mean8 < self.cam.black_level
        self.status["frozen_since"] = (self.status["frozen_since"] or now) if frozen else 0.0
        self.status["black_since"] = (self.status["black_since"] or now) if black else 0.0

    def _tick_fps(self) -> None:
        self._fps_n += 1
        now = time.monotonic()
        if now - self._fps_t >= 2.0:
            fps = self._fps_n / (now - self._fps_t)
            metrics.CAMERA_FPS.labels(camera=self.cam.id).set(fps)
            self.status["fps"] = round(fps, 2)
            self._fps_t, self._fps_n = now, 0


class IngestService(Service):
    name = "ingest"

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.workers: list[CameraWorker] = []
        self._delivered_lock = threading.Condition()
        self._delivered, self._delivered_at = (0, 0), -1.0
        self._polling = False  # a blocked camera is asking Redis for all of them
        self.groups = self.keys.frame_groups(cfg.tasks())  # who reads the frames
        self.progress = self.keys.frame_readers_write(cfg.tasks())  # what they write once they have read
        # Replicas share the cameras out: replica k of n reads cameras k, k+n, k+2n, … of the list.
        n = cfg.services["ingest"].replicas
        self.cameras = [c for i, c in enumerate(cfg.cameras) if i % n == self.replica % n]
        for i, cam in enumerate(cfg.cameras):
            try:
                open_source(cam.source, fps=cam.fps, loop=cam.loop)  # checks the source string, opens nothing
            except SourceError as e:
                raise ConfigError(f"cameras[{i}].source ({cam.id}): {e}") from None
        for cam in self.cameras:
            metrics.precreate_camera(cam.id, (STAGE,))
            metrics.CAMERA_UP.labels(camera=cam.id).set(0)
            metrics.CAMERA_FPS.labels(camera=cam.id).set(0)
            metrics.CAMERA_RECONNECTS.labels(camera=cam.id)
            for reason in ("queue_full", "trimmed", "shutdown"):
                metrics.DROPPED.labels(camera=cam.id, stage=STAGE, reason=reason)

    def delivered(self) -> tuple[int, int]:
        """The last id on ``{P}:frames`` that every reader group has been delivered, asked of Redis at most every
        ``DELIVERED_EVERY_S`` for all of this process's cameras together."""
        with self._delivered_lock:
            if time.monotonic() - self._delivered_at >= DELIVERED_EVERY_S:
                self._refresh()
            return self._delivered

    def known_delivered(self) -> tuple[int, int]:
        """The last answer, without asking Redis."""
        return self._delivered

    def _refresh(self, positions: list[Position] | None = None) -> bool:  # holding the lock
        """Take the readers' positions (asked of Redis now unless given) and wake the cameras if the slowest
        moved; says whether it moved."""
        if positions is None:
            pipe = self.r.pipeline(transaction=False)
            for group in self.groups:
                ask_position(pipe, self.keys.frames, group, limit=1)
            positions = [position_of(x) for x in pipe.execute()]
        new = min(p.delivered for p in positions)
        self._delivered_at = time.monotonic()
        if new == self._delivered:
            return False
        self._delivered = new
        self._delivered_lock.notify_all()
        return True

    def wait_delivered(self, oldest: tuple[int, int]) -> None:
        """A blocked camera waits until the readers of ``{P}:frames`` have read its ``oldest`` waiting frame (or
        briefly, on stop).

        One blocked camera at a time waits for a reader to write (preprocess a prepared entry, infer a
        result: they write what they have just read), then asks Redis where the readers are; the others
        sleep on the condition and wake when the answer moves, or one of them when the asker hands over
        without news (it takes over the asking). Without a write it asks every ``BLOCKED_WAIT_S``, and never
        more often than every ``BLOCKED_POLL_S``. Asking every 20 ms cost more CPU than the frames at
        saturation on a two-core box (and each camera asking every 5 ms far more).
        """
        with self._delivered_lock:
            if self._delivered >= oldest or self.stop.is_set():
                return
            if self._polling:
                self._delivered_lock.wait(BLOCKED_WAIT_S * 2)  # the poller wakes us; the timeout covers its loss
                return
            self._polling = True
        handed_over = False
        try:
            self.stop.wait(max(0.0, self._delivered_at + BLOCKED_POLL_S - time.monotonic()))
            positions = None
            if not self.stop.is_set():  # wait, then ask where the readers are, in one round trip
                _, positions = wait_then_ask(self.r, self.progress, BLOCKED_WAIT_S,
                                             [(self.keys.frames, g) for g in self.groups], limit=1)
            with self._delivered_lock:
                self._polling = False  # first, so that a camera this wakes that is still blocked polls next
                if not self._refresh(positions):  # it wakes the sleeping cameras when the position moved;
                    # when it did not (or another camera's question already saw the move), one sleeping
                    # camera takes over the asking: this one may not ask again (its frames may be through,
                    # or its camera ended), and without a poller the rest would sleep to their timeout.
                    self._delivered_lock.notify()
            handed_over = True
        finally:
            if not handed_over:  # Redis failed us: let another camera poll
                with self._delivered_lock:
                    self._polling = False
                    self._delivered_lock.notify()

    def setup(self) -> None:
        for group in self.groups:  # so frames published before their reader starts wait for it
            ensure_group(self.r, self.keys.frames, group)
        if not self.workers:
            self.workers = [CameraWorker(self, cam) for cam in self.cameras]
            for w in self.workers:
                w.start()
            self.log.info("reading %d camera(s): %s", len(self.workers), ", ".join(c.id for c in self.cameras))

    def step(self) -> None:
        # Camera status for the health alerts (and anyone looking): one hash, refreshed every half second.
        if self.workers:
            self.r.hset(self.keys.cameras,
                        mapping={w.cam.id: json.dumps(w.status) for w in self.workers})
        else:
            self.r.ping()
        self.stop.wait(0.5)

    def streams(self) -> set[str]:
        return {self.keys.frames}

    def close(self) -> None:
        for w in self.workers:
            w.join(timeout=5)
