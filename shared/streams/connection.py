"""The connection to Redis: the client, what "Redis is away" looks like, and consumer groups."""

from __future__ import annotations

import redis

from shared.config import RedisConfig

# What a call raises while Redis is away (down, restarting, unreachable, still loading its data): the
# services wait and reconnect on these, and fail on anything else.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, ConnectionRefusedError, OSError)


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


def text(v) -> str:
    """A reply value as text (Redis answers bytes)."""
    return v.decode() if isinstance(v, bytes) else str(v)
