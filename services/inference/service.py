"""infer: batch prepared frames per task, run the task's network, write one result per frame.

A batch closes at ``max_batch`` frames or ``max_wait_ms`` after its first frame. A reader thread per
task reads and decodes the next batch while the model runs the current one (``batcher.py``); frames go
to the device as uint8 (uint16 for radiometric thermal) in one copy and are normalised there. The
network runs through the engine the config picks (``engine.py``). Results and the acknowledgement of
their inputs are written in one MULTI. A batch that makes the model fail is retried frame by frame; a
frame that fails alone stays pending and is dead-lettered by the reader once it has been delivered
``max_deliveries`` times. A new model version is loaded and warmed beside the running one and switched
in between two batches (``swap.py``). A task's shadow model, a candidate on trial, runs on a share of the
batch after the live results are written, and writes to ``{P}:shadow`` only (``shadow.py``).

With ``inference.read_from: frames`` infer reads ``{P}:frames`` itself, in group ``infer-<task>``, and its
reader thread does preprocess's work for the frames of the cameras that feed the task
(``shared/prepare.py``; 8-bit colour JPEGs are decoded with the batch, as with ``decode:
infer``); frames of other cameras are acknowledged and left alone. No preprocess process runs, and each
frame makes one Redis hop and one copy fewer.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from services.inference.batcher import Batch, Batcher, BufferPool, collect
from services.inference.jpeg import DeviceDecoder
from services.inference.loading import load_predictor, pick_device, torch_threads
from services.inference.postprocess import comparable, to_original
from services.inference.shadow import Shadow, reason
from services.inference.swap import ModelSwapper
from shared import metrics
from shared.agreement import compare
from shared.heap import keep_tensor_heap
from shared.keys import Keys
from shared.messages import DecodeError, Frame, Prepared, Result, decode_prepared
from shared.models import Predictor
from shared.prepare import Preparer
from shared.service import Service
from shared.streams.connection import ensure_group
from shared.streams.outbox import Outbox
from shared.streams.producer import Producer
from shared.streams.reader import DeadLetters, Entry, GroupReader

STAGE = "infer"


def shadow_metric(task: str):
    """The histogram of a task's agreement measure: kelvin for thermal, a 0-1 agreement for the rest."""
    return metrics.SHADOW_MAX_K_DIFF if task == "thermal" else metrics.SHADOW_AGREEMENT


@dataclass
class TaskRunner:
    task: str
    predictor: Predictor
    reader: GroupReader
    shadow: Shadow | None = field(default=None)  # set and cleared between batches (swap.py), or on its failure


class InferService(Service):
    name = "infer"

    def __init__(self, cfg, *, tasks: list[str] | None = None, **kw):
        super().__init__(cfg, **kw)
        keep_tensor_heap()
        # The reader thread decodes beside the model, which already has the cores: OpenCV's own worker
        # threads would only contend with torch's (and be counted as the model's, see metrics.ModelCpu).
        cv2.setNumThreads(1)
        metrics.MODEL_CPU.register()
        inf, s = cfg.inference, cfg.streams
        self.device = pick_device(inf.device)
        replicas = cfg.services["infer"].replicas
        if threads := torch_threads(inf, replicas, self.device):
            torch.set_num_threads(threads)
        self.log.info("torch threads: %d (%d infer replica(s), %d core(s) here)", torch.get_num_threads(),
                      replicas, len(os.sched_getaffinity(0)))
        self.dead = DeadLetters(self.r, self.keys, s.deadletter_max_age_s, STAGE)
        self.results = Producer(self.r, self.keys.results, maxlen=s.results_maxlen)
        self.shadow_results = Producer(self.r, self.keys.shadow, maxlen=s.results_maxlen)
        self.runners: list[TaskRunner] = []
        # read_from: frames: preprocess's work, done here (a frame nobody can read is dead-lettered by the first
        # task's group only; the others acknowledge it)
        self.preparer = Preparer(cfg, "preprocess", route_jpeg=True) if self.keys.infer_reads_frames else None
        self.first_task = min(cfg.tasks(), default=None)
        for task in tasks or cfg.tasks():
            spec = cfg.model(task)
            predictor = load_predictor(task, path=str(spec.path) if spec.path else None, arch=spec.arch,
                                       device=self.device, inf=inf)
            source = self.keys.frames if self.preparer else self.keys.prepared(task)
            reader = GroupReader(self.r, source, Keys.infer_group(task), self.consumer,
                                 dead=self.dead, count=inf.max_batch, block_ms=s.read_block_ms,
                                 claim_idle_ms=s.claim_idle_ms, max_deliveries=s.max_deliveries,
                                 max_bytes=s.max_message_bytes)
            self.runners.append(TaskRunner(task, predictor, reader))
            metrics.MODEL_INFO.labels(task=task, model=predictor.arch, version=predictor.version,
                                      device=self.device, runtime=predictor.runtime_label).set(1)
            metrics.BATCH_SIZE.labels(task=task)
            metrics.END_TO_END.labels(task=task)
            for why in ("load", "inference"):
                metrics.SHADOW_FAILURES.labels(task=task, reason=why)
            # the task's agreement series at zero before any shadow runs (shadow=""), for dashboards
            shadow_metric(task).labels(task=task, live=predictor.name, shadow="")
            self.log.info("%s: %s on %s (engine %s)", task, predictor.name, self.device, predictor.engine)
        metrics.precreate_stage(STAGE, ("decode_error", "max_deliveries", "oversized", "wrong_shape", "unknown_camera"))
        for cam in cfg.cameras:
            metrics.precreate_camera(cam.id, (STAGE,))
            metrics.DROPPED.labels(camera=cam.id, stage=STAGE, reason="stale")
        self.cameras = {c.id: c for c in cfg.cameras}
        self.pool = BufferPool(pin=self.device.startswith("cuda"))
        self.jpeg = DeviceDecoder(self.device)
        self.batcher = Batcher(self.runners, self.decode_batch, max_batch=inf.max_batch, max_wait_ms=inf.max_wait_ms,
                               block_ms=s.read_block_ms, stop=self.stop, pool=self.pool)
        self.swapper = None
        if inf.model_poll_s > 0:
            self.swapper = ModelSwapper(self)

    def setup(self) -> None:
        for run in self.runners:
            run.reader.setup()
        ensure_group(self.r, self.keys.results, Keys.ALERT)

    def streams(self) -> set[str]:
        return {self.keys.results, *(r.reader.stream for r in self.runners)}

    def step(self) -> None:
        # Threads start here, not in setup: after a Redis error the loop reconnects and a dead reader restarts.
        self.batcher.start()
        if self.swapper is not None:
            self.swapper.start()
            self.swapper.apply()  # between two batches: never inside one
        batch = self.batcher.next(timeout=self.cfg.streams.read_block_ms / 1000)
        if batch is not None:
            self.process_batch(batch)

    def close(self) -> None:
        # Batches the reader threads already read are delivered to this consumer: finish and acknowledge them.
        self.batcher.drain(self.process_batch, timeout=self.drain_s * 0.8)
        if self.swapper is not None:
            self.swapper.stop()

    # --- reading and decoding (the reader thread) ---------------------------------------------------
    def collect(self, run: TaskRunner, block_ms: int) -> list[Entry]:
        """Up to ``max_batch`` entries, waiting at most ``max_wait_ms`` after the first one."""
        inf = self.cfg.inference
        return collect(run.reader, inf.max_batch, inf.max_wait_ms, block_ms, self.stop)[0]

    def decode(self, run: TaskRunner, entries: list[Entry], box: Outbox) -> list[tuple[Entry, Prepared]]:
        """Valid prepared messages of this task; the rest are dead-lettered (in ``box``) or dropped as stale."""
        if self.preparer is not None:
            return self.prepare_frames(run, entries, box)
        size = run.predictor.input_size()
        good = []
        for e in entries:
            try:
                msg = decode_prepared(e.payload, self.cfg.streams.max_message_bytes)
                if msg.task != run.task:
                    raise DecodeError(f"prepared message for task {msg.task!r} on the {run.task} stream")
            except DecodeError as err:
                run.reader.reject(box, e, "decode_error", str(err))
                continue
            if run.task != "thermal" and tuple(msg.shape[:2]) != tuple(size):
                run.reader.reject(box, e, "wrong_shape",
                                  f"{list(msg.shape)} but {run.predictor.name} takes {list(size)}")
                continue
            cam = self.cameras.get(msg.camera)
            if cam is not None and cam.max_age_ms and (time.time_ns() - msg.ts) / 1e6 > cam.max_age_ms:
                run.reader.ack(box, [e.id])
                box.on_commit(lambda c=msg.camera: metrics.DROPPED.labels(camera=c, stage=STAGE, reason="stale").inc())
                continue
            good.append((e, msg))
        return good

    def prepare_frames(self, run: TaskRunner, entries: list[Entry], box: Outbox) -> list[tuple[Entry, Prepared]]:
        """``read_from: frames``: the prepared message of each frame of a camera that feeds this task (what
        preprocess would have written); frames of other cameras are acknowledged (in ``box``), stale ones
        dropped, and the rest dead-lettered."""
        good, others = [], []
        for e in entries:
            t0 = time.perf_counter()
            try:
                frame = Frame.from_msgpack(e.payload, self.cfg.streams.max_message_bytes)
                cam = self.cameras.get(frame.camera)
                if cam is None:
                    raise LookupError(f"camera {frame.camera!r} is not configured")
            except (DecodeError, LookupError) as err:
                if run.task == self.first_task:
                    reason = "unknown_camera" if isinstance(err, LookupError) else "decode_error"
                    run.reader.reject(box, e, reason, str(err.args[0]))
                else:
                    others.append(e.id)
                continue
            if run.task not in cam.tasks:
                others.append(e.id)
                continue
            if cam.max_age_ms and (time.time_ns() - frame.ts) / 1e6 > cam.max_age_ms:
                others.append(e.id)
                box.on_commit(lambda c=cam.id: metrics.DROPPED.labels(camera=c, stage=STAGE, reason="stale").inc())
                continue
            try:
                (msg,) = self.preparer.messages(frame, cam, [run.task], e.id, t0)
            except DecodeError as err:
                run.reader.reject(box, e, "decode_error", str(err))
                continue
            good.append((e, msg))
        run.reader.ack(box, others)
        return good

    def stack(self, run: TaskRunner, items: list, box: Outbox | None, buffers: list | None) -> list:
        """[(item indexes, [n, h, w, c] tensor)] per frame shape, stacked once into a reusable buffer.

        JPEG-routed frames (``decode: infer``) are decoded and resized here as a batch, on the device
        where it has a decoder. A JPEG that does not decode is dead-lettered (in ``box``) and left out.
        """
        by_shape: dict[tuple, list[int]] = {}
        for i, (_, msg) in enumerate(items):
            by_shape.setdefault((msg.shape, msg.dtype, getattr(msg, "enc", "raw")), []).append(i)
        groups = []
        for (shape, dtype, enc), idx in by_shape.items():
            if enc == "jpeg":
                buf = None
                if buffers is not None and self.jpeg.method == "cpu":  # decoded on the CPU into a reused buffer
                    buf = self.pool.take((len(idx), *shape), torch.uint8)
                    buffers.append(buf)
                tensor, bad = self.jpeg.decode_batch([items[i][1] for i in idx], out=buf)
                for j in bad:
                    entry = items[idx[j]][0]
                    if box is None:
                        raise DecodeError(f"entry {entry.id}: JPEG does not decode")
                    run.reader.reject(box, entry, "decode_error", f"JPEG of entry {entry.id} does not decode")
                keep = [k for k in range(len(idx)) if k not in set(bad)]
                if keep:
                    groups.append(([idx[k] for k in keep], tensor[keep] if bad else tensor))
                continue
            tdtype = torch.uint8 if dtype == "uint8" else torch.uint16
            buf = self.pool.take((len(idx), *shape), tdtype) if buffers is not None else torch.empty(
                (len(idx), *shape), dtype=tdtype)
            np.stack([items[i][1].array() for i in idx], out=buf.numpy())
            if buffers is not None:
                buffers.append(buf)
            groups.append((idx, buf))
        return groups

    def decode_batch(self, run: TaskRunner, batch: Batch) -> None:
        """Reader thread: decode ``batch.entries`` into items and device-ready tensors."""
        batch.box = Outbox(self.r)
        items = self.decode(run, batch.entries, batch.box)
        groups = self.stack(run, items, batch.box, batch.buffers)
        used = sorted(i for idx, _ in groups for i in idx)
        if len(used) != len(items):  # some JPEGs were dead-lettered: renumber what is left
            remap = {old: new for new, old in enumerate(used)}
            groups = [([remap[i] for i in idx], t) for idx, t in groups]
            items = [items[i] for i in used]
        batch.items, batch.groups = items, groups

    # --- running and writing (the service's thread) ------------------------------------------------
    def predict(self, run: TaskRunner, items: list[tuple[Entry, Prepared]], groups: list | None = None,
                predictor: Predictor | None = None) -> list[dict]:
        """Model outputs per item; frames of different shapes (thermal cameras) run as separate sub-batches."""
        predictor = predictor or run.predictor
        if groups is None:
            groups = self.stack(run, items, None, None)
        outs: list[dict | None] = [None] * len(items)
        cpu = time.thread_time()
        try:
            for idx, tensor in groups:
                for i, out in zip(idx, predictor.predict(tensor.to(self.device, non_blocking=True))):
                    outs[i] = out
        finally:
            metrics.MODEL_CPU.add(time.thread_time() - cpu)
        return outs

    def process(self, run: TaskRunner, entries: list[Entry]) -> None:
        """Decode, run, write and acknowledge ``entries`` now (the batcher's path without the thread)."""
        batch = Batch(run, entries, time.monotonic(), time.monotonic())
        self.decode_batch(run, batch)
        self._run(batch)
        for buf in batch.buffers:
            self.pool.give(buf)

    def process_batch(self, batch: Batch) -> None:
        try:
            self._run(batch)
        finally:
            self.batcher.done(batch)

    def _run(self, batch: Batch) -> None:
        run, items, box = batch.run, batch.items, batch.box
        predictor = run.predictor  # a swap happens between batches; this batch's results name its model
        t0 = time.perf_counter()
        try:
            outs = self.predict(run, items, batch.groups, predictor) if items else []
        except Exception as e:  # a poison frame must not take the batch with it: retry one by one
            self.log.warning("%s batch of %d failed (%s: %s); retrying frame by frame",
                             run.task, len(items), type(e).__name__, e)
            box.commit()
            for item in items:
                self.process_one(run, item, predictor)
            return
        spent = time.perf_counter() - t0
        self.write(run, items, outs, spent, box, predictor)
        box.commit()
        if run.shadow is not None:  # after the live results are out: the shadow never delays them
            self.run_shadow(run, items, batch.groups, outs, predictor)

    def run_shadow(self, run: TaskRunner, items, groups, live_outs: list[dict], live: Predictor) -> None:
        """Run the task's shadow on its share of a batch the live model has run (the same tensors); write its
        results to ``{P}:shadow`` and count each frame's agreement with the live model. A shadow that raises
        is dropped (``ModelSwapper.drop_shadow``) and the batch's live results stand."""
        shadow = run.shadow
        picked = shadow.pick(len(items))
        if not picked:
            return
        where = {i: k for k, i in enumerate(picked)}
        sub = []
        for idx, tensor in groups:
            keep = [j for j, i in enumerate(idx) if i in where]
            if keep:
                sub.append(([where[idx[j]] for j in keep], tensor if len(keep) == len(idx) else tensor[keep]))
        chosen = [items[i] for i in picked]
        t0 = time.perf_counter()
        try:
            outs = self.predict(run, chosen, sub, shadow.predictor)
            spent = time.perf_counter() - t0
            results, values = [], []
            for i, ((_, msg), out) in zip(picked, zip(chosen, outs)):
                t = dict(msg.t)
                t[STAGE] = spent / len(chosen)
                results.append(Result(camera=msg.camera, seq=msg.seq, ts=msg.ts, task=run.task,
                                      frame_id=msg.frame_id, model=shadow.name, out=to_original(run.task, out, msg),
                                      t=t))
                values.append(compare(run.task, comparable(run.task, live_outs[i], msg),
                                      comparable(run.task, out, msg)))
        except Exception as e:  # the candidate's fault, not the frames': drop it, once
            if self.swapper is not None:  # first: the failure is on record before the shadow is gone
                self.swapper.drop_shadow(run.task, shadow.fp, shadow.path, "inference", reason(e))
            run.shadow = None
            return
        box = Outbox(self.r)
        for res in results:
            self.shadow_results.add(res.to_msgpack(), cam=res.camera, task=run.task, box=box)
        box.commit()
        hist = shadow_metric(run.task).labels(task=run.task, live=live.name, shadow=shadow.name)
        for v in values:
            hist.observe(v)
            shadow.count(live.name, v)

    def process_one(self, run: TaskRunner, item: tuple[Entry, Prepared], predictor: Predictor | None = None) -> None:
        predictor = predictor or run.predictor
        box = Outbox(self.r)
        t0 = time.perf_counter()
        try:
            outs = self.predict(run, [item], None, predictor)
        except Exception as e:  # left pending: the reader dead-letters it after max_deliveries
            self.log.warning("%s frame %s#%d fails the model (%s: %s); left for redelivery",
                             run.task, item[1].camera, item[1].seq, type(e).__name__, e)
            return
        self.write(run, [item], outs, time.perf_counter() - t0, box, predictor)
        box.commit()

    def write(self, run: TaskRunner, items, outs, spent: float, box: Outbox,
              predictor: Predictor | None = None) -> None:
        model = (predictor or run.predictor).name
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
