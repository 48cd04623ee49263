"""preprocess: decode frames, apply the camera's ROI, resize for each task and route to ``{P}:prepared:<task>``.

Stays uint8 (radiometric thermal frames stay uint16 at their own resolution so that the
temperatures stay exact); normalisation happens on the inference device. Pauses while an
inference group already has ``streams.prepared_backlog`` entries waiting, so back-pressure
reaches the cameras' ``on_full`` policies instead of growing a queue.

With ``inference.read_from: frames`` infer does this work itself (``prepare.py``) and preprocess has
nothing to do: ``plantsight up`` does not start it, and one started anyway (a compose file that lists it)
says so and idles, reading nothing.
"""

from __future__ import annotations

import time

import cv2

from shared import metrics
from shared.keys import Keys
from shared.messages import DecodeError, Frame
from shared.prepare import Preparer
from shared.service import Service
from shared.streams.connection import ensure_group
from shared.streams.groups import ask_position, position_of, wait_then_ask
from shared.streams.outbox import Outbox
from shared.streams.producer import Producer
from shared.streams.reader import DeadLetters, GroupReader

STAGE = "preprocess"
BACKLOG_CHECK_S = 0.02  # while frames flow, how old the answer to "is infer behind?" may be
BACKLOG_WAIT_S = 0.25  # while paused, ask again when infer writes results, or after this long without any
BACKLOG_POLL_S = 0.005  # but not more often than this


class PreprocessService(Service):
    name = "preprocess"

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        # One frame at a time is too small for OpenCV's worker threads to pay off: more cores = more replicas.
        cv2.setNumThreads(1)
        self.cameras = {c.id: c for c in cfg.cameras}
        self.tasks = cfg.tasks()
        self.preparer = Preparer(cfg, STAGE, route_jpeg=cfg.inference.decode == "infer")
        s = cfg.streams
        self.dead = DeadLetters(self.r, self.keys, s.deadletter_max_age_s, STAGE)
        self.reader = GroupReader(self.r, self.keys.frames, Keys.PREPROCESS, self.consumer, dead=self.dead,
                                  count=16, block_ms=s.read_block_ms, claim_idle_ms=s.claim_idle_ms,
                                  max_deliveries=s.max_deliveries, max_bytes=s.max_message_bytes)
        self.out = {t: Producer(self.r, self.keys.prepared(t), maxlen=s.prepared_maxlen) for t in self.tasks}
        self._backlog, self._backlog_at = False, -1.0
        metrics.precreate_stage(STAGE, ("decode_error", "max_deliveries", "oversized", "unknown_camera"))
        for cam in cfg.cameras:
            metrics.precreate_camera(cam.id, (STAGE,))
            metrics.DROPPED.labels(camera=cam.id, stage=STAGE, reason="stale")

    @property
    def idle(self) -> bool:
        return self.keys.infer_reads_frames

    def setup(self) -> None:
        if self.idle:
            self.log.warning("inference.read_from is frames: infer reads the cameras' frames itself, so this "
                             "preprocess has nothing to do and reads nothing")
            return
        self.reader.setup()
        for t in self.tasks:
            ensure_group(self.r, self.keys.prepared(t), Keys.infer_group(t))

    def streams(self) -> set[str]:
        if self.idle:
            return set()
        return {self.keys.frames, *(self.keys.prepared(t) for t in self.tasks)}

    def backlog_groups(self) -> list[tuple[str, str]]:
        return [(self.keys.prepared(t), Keys.infer_group(t)) for t in self.tasks]

    def ask_backlog(self, pipe) -> int:
        """Queue the question "how far behind is each infer group?" in ``pipe``; how many replies it adds."""
        groups = self.backlog_groups()
        for stream, group in groups:
            ask_position(pipe, stream, group, self.cfg.streams.prepared_backlog + 1)
        return len(groups)

    def note_backlog(self, lags: list[int]) -> None:
        """Whether an infer group lags ``prepared_backlog`` entries, from positions just asked."""
        self._backlog = any(lag >= self.cfg.streams.prepared_backlog for lag in lags)
        self._backlog_at = time.monotonic()

    def backlogged(self) -> bool:
        """Whether an infer group lags ``prepared_backlog`` entries: the answer that came with the last
        batch's write or wait, asked anew when it is older than 20 ms."""
        if time.monotonic() - self._backlog_at >= BACKLOG_CHECK_S:
            pipe = self.r.pipeline(transaction=False)
            self.ask_backlog(pipe)
            self.note_backlog([position_of(x).lag for x in pipe.execute()])
        return self._backlog

    def step(self) -> None:
        if self.idle:
            self.stop.wait(1.0)
            return
        if self.backlogged():
            # infer writes results when it has run a batch (and read the next): ask again then, not every
            # 20 ms (those questions cost more CPU than the frames at saturation on a two-core box)
            self.stop.wait(max(0.0, self._backlog_at + BACKLOG_POLL_S - time.monotonic()))
            _, positions = wait_then_ask(self.r, [self.keys.results], BACKLOG_WAIT_S, self.backlog_groups(),
                                         self.cfg.streams.prepared_backlog + 1)
            self.note_backlog([p.lag for p in positions])
            return
        entries = self.reader.read()
        if not entries:
            return
        box = Outbox(self.r)
        for entry in entries:
            self.handle(entry, box)
        self.reader.ack(box, [e.id for e in entries])
        asked = self.ask_backlog(box.pipe)  # the next step's question rides with this batch's write
        replies = box.commit()
        self.note_backlog([position_of(x).lag for x in replies[len(replies) - asked:]])

    def handle(self, entry, box: Outbox) -> None:
        t0 = time.perf_counter()
        try:
            frame = Frame.from_msgpack(entry.payload, self.cfg.streams.max_message_bytes)
        except DecodeError as e:
            self.dead.add(box, self.keys.frames, entry, "decode_error", str(e))
            return
        cam = self.cameras.get(frame.camera)
        if cam is None:
            self.dead.add(box, self.keys.frames, entry, "unknown_camera", f"camera {frame.camera!r} is not configured")
            return
        if cam.max_age_ms and (time.time_ns() - frame.ts) / 1e6 > cam.max_age_ms:
            box.on_commit(lambda: metrics.DROPPED.labels(camera=cam.id, stage=STAGE, reason="stale").inc())
            return
        try:
            prepared = self.preparer.messages(frame, cam, cam.tasks, entry.id, t0)
        except DecodeError as e:
            self.dead.add(box, self.keys.frames, entry, "decode_error", str(e))
            return
        for msg in prepared:
            self.out[msg.task].add(msg.to_msgpack(), cam=cam.id, task=msg.task, box=box)
        spent = time.perf_counter() - t0

        def count():
            metrics.FRAMES.labels(camera=cam.id, stage=STAGE).inc()
            metrics.STAGE_SECONDS.labels(stage=STAGE).observe(spent)

        box.on_commit(count)
