"""Length, lag and pending of the pipeline's streams, for the command line, the viewer and the gauges."""

from __future__ import annotations

from typing import Iterable

import redis

from shared import metrics
from shared.config import Config
from shared.keys import Keys
from shared.streams.groups import find_group, group_lag


def stream_stats(r: redis.Redis, keys: Keys, tasks: Iterable[str], only: set[str] | None = None) -> list[dict]:
    """Length, lag and pending of every pipeline stream (or of the streams in ``only``), asked in one round
    trip; a group whose lag Redis does not report (6.2, or entries deleted) costs one more."""
    pairs = [(s, g) for s, g in keys.all(tasks) if only is None or s in only]
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
            info = None if isinstance(groups, redis.ResponseError) else find_group(groups, group)
            if info is not None:
                row["pending"] = int(info.get("pending", 0))
                lag = info.get("lag")
                row["lag"] = int(lag) if lag is not None else group_lag(r, stream, group)  # 6.2
        rows.append(row)
    return rows


def publish_stream_metrics(r: redis.Redis, keys: Keys, cfg: Config, streams: set[str]) -> list[dict]:
    """Set the stream gauges for the streams this service touches."""
    rows = stream_stats(r, keys, cfg.tasks(), only=streams)
    for row in rows:
        metrics.STREAM_LENGTH.labels(stream=row["stream"]).set(row["length"])
        if row["group"] and row["lag"] is not None:
            metrics.CONSUMER_LAG.labels(stream=row["stream"], group=row["group"]).set(row["lag"])
            metrics.CONSUMER_PENDING.labels(stream=row["stream"], group=row["group"]).set(row["pending"])
    return rows
