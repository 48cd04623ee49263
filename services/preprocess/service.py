"""preprocess: decode frames, apply the camera's ROI, resize for each task and route to ``{P}:prepared:<task>``.

Stays uint8 (radiometric thermal frames stay uint16 at their own resolution so that the
temperatures stay exact); normalisation happens on the inference device. Pauses while an
inference group already has ``streams.prepared_backlog`` entries waiting, so back-pressure
reaches the cameras' ``on_full`` policies instead of growing a queue.
"""

from __future__ import annotations

import time

import cv2
import numpy as np

from shared import metrics
from shared.config import CameraConfig
from shared.imaging import crop, decode_frame, jpeg_reduction, letterbox, stretch
from shared.messages import DecodeError, Frame, Prepared
from shared.models import input_size_for
from shared.runtime import Service
from shared.streams import (DeadLetters, GroupReader, Names, Outbox, Producer, ask_position, ensure_group,
                            position_of, wait_then_ask)

STAGE = "preprocess"
SPATIAL = ("detect", "segment")  # letterboxed so boxes and masks map back exactly
BACKLOG_CHECK_S = 0.02  # while frames flow, how old the answer to "is infer behind?" may be
BACKLOG_WAIT_S = 0.25  # while paused, ask again when infer writes results, or after this long without any
BACKLOG_POLL_S = 0.005  # but not more often than this


def prepare(image: np.ndarray, cam: CameraConfig, task: str, size: tuple[int, int],
            reduced: int = 1) -> tuple[np.ndarray, tuple, tuple]:
    """(prepared image, letterbox (scale, pad_x, pad_y), roi used) for one task; DecodeError if the pixels don't fit.

    ``reduced``: the image was decoded at 1/reduced of the frame's size (``imaging.jpeg_reduction``); the
    letterbox and ROI returned are still in the frame's own pixels, the same numbers as without it.
    """
    if reduced != 1:
        roi = None if cam.roi is None else tuple(v // reduced for v in cam.roi)
        region, used = crop(image, roi)
        used = tuple(v * reduced for v in used)
        if task in SPATIAL:
            out, (_, px, py) = letterbox(region, size)
            rh, rw = region.shape[0] * reduced, region.shape[1] * reduced
            return out, (min(size[0] / rh, size[1] / rw), px, py), used
        return stretch(region, size)[0], (1.0, 0, 0), used
    region, roi = crop(image, cam.roi)
    if task == "thermal":
        if region.dtype == np.uint8 and region.shape[2] == 3:  # an 8-bit IR picture: the CNN estimates
            region = cv2.cvtColor(region, cv2.COLOR_RGB2GRAY)[:, :, None]
        return np.ascontiguousarray(region), (1.0, 0, 0), roi
    if region.dtype != np.uint8:
        raise DecodeError(f"camera {cam.id}: a {region.dtype} frame cannot feed the {task} network (needs 8-bit RGB)")
    if region.shape[2] == 1:
        region = cv2.cvtColor(region, cv2.COLOR_GRAY2RGB)
    if task in SPATIAL:
        out, box = letterbox(region, size)
        return out, box, roi
    out, _ = stretch(region, size)
    return out, (1.0, 0, 0), roi


class PreprocessService(Service):
    name = "preprocess"

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        # OpenCV's worker threads gave no speed-up on 640×480 frames and cost CPU; more cores = more replicas.
        cv2.setNumThreads(1)
        self.cameras = {c.id: c for c in cfg.cameras}
        self.tasks = cfg.tasks()
        self.sizes = {t: input_size_for(t, path=cfg.model(t).path, arch=cfg.model(t).arch) for t in self.tasks}
        s = cfg.streams
        self.dead = DeadLetters(self.r, self.names, s.deadletter_max_age_s, STAGE)
        self.reader = GroupReader(self.r, self.names.frames, Names.PREPROCESS, self.consumer, dead=self.dead,
                                  count=16, block_ms=s.read_block_ms, claim_idle_ms=s.claim_idle_ms,
                                  max_deliveries=s.max_deliveries, max_bytes=s.max_message_bytes)
        self.out = {t: Producer(self.r, self.names.prepared(t), maxlen=s.prepared_maxlen) for t in self.tasks}
        self._backlog, self._backlog_at = False, -1.0
        metrics.precreate_stage(STAGE, ("decode_error", "max_deliveries", "oversized", "unknown_camera"))
        for cam in cfg.cameras:
            metrics.precreate_camera(cam.id, (STAGE,))
            metrics.DROPPED.labels(camera=cam.id, stage=STAGE, reason="stale")

    def setup(self) -> None:
        self.reader.setup()
        for t in self.tasks:
            ensure_group(self.r, self.names.prepared(t), Names.infer_group(t))

    def streams(self) -> set[str]:
        return {self.names.frames, *(self.names.prepared(t) for t in self.tasks)}

    def backlog_groups(self) -> list[tuple[str, str]]:
        return [(self.names.prepared(t), Names.infer_group(t)) for t in self.tasks]

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
        if self.backlogged():
            # infer writes results when it has run a batch (and read the next): ask again then, not every
            # 20 ms (those questions cost more CPU than the frames at saturation on a two-core box)
            self.stop.wait(max(0.0, self._backlog_at + BACKLOG_POLL_S - time.monotonic()))
            _, positions = wait_then_ask(self.r, [self.names.results], BACKLOG_WAIT_S, self.backlog_groups(),
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

    def reduction(self, frame: Frame, cam: CameraConfig, tasks: list[str]) -> int:
        """How much smaller than the frame libjpeg may decode it for these tasks (1: full size)."""
        if (not tasks or frame.enc != "jpeg" or frame.dtype != "uint8" or len(frame.shape) != 3
                or frame.shape[2] != 3 or "thermal" in tasks):
            return 1
        return jpeg_reduction(frame.shape[:2], cam.roi, [(self.sizes[t], t in SPATIAL) for t in tasks])

    def jpeg_tasks(self, frame: Frame, cam: CameraConfig) -> list[str]:
        """With ``inference.decode: infer``, the tasks an 8-bit colour JPEG goes to undecoded."""
        if (self.cfg.inference.decode != "infer" or frame.enc != "jpeg" or frame.dtype != "uint8"
                or len(frame.shape) != 3 or frame.shape[2] != 3):
            return []
        from services.inference.jpeg import ROUTABLE

        return [t for t in cam.tasks if t in ROUTABLE]

    def route_jpeg(self, frame: Frame, cam: CameraConfig, tasks: list[str], frame_id: str, t0: float,
                   box: Outbox) -> None:
        """Send the JPEG bytes as ``enc: "jpeg"`` prepared messages (infer decodes the batch on its device);
        the ROI and letterbox come from the frame's shape alone."""
        from services.inference.jpeg import PreparedJpeg, plan

        for task in tasks:
            lb, roi = plan(frame.shape[:2], cam.roi, task, self.sizes[task])
            msg = PreparedJpeg(camera=cam.id, seq=frame.seq, ts=frame.ts, task=task, frame_id=frame_id,
                               shape=(*self.sizes[task], 3), dtype="uint8", data=frame.data, orig=frame.shape[:2],
                               letterbox=lb, roi=roi, t={STAGE: time.perf_counter() - t0}, enc="jpeg")
            self.out[task].add(msg.to_msgpack(), cam=cam.id, task=task, box=box)

    def handle(self, entry, box: Outbox) -> None:
        t0 = time.perf_counter()
        try:
            frame = Frame.from_msgpack(entry.payload, self.cfg.streams.max_message_bytes)
        except DecodeError as e:
            self.dead.add(box, self.names.frames, entry, "decode_error", str(e))
            return
        cam = self.cameras.get(frame.camera)
        if cam is None:
            self.dead.add(box, self.names.frames, entry, "unknown_camera", f"camera {frame.camera!r} is not configured")
            return
        if cam.max_age_ms and (time.time_ns() - frame.ts) / 1e6 > cam.max_age_ms:
            box.on_commit(lambda: metrics.DROPPED.labels(camera=cam.id, stage=STAGE, reason="stale").inc())
            return
        routed = self.jpeg_tasks(frame, cam)
        tasks = [t for t in cam.tasks if t not in routed]
        try:
            k = self.reduction(frame, cam, tasks)
            image = decode_frame(frame, k) if tasks else None
            prepared = [(task, *prepare(image, cam, task, self.sizes[task], k)) for task in tasks]
        except DecodeError as e:
            self.dead.add(box, self.names.frames, entry, "decode_error", str(e))
            return
        self.route_jpeg(frame, cam, routed, entry.id, t0, box)
        spent = time.perf_counter() - t0
        for task, img, lb, roi in prepared:
            msg = Prepared(camera=cam.id, seq=frame.seq, ts=frame.ts, task=task, frame_id=entry.id,
                           shape=img.shape, dtype=str(img.dtype), data=img.tobytes(),
                           orig=frame.shape[:2], letterbox=lb, roi=roi, t={STAGE: spent})
            self.out[task].add(msg.to_msgpack(), cam=cam.id, task=task, box=box)

        def count():
            metrics.FRAMES.labels(camera=cam.id, stage=STAGE).inc()
            metrics.STAGE_SECONDS.labels(stage=STAGE).observe(spent)

        box.on_commit(count)
