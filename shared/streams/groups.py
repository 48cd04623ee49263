"""Where a consumer group stands on its stream: the last entry delivered to it and the lag behind it.

The questions run inside Redis as Lua scripts, so that each is one command that never fails: it can
ride in a pipeline or a MULTI beside other work, and only the answer crosses the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from shared.streams.connection import text


def parse_id(entry_id: str) -> tuple[int, int]:
    """A stream entry id ``ms-seq`` as (ms, seq), which orders like the ids."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def find_group(groups: list, group: str) -> dict | None:
    """The entry for ``group`` in an ``XINFO GROUPS`` reply, with text values."""
    for g in groups:
        if text(g["name"]) == group:
            return {k: (text(v) if isinstance(v, bytes) else v) for k, v in g.items()}
    return None


def group_info(r: redis.Redis, stream: str, group: str) -> dict | None:
    try:
        groups = r.xinfo_groups(stream)
    except redis.ResponseError:  # no such stream yet
        return None
    return find_group(groups, group)


# The one reading of XINFO GROUPS inside Redis, for the scripts below: the fields of ``name``'s entry, nil
# without that group, false without the stream.
GROUP_LUA = """
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

# Where a consumer group stands, as {last-delivered-id, lag, lag-is-a-floor}. Without a stream: {"0-0", 0};
# without the group: everything is undelivered. Where XINFO has no ``lag`` (Redis 6.2; 7.x after a deletion)
# it counts the entries after last-delivered-id inside Redis, up to ARGV[2]; a count that reaches it is only
# a floor (the third element says so).
POSITION_LUA = GROUP_LUA + """
local info = group_of(KEYS[1], ARGV[1])
if info == false then return {'0-0', 0} end
if info == nil then return {'0-0', redis.call('XLEN', KEYS[1])} end
local last = info['last-delivered-id']
if info['lag'] then return {last, info['lag']} end
local counted = #redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', ARGV[2])
return {last, counted, counted >= tonumber(ARGV[2]) and 1 or 0}
"""

# Deletes entry ARGV[1] if none of the groups ARGV[2..] has read it yet: 1 deleted, 0 without the stream
# or the entry, -1 delivered to one of them at least.
DROP_IF_UNDELIVERED_LUA = GROUP_LUA + """
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


@dataclass(frozen=True)
class Position:
    """Where a consumer group stands on its stream."""

    delivered: tuple[int, int]  # last-delivered-id, as (ms, seq)
    lag: int  # entries not yet delivered to it
    at_least: bool = False  # Redis did not say and the count stopped at its limit: there may be more


def ask_position(target, stream: str, group: str, limit: int = 10000):
    """Ask where ``group`` stands on ``stream``: on a client, the reply now (``position_of`` reads it); on a
    pipeline or an ``Outbox``'s MULTI, queued beside the rest."""
    return target.eval(POSITION_LUA, 1, stream, group, limit)


def position_of(reply) -> Position:
    return Position(parse_id(text(reply[0])), int(reply[1]), len(reply) > 2 and bool(reply[2]))


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
    group's position every few milliseconds instead costs more CPU than the frames at saturation, and
    the pause between questions still delays the restart. Up to one entry per stream comes back; its
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
