"""Reading a stream as one consumer of a group: batches, claiming what a lost consumer left, dead letters."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable

import redis

from shared import metrics
from shared.keys import Keys
from shared.streams.connection import ensure_group, text
from shared.streams.outbox import Outbox
from shared.streams.producer import Producer

log = logging.getLogger("plantsight.streams")


@dataclass
class Entry:
    id: str
    fields: dict
    deliveries: int = 1

    @property
    def payload(self) -> bytes | None:
        return self.fields.get(b"m")

    @property
    def camera(self) -> str:
        return text(self.fields.get(b"cam", b""))


class DeadLetters:
    """Writes entries nobody can process to ``{P}:deadletter`` with the reason, and counts them."""

    KEEP_BYTES = 1 << 20

    def __init__(self, r: redis.Redis, keys: Keys, max_age_s: int, stage: str):
        self.producer = Producer(r, keys.deadletter, max_age_s=max_age_s)
        self.stage = stage

    def add(self, box: Outbox, source_stream: str, entry: Entry | None, reason: str, detail: str = "") -> None:
        """Queue the dead letter in ``box`` (the caller acks the entry in the same transaction)."""
        payload = (entry.payload or b"") if entry else b""
        fields = {"stage": self.stage, "reason": reason, "detail": detail[:500], "stream": source_stream,
                  "id": entry.id if entry else "", "cam": entry.camera if entry else "",
                  "m": payload[: self.KEEP_BYTES], "truncated": int(len(payload) > self.KEEP_BYTES)}
        kw = {"minid": f"{int((time.time() - self.producer.max_age_s) * 1000)}-0", "approximate": True}
        box.pipe.xadd(self.producer.stream, fields, **kw)
        cam = entry.camera if entry else ""

        def count():
            metrics.DEADLETTER.labels(stage=self.stage, reason=reason).inc()
            if cam:
                metrics.DROPPED.labels(camera=cam, stage=self.stage, reason="deadletter").inc()

        box.on_commit(count)
        log.warning("dead letter from %s entry %s: %s %s", source_stream, entry.id if entry else "-", reason,
                    detail[:200])


class GroupReader:
    """Reads batches for one consumer of a group; claims idle pending entries; dead-letters poison."""

    def __init__(self, r: redis.Redis, stream: str, group: str, consumer: str, *, dead: DeadLetters,
                 count: int, block_ms: int, claim_idle_ms: int, max_deliveries: int, max_bytes: int):
        self.r, self.stream, self.group, self.consumer = r, stream, group, consumer
        self.dead, self.count, self.block_ms = dead, count, block_ms
        self.claim_idle_ms, self.max_deliveries, self.max_bytes = claim_idle_ms, max_deliveries, max_bytes
        self._next_claim = 0.0

    def setup(self) -> None:
        ensure_group(self.r, self.stream, self.group)
        self._next_claim = 0.0  # claim at start: a predecessor may have left work pending

    def read(self, count: int | None = None, block_ms: int | None = None) -> list[Entry]:
        """Up to ``count`` entries: idle pending entries of any consumer first, then new ones."""
        count = count or self.count
        entries = self._claim(count) if time.monotonic() >= self._next_claim else []
        if not entries:
            reply = self.r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count,
                                      block=self.block_ms if block_ms is None else block_ms)
            for _stream, items in reply or []:
                entries += [Entry(text(i), f) for i, f in items]
        return self._screen(entries)

    def _claim(self, count: int) -> list[Entry]:
        self._next_claim = time.monotonic() + self.claim_idle_ms / 4000
        reply = self.r.xautoclaim(self.stream, self.group, self.consumer, min_idle_time=self.claim_idle_ms,
                                  start_id="0-0", count=count)
        claimed, gone = reply[1], [text(i) for i in (reply[2] if len(reply) > 2 else [])]  # 7.0 lists trimmed ids
        entries = [Entry(text(i), f) for i, f in claimed if i is not None and f is not None]
        mine = {}
        if claimed:
            pend = self.r.xpending_range(self.stream, self.group, min="-", max="+", count=10_000,
                                         consumername=self.consumer)
            mine = {text(p["message_id"]): p for p in pend}
        if len(entries) < len(claimed):
            # 6.2 returns nil for entries trimmed while pending but still claims them: they are the
            # just-claimed ids of ours that no longer exist in the stream.
            have = {e.id for e in entries}
            fresh = [i for i, p in mine.items() if i not in have and p["time_since_delivered"] < self.claim_idle_ms]
            gone += [i for i in fresh if not self.r.xrange(self.stream, min=i, max=i, count=1)]
        if gone:  # trimmed before anyone processed them: account and forget
            box = Outbox(self.r)
            for i in gone:
                self.dead.add(box, self.stream, Entry(i, {}), "trimmed", "entry trimmed from the stream while pending")
            box.pipe.xack(self.stream, self.group, *gone)
            box.commit()
        for e in entries:
            e.deliveries = int(mine[e.id]["times_delivered"]) if e.id in mine else 1
        if entries:
            log.info("claimed %d idle pending entries of %s/%s", len(entries), self.stream, self.group)
        return entries

    def _screen(self, entries: list[Entry]) -> list[Entry]:
        """Dead-letter entries delivered too often or without a payload; return the rest."""
        good, bad = [], []
        for e in entries:
            if e.deliveries > self.max_deliveries:
                bad.append((e, "max_deliveries", f"delivered {e.deliveries} times"))
            elif not e.payload:
                bad.append((e, "no_payload", "entry has no 'm' field"))
            elif len(e.payload) > self.max_bytes:
                bad.append((e, "oversized", f"{len(e.payload)} bytes > limit {self.max_bytes}"))
            else:
                good.append(e)
        if bad:
            box = Outbox(self.r)
            for e, reason, detail in bad:
                self.dead.add(box, self.stream, e, reason, detail)
            box.pipe.xack(self.stream, self.group, *[e.id for e, _, _ in bad])
            box.commit()
        return good

    def ack(self, box: Outbox, ids: Iterable[str]) -> None:
        ids = list(ids)
        if ids:
            box.pipe.xack(self.stream, self.group, *ids)

    def reject(self, box: Outbox, entry: Entry, reason: str, detail: str) -> None:
        """Dead-letter one entry and acknowledge it, in ``box``."""
        self.dead.add(box, self.stream, entry, reason, detail)
        box.pipe.xack(self.stream, self.group, entry.id)
