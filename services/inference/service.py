"""infer: batch prepared frames per task, run the task's network, write one result per frame.

A batch closes at ``max_batch`` frames or ``max_wait_ms`` after its first frame. Frames go to
the device as uint8 (uint16 for radiometric thermal) and are normalised there. Results and the
acknowledgement of their inputs are written in one MULTI. A batch that makes the model fail is
retried frame by frame; a frame that fails alone stays pending and is dead-lettered by the
reader once it has been delivered ``max_deliveries`` times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from shared import metrics
from shared.messages import DecodeError, Prepared, Result
from shared.models import Predictor
from shared.runtime import Service
from shared.streams import DeadLetters, Entry, GroupReader, Names, Outbox, Producer, ensure_group

from services.inference.postprocess import to_original

STAGE = "infer"


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"inference.device is {name!r} but no CUDA device is available")
    return name


@dataclass
class TaskRunner:
    task: str
    predictor: Predictor
    reader: GroupReader


class InferService(Service):
    name = "infer"

    def __init__(self, cfg, *, tasks: list[str] | None = None, **kw):
        super().__init__(cfg, **kw)
        inf, s = cfg.inference, cfg.streams
        if inf.threads:
            torch.set_num_threads(inf.threads)
        self.device = pick_device(inf.device)
        self.dead = DeadLetters(self.r, self.names, s.deadletter_max_age_s, STAGE)
        self.results = Producer(self.r, self.names.results, maxlen=s.results_maxlen)
        self.runners: list[TaskRunner] = []
        for task in tasks or cfg.tasks():
            spec = cfg.model(task)
            predictor = Predictor.from_spec(task, path=str(spec.path) if spec.path else None, arch=spec.arch,
                                            device=self.device)
            reader = GroupReader(self.r, self.names.prepared(task), Names.infer_group(task), self.consumer,
                                 dead=self.dead, count=inf.max_batch, block_ms=s.read_block_ms,
                                 claim_idle_ms=s.claim_idle_ms, max_deliveries=s.max_deliveries,
                                 max_bytes=s.max_message_bytes)
            self.runners.append(TaskRunner(task, predictor, reader))
            metrics.MODEL_INFO.labels(task=task, model=predictor.arch, version=predictor.version,
                                      device=self.device).set(1)
            metrics.BATCH_SIZE.labels(task=task)
            metrics.END_TO_END.labels(task=task)
            self.log.info("%s: %s on %s", task, predictor.name, self.device)
        metrics.precreate_stage(STAGE, ("decode_error", "max_deliveries", "oversized", "wrong_shape"))
        for cam in cfg.cameras:
            metrics.precreate_camera(cam.id, (STAGE,))
            metrics.DROPPED.labels(camera=cam.id, stage=STAGE, reason="stale")
        self.cameras = {c.id: c for c in cfg.cameras}

    def setup(self) -> None:
        for run in self.runners:
            run.reader.setup()
        ensure_group(self.r, self.names.results, Names.ALERT)

    def streams(self) -> set[str]:
        return {self.names.results, *(r.reader.stream for r in self.runners)}

    def step(self) -> None:
        # With several tasks in one worker, each gets a share of the blocking read time.
        block = max(1, self.cfg.streams.read_block_ms // max(1, len(self.runners)))
        for run in self.runners:
            entries = self.collect(run, block)
            if entries:
                self.process(run, entries)

    def collect(self, run: TaskRunner, block_ms: int) -> list[Entry]:
        """Up to ``max_batch`` entries, waiting at most ``max_wait_ms`` after the first one."""
        inf = self.cfg.inference
        entries = run.reader.read(count=inf.max_batch, block_ms=block_ms)
        if not entries:
            return []
        deadline = time.monotonic() + inf.max_wait_ms / 1000
        while len(entries) < inf.max_batch and not self.stop.is_set():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            more = run.reader.read(count=inf.max_batch - len(entries), block_ms=left_ms)
            if not more:
                break
            entries += more
        return entries

    def decode(self, run: TaskRunner, entries: list[Entry], box: Outbox) -> list[tuple[Entry, Prepared]]:
        """Valid prepared messages of this task; the rest are dead-lettered (in ``box``) or dropped as stale."""
        size = run.predictor.input_size()
        good = []
        for e in entries:
            try:
                msg = Prepared.from_msgpack(e.payload, self.cfg.streams.max_message_bytes)
                if msg.task != run.task:
                    raise DecodeError(f"prepared message for task {msg.task!r} on the {run.task} stream")
            except DecodeError as err:
                run.reader.reject(box, e, "decode_error", str(err))
                continue
            if run.task != "thermal" and tuple(msg.shape[:2]) != tuple(size):
                run.reader.reject(box, e, "wrong_shape", f"{list(msg.shape)} but {run.predictor.name} takes {list(size)}")
                continue
            cam = self.cameras.get(msg.camera)
            if cam is not None and cam.max_age_ms and (time.time_ns() - msg.ts) / 1e6 > cam.max_age_ms:
                run.reader.ack(box, [e.id])
                box.on_commit(lambda c=msg.camera: metrics.DROPPED.labels(camera=c, stage=STAGE, reason="stale").inc())
                continue
            good.append((e, msg))
        return good

    def predict(self, run: TaskRunner, items: list[tuple[Entry, Prepared]]) -> list[dict]:
        """Model outputs per item; frames of different shapes (thermal cameras) run as separate sub-batches."""
        outs: list[dict | None] = [None] * len(items)
        by_shape: dict[tuple, list[int]] = {}
        for i, (_, msg) in enumerate(items):
            by_shape.setdefault((msg.shape, msg.dtype), []).append(i)
        for idx in by_shape.values():
            batch = np.stack([items[i][1].array() for i in idx])
            tensor = torch.from_numpy(batch).to(self.device, non_blocking=True)
            for i, out in zip(idx, run.predictor.predict(tensor)):
                outs[i] = out
        return outs

    def process(self, run: TaskRunner, entries: list[Entry]) -> None:
        box = Outbox(self.r)
        items = self.decode(run, entries, box)
        t0 = time.perf_counter()
        try:
            outs = self.predict(run, items) if items else []
        except Exception as e:  # a poison frame must not take the batch with it: retry one by one
            self.log.warning("%s batch of %d failed (%s: %s); retrying frame by frame",
                             run.task, len(items), type(e).__name__, e)
            box.commit()
            for item in items:
                self.process_one(run, item)
            return
        spent = time.perf_counter() - t0
        self.write(run, items, outs, spent, box)
        box.commit()

    def process_one(self, run: TaskRunner, item: tuple[Entry, Prepared]) -> None:
        box = Outbox(self.r)
        t0 = time.perf_counter()
        try:
            outs = self.predict(run, [item])
        except Exception as e:  # left pending: the reader dead-letters it after max_deliveries
            self.log.warning("%s frame %s#%d fails the model (%s: %s); left for redelivery",
                             run.task, item[1].camera, item[1].seq, type(e).__name__, e)
            return
        self.write(run, [item], outs, time.perf_counter() - t0, box)
        box.commit()

    def write(self, run: TaskRunner, items, outs, spent: float, box: Outbox) -> None:
        model = run.predictor.name
        done = time.time_ns()
        lat = []
        for (entry, msg), out in zip(items, outs):
            t = dict(msg.t)
            t[STAGE] = spent / len(items)
            result = Result(camera=msg.camera, seq=msg.seq, ts=msg.ts, task=run.task, frame_id=msg.frame_id,
                            model=model, out=to_original(run.task, out, msg), t=t)
            self.results.add(result.to_msgpack(), cam=msg.camera, task=run.task, box=box)
            lat.append((msg.camera, (done - msg.ts) / 1e9))
        run.reader.ack(box, [e.id for e, _ in items])
        n = len(items)

        def count():
            metrics.BATCH_SIZE.labels(task=run.task).observe(n)
            metrics.INFERENCE_SECONDS.labels(task=run.task, model=model).observe(spent)
            metrics.STAGE_SECONDS.labels(stage=STAGE).observe(spent / n)
            for cam, seconds in lat:
                metrics.FRAMES.labels(camera=cam, stage=STAGE).inc()
                metrics.END_TO_END.labels(task=run.task).observe(seconds)

        if n:
            box.on_commit(count)
