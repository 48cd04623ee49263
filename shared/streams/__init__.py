"""Redis Streams as the services use them; one module per concern, imported directly:

- ``connection``: the client for the configured Redis (``connect``), what "Redis is away" looks like
  (``REDIS_DOWN``), creating a consumer group (``ensure_group``);
- ``groups``: where a consumer group stands on its stream (``Position``, lag), asked in one round trip
  by the Lua scripts there;
- ``producer``: writing entries (``Producer``), trimmed by length or age;
- ``outbox``: one MULTI/EXEC of a stage's outputs and acknowledgements (``Outbox``);
- ``reader``: a consumer of a group (``GroupReader``, ``Entry``) and the dead letters (``DeadLetters``);
- ``stats``: length, lag and pending of every pipeline stream, and their gauges.

Stream and group names are in ``shared/keys.py``. Every entry has the msgpack message in field ``m``
plus readable ``cam`` and ``task`` fields (docs/wire-format.md). A reader acknowledges an entry only in
the same MULTI as the output it wrote for it, so a crash never loses an entry nor writes its output twice.
"""
