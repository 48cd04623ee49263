"""Batches for infer, read and decoded on a thread of their own while the model runs the previous batch.

A batch closes at ``max_batch`` entries or ``max_wait_ms`` after its FIRST entry arrived, whichever
comes first, and keeps stream order (so each camera's frames stay in ``seq`` order inside it).

One reader thread per task reads from the task's consumer group, decodes the batch (msgpack,
checks, stacking into a reusable, on CUDA pinned, buffer) and hands it to the service's thread
through a queue. At most ``PREFETCH`` batches of a task are out at once: one in the model, one
being read or waiting. Nothing is acknowledged here: the service acknowledges a batch's entries in
the same MULTI as its results, so the at-least-once and no-duplicate guarantees of
``shared/streams/`` hold as without the thread. Entries a batch holds are "in flight": an idle
claim (``XAUTOCLAIM``) by this same worker that returns one of them is ignored, so a slow batch is
never processed twice by its own worker.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from shared.streams.groups import parse_id
from shared.streams.outbox import Outbox
from shared.streams.reader import Entry, GroupReader

log = logging.getLogger("plantsight.batcher")

PREFETCH = 2  # batches of one task out at once: one in the model, the next being read and decoded


def collect(reader: GroupReader, max_batch: int, max_wait_ms: int, block_ms: int, stop: threading.Event,
            skip: Callable[[str], bool] = lambda _id: False, clock=time.monotonic) -> tuple[list[Entry], float]:
    """Up to ``max_batch`` entries, waiting at most ``max_wait_ms`` after the first one; (entries, its arrival).

    ``skip(id)`` drops entries already in flight (claimed back by ``XAUTOCLAIM``). Entries come back
    in stream order: a claim in a later read may return older entries than the first read did.
    """
    entries = [e for e in reader.read(count=max_batch, block_ms=block_ms) if not skip(e.id)]
    first = clock()
    if not entries:
        return [], first
    deadline = first + max_wait_ms / 1000
    while len(entries) < max_batch and not stop.is_set():
        left_ms = int((deadline - clock()) * 1000)
        if left_ms <= 0:
            break
        more = [e for e in reader.read(count=max_batch - len(entries), block_ms=left_ms) if not skip(e.id)]
        if not more:
            break
        entries += more
    seen, ordered = set(), []
    for e in sorted(entries, key=lambda e: parse_id(e.id)):
        if e.id not in seen:
            seen.add(e.id)
            ordered.append(e)
    return ordered, first


class BufferPool:
    """Reusable uint8/uint16 batch buffers, pinned when the device is CUDA (one host→device copy, async)."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(shape[1:]), dtype)
        with self._lock:
            free = self._free.get(key, [])
            for i, buf in enumerate(free):
                if buf.shape[0] >= shape[0]:
                    return free.pop(i)[: shape[0]]
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def give(self, buf: torch.Tensor) -> None:
        base = buf._base if buf._base is not None else buf
        key = (tuple(base.shape[1:]), base.dtype)
        with self._lock:
            free = self._free.setdefault(key, [])
            if len(free) < PREFETCH + 1:
                free.append(base)


@dataclass
class Batch:
    """One task's batch: the entries read, what decoded, and the stacked tensors ready for the model."""

    run: Any  # the service's TaskRunner
    entries: list[Entry]
    first_at: float  # monotonic time the first entry arrived
    closed_at: float  # monotonic time the batch closed
    box: Outbox | None = None  # rejects and stale acks found while decoding, committed with the results
    items: list = field(default_factory=list)  # [(Entry, message)] that go to the model
    groups: list = field(default_factory=list)  # [(item indexes, tensor)] one per frame shape
    buffers: list = field(default_factory=list)  # pool buffers to give back when the batch is done


class _Failed:
    def __init__(self, error: BaseException, run):
        self.error, self.run = error, run


class Batcher:
    """Reader threads (one per task) feeding decoded batches to the service's thread.

    ``decode(run, batch)`` fills a batch's ``box``, ``items`` and ``groups``; it runs on the reader
    thread. ``next`` hands batches over; ``done`` must be called for each one once its results and
    acknowledgements are written (or failed), which frees its slot and its in-flight ids.
    """

    def __init__(self, runners: list, decode: Callable[[Any, Batch], None], *, max_batch: int, max_wait_ms: int,
                 block_ms: int, stop: threading.Event, pool: BufferPool | None = None):
        self.runners, self.decode = runners, decode
        self.max_batch, self.max_wait_ms, self.block_ms = max_batch, max_wait_ms, block_ms
        self.stop = stop
        self.pool = pool
        self.ready: queue.Queue = queue.Queue()
        self._slots = {id(r): threading.Semaphore(PREFETCH) for r in runners}
        self._threads: dict[int, threading.Thread] = {}
        self._inflight: set[tuple[int, str]] = set()
        self._lock = threading.Lock()

    # --- reader threads -------------------------------------------------------------------------
    def start(self) -> None:
        """Start (or restart, after a Redis error ended it) each task's reader thread."""
        for run in self.runners:
            t = self._threads.get(id(run))
            if t is None or not t.is_alive():
                t = threading.Thread(target=self._loop, args=(run,), name=f"batcher-{run.task}", daemon=True)
                self._threads[id(run)] = t
                t.start()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads.values())

    def _in_flight(self, run, entry_id: str) -> bool:
        with self._lock:
            return (id(run), entry_id) in self._inflight

    def _loop(self, run) -> None:
        slots = self._slots[id(run)]
        while not self.stop.is_set():
            if not slots.acquire(timeout=0.1):
                continue
            try:
                batch = self.read(run)
            except BaseException as e:  # Redis down, NOGROUP, a bug: the service's thread raises it
                slots.release()
                self.ready.put(_Failed(e, run))
                return
            if batch is None:
                slots.release()
                continue
            self.ready.put(batch)

    def read(self, run) -> Batch | None:
        """Collect and decode one batch of ``run``'s task (None when nothing came within ``block_ms``)."""
        entries, first = collect(run.reader, self.max_batch, self.max_wait_ms, self.block_ms, self.stop,
                                 skip=lambda i: self._in_flight(run, i))
        if not entries:
            return None
        with self._lock:
            self._inflight.update((id(run), e.id) for e in entries)
        batch = Batch(run, entries, first, time.monotonic())
        try:
            self.decode(run, batch)
        except BaseException:
            self.done(batch)
            raise
        return batch

    # --- the service's side -----------------------------------------------------------------------
    def next(self, timeout: float) -> Batch | None:
        """The next decoded batch of any task, or None after ``timeout``; re-raises a reader thread's error."""
        try:
            item = self.ready.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, _Failed):
            raise item.error
        return item

    def done(self, batch: Batch) -> None:
        """The batch's results are written (or it failed): free its slot, buffers and in-flight ids."""
        with self._lock:
            self._inflight.difference_update((id(batch.run), e.id) for e in batch.entries)
        if self.pool is not None:
            for buf in batch.buffers:
                self.pool.give(buf)
        batch.buffers = []
        self._slots[id(batch.run)].release()

    def drain(self, process: Callable[[Batch], None], timeout: float) -> None:
        """After ``stop``: process every batch already read (their entries are delivered to this consumer),
        until the reader threads have ended and the queue is empty, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self.ready.get(timeout=0.05)
            except queue.Empty:
                if not self.alive():
                    return
                continue
            if isinstance(item, _Failed):
                log.warning("%s reader stopped: %s: %s", item.run.task, type(item.error).__name__, item.error)
                continue
            try:
                process(item)
            except Exception as e:  # Redis gone while stopping: the entries stay pending for the next worker
                log.warning("%s batch of %d left pending at shutdown (%s: %s)", item.run.task, len(item.entries),
                            type(e).__name__, e)
