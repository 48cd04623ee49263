"""One MULTI/EXEC of a stage's outputs and the acknowledgements of the entries they came from."""

from __future__ import annotations

import redis


class Outbox:
    """One MULTI/EXEC of outputs and acks; metric updates run only once it has been written.

    Writing the output and acknowledging its input in one transaction means a stage that dies between
    the two neither loses the entry nor writes its output twice.
    """

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
