"""The one stream helper: names, connection, producer, consumer-group reader, dead letters (DESIGN §2).

Every entry has the msgpack message in field ``m`` plus readable ``cam`` and ``task`` fields.
A reader acknowledges an entry only in the same MULTI as the output it wrote for it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable

import redis

from shared import metrics
from shared.config import Config, RedisConfig

log = logging.getLogger("plantsight.streams")

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, ConnectionRefusedError, OSError)


class Names:
    """Stream and group names for one prefix.

    ``infer_reads_frames`` (``inference.read_from: frames``): infer's group of each task reads ``{P}:frames``
    itself and the ``prepared`` streams are not used; otherwise preprocess's group reads it.
    """

    def __init__(self, prefix: str, infer_reads_frames: bool = False):
        self.prefix = prefix
        self.infer_reads_frames = infer_reads_frames
        self.frames = f"{prefix}:frames"
        self.results = f"{prefix}:results"
        self.alerts = f"{prefix}:alerts"
        self.deadletter = f"{prefix}:deadletter"

    def prepared(self, task: str) -> str:
        return f"{self.prefix}:prepared:{task}"

    @staticmethod
    def infer_group(task: str) -> str:
        return f"infer-{task}"

    PREPROCESS = "preprocess"
    ALERT = "alert"

    @classmethod
    def for_config(cls, cfg: Config) -> "Names":
        return cls(cfg.redis.prefix, infer_reads_frames=cfg.inference.read_from == "frames")

    def frame_groups(self, tasks: Iterable[str]) -> list[str]:
        """The consumer groups that read ``{P}:frames``, in a stable order."""
        return [self.infer_group(t) for t in sorted(tasks)] if self.infer_reads_frames else [self.PREPROCESS]

    def frame_readers_write(self, tasks: Iterable[str]) -> list[str]:
        """The streams the readers of ``{P}:frames`` write what they have read into."""
        return [self.results] if self.infer_reads_frames else [self.prepared(t) for t in sorted(tasks)]

    def all(self, tasks: Iterable[str]) -> list[tuple[str, str | None]]:
        """(stream, group) of every stream a pipeline with these tasks uses."""
        tasks = list(tasks)
        out: list[tuple[str, str | None]] = [(self.frames, g) for g in self.frame_groups(tasks)]
        if not self.infer_reads_frames:
            out += [(self.prepared(t), self.infer_group(t)) for t in tasks]
        out += [(self.results, self.ALERT), (self.alerts, None), (self.deadletter, None)]
        return out


def connect(cfg: RedisConfig) -> redis.Redis:
    """A client for the configured Redis (password from env/file, TLS with an optional CA)."""
    kwargs = dict(socket_timeout=cfg.socket_timeout_s, socket_connect_timeout=cfg.socket_timeout_s,
                  health_check_interval=10)
    secret = cfg.secret()
    if secret:
        kwargs["password"] = secret
    if cfg.username:
        kwargs["username"] = cfg.username
    if cfg.url.startswith("rediss://") and cfg.tls_ca_file:
        kwargs["ssl_ca_certs"] = str(cfg.tls_ca_file)
    return redis.Redis.from_url(cfg.url, **kwargs)


def ensure_group(r: redis.Redis, stream: str, group: str) -> None:
    """Create the group at the start of the stream (so nothing written before a consumer starts is missed)."""
    try:
        r.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _find_group(groups: list, group: str) -> dict | None:
    """The entry for ``group`` in an ``XINFO GROUPS`` reply, with text values."""
    for g in groups:
        if _s(g["name"]) == group:
            return {k: (_s(v) if isinstance(v, bytes) else v) for k, v in g.items()}
    return None


def group_info(r: redis.Redis, stream: str, group: str) -> dict | None:
    try:
        groups = r.xinfo_groups(stream)
    except redis.ResponseError:  # no such stream yet
        return None
    return _find_group(groups, group)


# The one reading of XINFO GROUPS inside Redis, for the scripts below: the fields of ``name``'s entry, nil
# without that group, false without the stream.
_GROUP_LUA = """
local function group_of(key, name)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', key)
  if not ok then return false end
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == name then return info end
  end
  return nil
end
"""

# Where a consumer group stands, as {last-delivered-id, lag, lag-is-a-floor}, in one command that never fails:
# a script, so that it can ride in a pipeline or a MULTI beside other work. Without a stream: {"0-0", 0};
# without the group: everything is undelivered. Where XINFO has no ``lag`` (Redis 6.2; 7.x after a deletion)
# it counts the entries after last-delivered-id inside Redis (only the count crosses the network), up to
# ARGV[2]; a count that reaches it is only a floor (the third element says so).
_POSITION = _GROUP_LUA + """
local info = group_of(KEYS[1], ARGV[1])
if info == false then return {'0-0', 0} end
if info == nil then return {'0-0', redis.call('XLEN', KEYS[1])} end
local last = info['last-delivered-id']
if info['lag'] then return {last, info['lag']} end
local counted = #redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', ARGV[2])
return {last, counted, counted >= tonumber(ARGV[2]) and 1 or 0}
"""


@dataclass(frozen=True)
class Position:
    """Where a consumer group stands on its stream."""

    delivered: tuple[int, int]  # last-delivered-id, as (ms, seq)
    lag: int  # entries not yet delivered to it
    at_least: bool = False  # Redis did not say and the count stopped at its limit: there may be more


def ask_position(target, stream: str, group: str, limit: int = 10000):
    """Ask where ``group`` stands on ``stream``: on a client, the reply now (``position_of`` reads it); on a
    pipeline or an ``Outbox``'s MULTI, queued beside the rest."""
    return target.eval(_POSITION, 1, stream, group, limit)


def position_of(reply) -> Position:
    return Position(parse_id(_s(reply[0])), int(reply[1]), len(reply) > 2 and bool(reply[2]))


def group_position(r: redis.Redis, stream: str, group: str, limit: int = 10000) -> Position:
    return position_of(ask_position(r, stream, group, limit))


def group_lag(r: redis.Redis, stream: str, group: str, limit: int = 10000) -> int:
    """Entries not yet delivered to the group (counted up to ``limit`` where Redis does not say)."""
    return group_position(r, stream, group, limit).lag


def wait_then_ask(r: redis.Redis, streams: list[str], timeout_s: float, groups: list[tuple[str, str]],
                  limit: int = 10000) -> tuple[bool, list[Position]]:
    """Block until one of ``streams`` gets an entry added after this call, or ``timeout_s`` passes, then
    say where each (stream, group) of ``groups`` stands: (whether an entry came, positions), in one round
    trip.

    How a stage that the next one holds back waits for it to move: a blocked camera waits for
    preprocess to write (so it has read frames), preprocess for infer to write results. Asking the
    group's position every few milliseconds instead cost more CPU than the frames at saturation, and
    the pause between questions still delayed the restart. Up to one entry per stream comes back; its
    payload is not looked at. An entry written between the caller's last question and this call is not
    seen: the caller then moves on the next one (the next stage keeps writing while it has work) or
    at the timeout.
    """
    pipe = r.pipeline(transaction=False)  # Redis runs the questions once the blocking read returns
    pipe.xread({s: "$" for s in streams}, count=1, block=max(1, round(timeout_s * 1000)))
    for stream, group in groups:
        ask_position(pipe, stream, group, limit)
    came, *replies = pipe.execute()
    return bool(came), [position_of(x) for x in replies]


# Deletes entry ARGV[1] if none of the groups ARGV[2..] has read it yet (0 without the stream).
_DROP_IF_UNDELIVERED = _GROUP_LUA + """
local ams, aseq = string.match(ARGV[1], '^(%d+)-(%d+)$')
ams, aseq = tonumber(ams), tonumber(aseq)
for i = 2, #ARGV do
  local info = group_of(KEYS[1], ARGV[i])
  if info == false then return 0 end
  local ld = info and info['last-delivered-id'] or '0-0'
  local bms, bseq = string.match(ld, '^(%d+)-(%d+)$')
  bms, bseq = tonumber(bms), tonumber(bseq)
  if not (ams > bms or (ams == bms and aseq > bseq)) then return -1 end
end
return redis.call('XDEL', KEYS[1], ARGV[1])
"""


class Producer:
    """XADD with ``MAXLEN ~`` (or ``MINID ~`` by age) and the readable side fields.

    ``add`` waits for Redis's answer. ``send`` does not: it writes on a connection of the producer's own and
    ``answers`` reads the ids later, in order. A camera thread that waited for every answer slept and woke
    once more per frame: a fifth of ingest's CPU per frame on the two-core VM. A producer that sends is used
    by one thread; ``close`` hands its connection back.
    """

    def __init__(self, r: redis.Redis, stream: str, *, maxlen: int | None = None, max_age_s: int | None = None):
        self.r, self.stream, self.maxlen, self.max_age_s = r, stream, maxlen, max_age_s
        self._drop = r.register_script(_DROP_IF_UNDELIVERED)
        self._conn = None  # for send/answers: a connection of its own
        self._sent: deque[list] = deque()  # XADDs written on it and not answered yet, oldest first
        self._unsent: deque[list] = deque()  # XADDs to write (again, after a lost connection)
        self._answered: list[str] = []  # ids read and not yet given by ``answers``

    def fields(self, payload: bytes, cam: str | None = None, task: str | None = None) -> dict:
        f = {"m": payload}
        if cam:
            f["cam"] = cam
        if task:
            f["task"] = task
        return f

    def _xadd(self, payload: bytes, cam: str | None, task: str | None) -> list:
        """The XADD command, trimming included, as ``add`` and ``send`` write it."""
        args = ["XADD", self.stream]
        if self.maxlen:
            args += ["MAXLEN", "~", self.maxlen]
        elif self.max_age_s:
            args += ["MINID", "~", f"{int((time.time() - self.max_age_s) * 1000)}-0"]
        args.append("*")
        for k, v in self.fields(payload, cam, task).items():
            args += [k, v]
        return args

    def add(self, payload: bytes, cam: str | None = None, task: str | None = None,
            box: "Outbox | None" = None) -> str | None:
        """XADD now (returns the id) or queued in ``box`` (returns None)."""
        target = box.pipe if box is not None else self.r
        out = target.execute_command(*self._xadd(payload, cam, task))
        return None if box is not None else _s(out)

    def send(self, payload: bytes, cam: str | None = None, task: str | None = None) -> None:
        """XADD without waiting for the answer; ``answers`` gives the id. The entry is kept until Redis has
        answered it: when the connection is lost, the entries it did not answer are written again, in order, on
        the next one (as redis-py retries a command whose answer it lost). Redis being away shows as entries
        left unanswered and as ``answers`` raising one of ``REDIS_DOWN``; ``send`` itself does not raise it."""
        self._unsent.append(self._xadd(payload, cam, task))
        try:
            self._read_answers(wait=False)  # before writing more: a broken connection loses the answers in it
            self._write()
        except REDIS_DOWN:
            self._lose_connection()

    @property
    def unanswered(self) -> int:
        """Entries sent (or to be sent again) whose id ``answers`` has not given yet."""
        return len(self._answered) + len(self._sent) + len(self._unsent)

    def answers(self, wait: bool = True) -> list[str]:
        """The ids of the entries sent, oldest first: all of them when ``wait``, else those Redis has already
        answered (no sleep for the rest). A refused XADD raises ``redis.ResponseError``."""
        try:
            self._write()
            self._read_answers(wait)
        except REDIS_DOWN:
            self._lose_connection()
            raise
        out, self._answered = self._answered, []
        return out

    def _read_answers(self, wait: bool) -> None:
        while self._sent and (wait or self._conn.can_read(0)):
            try:
                reply = self._conn.read_response()
            except redis.ResponseError:
                self._sent.popleft()  # answered, with a refusal
                raise
            self._sent.popleft()
            self._answered.append(_s(reply))

    def _write(self) -> None:
        """Write what is unsent, on a new connection if the last one was lost."""
        if self._unsent and self._conn is None:
            self._conn = self.r.connection_pool.get_connection()
        while self._unsent:
            self._conn.send_command(*self._unsent[0])
            self._sent.append(self._unsent.popleft())

    def _lose_connection(self) -> None:
        """Drop the connection; what it did not answer is written again on the next one."""
        if self._conn is not None:
            self._conn.disconnect()
            self.r.connection_pool.release(self._conn)
            self._conn = None
        self._unsent.extendleft(reversed(self._sent))
        self._sent.clear()

    def close(self) -> None:
        """Read the answers still due (Redis being up) and hand the connection back; what is still unanswered
        then is given up."""
        try:
            self.answers()
        except (*REDIS_DOWN, redis.ResponseError):
            pass
        self._lose_connection()
        self._unsent.clear()
        self._answered = []

    def drop_if_undelivered(self, entry_id: str, groups: list[str]) -> int:
        """Atomically delete an entry none of ``groups`` has read yet: 1 deleted, 0 gone already, -1 delivered
        (to one of them at least)."""
        return int(self._drop(keys=[self.stream], args=[entry_id, *groups]))


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
        return _s(self.fields.get(b"cam", b""))


class Outbox:
    """One MULTI/EXEC of outputs and acks; metric updates run only once it has been written."""

    def __init__(self, r: redis.Redis):
        self.pipe = r.pipeline(transaction=True)
        self._after: list = []

    def on_commit(self, fn) -> None:
        self._after.append(fn)

    def commit(self) -> list:
        """Write it all; the replies, in the order queued."""
        replies = self.pipe.execute() if len(self.pipe) else []
        for fn in self._after:
            fn()
        return replies


class DeadLetters:
    """Writes entries nobody can process to ``{P}:deadletter`` with the reason, and counts them."""

    KEEP_BYTES = 1 << 20

    def __init__(self, r: redis.Redis, names: Names, max_age_s: int, stage: str):
        self.producer = Producer(r, names.deadletter, max_age_s=max_age_s)
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
        log.warning("dead letter from %s entry %s: %s %s", source_stream, entry.id if entry else "-", reason, detail[:200])


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
                entries += [Entry(_s(i), f) for i, f in items]
        return self._screen(entries)

    def _claim(self, count: int) -> list[Entry]:
        self._next_claim = time.monotonic() + self.claim_idle_ms / 4000
        reply = self.r.xautoclaim(self.stream, self.group, self.consumer, min_idle_time=self.claim_idle_ms,
                                  start_id="0-0", count=count)
        claimed, gone = reply[1], [_s(i) for i in (reply[2] if len(reply) > 2 else [])]  # 7.0 lists trimmed ids
        entries = [Entry(_s(i), f) for i, f in claimed if i is not None and f is not None]
        mine = {}
        if claimed:
            pend = self.r.xpending_range(self.stream, self.group, min="-", max="+", count=10_000,
                                         consumername=self.consumer)
            mine = {_s(p["message_id"]): p for p in pend}
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


def stream_stats(r: redis.Redis, names: Names, tasks: Iterable[str], only: set[str] | None = None) -> list[dict]:
    """Length, lag and pending of every pipeline stream (or of the streams in ``only``), asked in one round
    trip; a group whose lag Redis does not report (6.2, or entries deleted) costs one more."""
    pairs = [(s, g) for s, g in names.all(tasks) if only is None or s in only]
    if not pairs:
        return []
    pipe = r.pipeline(transaction=False)
    for stream, group in pairs:
        pipe.xlen(stream)
        if group:
            pipe.xinfo_groups(stream)
    replies = iter(pipe.execute(raise_on_error=False))
    rows = []
    for stream, group in pairs:
        length = next(replies)
        if isinstance(length, Exception):  # not a stream: say so rather than show a wrong row
            raise length
        row = {"stream": stream, "group": group, "length": int(length), "lag": None, "pending": None}
        if group:
            groups = next(replies)
            info = None if isinstance(groups, redis.ResponseError) else _find_group(groups, group)
            if info is not None:
                row["pending"] = int(info.get("pending", 0))
                lag = info.get("lag")
                row["lag"] = int(lag) if lag is not None else group_lag(r, stream, group)  # 6.2
        rows.append(row)
    return rows


def publish_stream_metrics(r: redis.Redis, names: Names, cfg: Config, streams: set[str]) -> list[dict]:
    """Set the stream gauges for the streams this service touches."""
    rows = stream_stats(r, names, cfg.tasks(), only=streams)
    for row in rows:
        metrics.STREAM_LENGTH.labels(stream=row["stream"]).set(row["length"])
        if row["group"] and row["lag"] is not None:
            metrics.CONSUMER_LAG.labels(stream=row["stream"], group=row["group"]).set(row["lag"])
            metrics.CONSUMER_PENDING.labels(stream=row["stream"], group=row["group"]).set(row["pending"])
    return rows
