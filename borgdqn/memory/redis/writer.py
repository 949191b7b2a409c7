"""Appending trajectory chunks to the hive's log: one script call per batch of chunks, bounded by steps.

The log is a Redis stream (see ``keys``). A Redis stream was chosen over the first seed's ring of slot keys: an
entry carries its data and metadata together and is appended in O(1), ``XRANGE``/``XREAD BLOCK`` give a tail an
ordered, resumable cursor (the entry id) with one round trip per batch and no polling of a head counter, and a
trimmed prefix is visible as a gap in the ids (measured against the ring in ``benchmarks/redis_replay_throughput.py``;
see docs/redis-memory.md). The script trims the oldest *whole* chunks as soon as the log holds more than
``capacity`` steps, and keeps exact counters (steps, bytes, steps per agent) for the monitor and the operator.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from borgdqn.memory.redis.keys import LogKeys, LogShape

# KEYS: config, log, stats, agents. ARGV: capacity, then four per chunk: data, agent, steps, writer time (ms).
# Returns the g of the last chunk appended. Refuses to append to a log whose config is gone (a server restarted
# without persistence): the writer declares the log again and retries.
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('BORG_NO_LOG') end
local cap = tonumber(ARGV[1])
local g = tonumber(redis.call('HGET', KEYS[3], 'chunks') or '0')
local size = tonumber(redis.call('HGET', KEYS[3], 'size') or '0')
local added, bytes, n = 0, 0, 0
for i = 2, #ARGV, 4 do
  g = g + 1
  n = n + 1
  local t = tonumber(ARGV[i + 2])
  redis.call('XADD', KEYS[2], string.format('%d-1', g), 'd', ARGV[i], 'a', ARGV[i + 1], 't', ARGV[i + 2],
             'w', ARGV[i + 3])
  redis.call('HINCRBY', KEYS[4], ARGV[i + 1], t)
  added = added + t
  bytes = bytes + #ARGV[i]
end
size = size + added
local trimmed, freed, last = 0, 0, nil
while size > cap do
  local old = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', n + 1)
  if #old == 0 then break end
  for _, entry in ipairs(old) do
    if size <= cap then break end
    local f, fd, fa, ft = entry[2], '', nil, nil
    for j = 1, #f, 2 do
      if f[j] == 'd' then fd = f[j + 1] elseif f[j] == 'a' then fa = f[j + 1] elseif f[j] == 't' then ft = f[j + 1] end
    end
    local t = tonumber(ft) or 0
    size = size - t
    freed = freed + #fd
    if fa and t ~= 0 then
      if redis.call('HINCRBY', KEYS[4], fa, -t) <= 0 then redis.call('HDEL', KEYS[4], fa) end
    end
    trimmed = trimmed + 1
    last = entry[1]
  end
  if last then
    redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d-0', tonumber(string.match(last, '^(%d+)')) + 1))
  end
end
if size < 0 then size = 0 end
redis.call('HSET', KEYS[3], 'chunks', string.format('%d', g), 'size', string.format('%d', size))
redis.call('HINCRBY', KEYS[3], 'inserted', added)
redis.call('HINCRBY', KEYS[3], 'bytes', bytes - freed)
if trimmed > 0 then redis.call('HINCRBY', KEYS[3], 'trimmed', trimmed) end
return g
"""


# KEYS: config, stats. ARGV: the shape's JSON, a new epoch. Creates the log (1) unless its config exists (0). The
# epoch tells tails that a log was recreated under them (a restart without persistence) even when the new log has
# grown past their cursor.
_DECLARE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'epoch', ARGV[2])
return 1
"""


class LogShapeMismatch(ValueError):
    """The log on the server has another shape than this client's config (another game, capacity, ...)."""


class LogWriter:
    """Appends encoded chunks to log ``name`` through ``client`` (a ``redis.Redis``); not thread-safe."""

    def __init__(self, client: Any, name: str, shape: LogShape) -> None:
        self._r = client
        self.name = name
        self.shape = shape
        self.keys = LogKeys.of(name)
        self._append = client.register_script(_APPEND)
        self._declare = client.register_script(_DECLARE)

    def declare(self) -> bool:
        """Create the log's config unless it exists (True if created); LogShapeMismatch if it differs."""
        created = bool(self._declare(keys=[self.keys.config, self.keys.stats],
                                     args=[self.shape.to_json(), secrets.token_hex(8)]))
        if not created:
            stored = LogShape.from_json(self._r.get(self.keys.config) or b"{}", self.keys.config)
            if stored != self.shape:
                raise LogShapeMismatch(f"the Redis memory {self.name!r} holds a log of another shape: {stored}; this "
                                       f"agent's is {self.shape} (use another replay.redis_name, or the same config)")
        return created

    def append(self, entries: list[tuple[bytes, int, int]], added_ms: list[float] | None = None) -> int:
        """Append ``(encoded chunk, agent id, steps)`` entries in order; returns the g of the last one.
        ``added_ms``: when the agent added each chunk (unix ms; default now), from which tails measure the lag."""
        import redis

        now_ms = time.time() * 1000
        args: list[Any] = [self.shape.capacity]
        for i, (data, agent, steps) in enumerate(entries):
            args += [data, agent, steps, f"{added_ms[i] if added_ms else now_ms:.1f}"]
        keys = [self.keys.config, self.keys.log, self.keys.stats, self.keys.agents]
        try:
            return int(self._append(keys=keys, args=args))
        except redis.ResponseError as err:
            if "BORG_NO_LOG" not in str(err):
                raise
        self.declare()  # the server lost the log (no persistence): recreate it, then append
        return int(self._append(keys=keys, args=args))
