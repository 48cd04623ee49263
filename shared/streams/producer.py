"""Writing entries to a stream: XADD trimmed by length or age, waiting for the id or not."""

from __future__ import annotations

import time
from collections import deque

import redis

from shared.streams.connection import REDIS_DOWN, text
from shared.streams.groups import DROP_IF_UNDELIVERED_LUA
from shared.streams.outbox import Outbox


class Producer:
    """XADD with ``MAXLEN ~`` (or ``MINID ~`` by age) and the readable side fields.

    ``add`` waits for Redis's answer. ``send`` does not: it writes on a connection of the producer's own and
    ``answers`` reads the ids later, in order, so a camera thread does not sleep and wake once more per
    frame for an answer it needs only later. A producer that sends is used by one thread; ``close`` hands
    its connection back.
    """

    def __init__(self, r: redis.Redis, stream: str, *, maxlen: int | None = None, max_age_s: int | None = None):
        self.r, self.stream, self.maxlen, self.max_age_s = r, stream, maxlen, max_age_s
        self._drop = r.register_script(DROP_IF_UNDELIVERED_LUA)
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
            box: Outbox | None = None) -> str | None:
        """XADD now (returns the id) or queued in ``box`` (returns None)."""
        target = box.pipe if box is not None else self.r
        out = target.execute_command(*self._xadd(payload, cam, task))
        return None if box is not None else text(out)

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
            self._answered.append(text(reply))

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
