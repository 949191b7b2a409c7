"""A Redis log written the way agents' links write it."""

from __future__ import annotations

import numpy as np
import redis

from borgdqn.memory.codec import encode_chunk
from borgdqn.memory.protocol import TrajectoryChunk
from borgdqn.memory.redis.keys import LogShape
from borgdqn.memory.redis.writer import LogWriter


def shape(capacity: int = 64, chunk_length: int = 8) -> LogShape:
    return LogShape(capacity=capacity, chunk_length=chunk_length, frame_shape=(2,), frame_dtype="<f4")


def open_log(url: str, name: str, capacity: int = 64) -> LogWriter:
    """A writer of log ``name`` (declared), as an agent's link holds one."""
    writer = LogWriter(redis.Redis.from_url(url), name, shape(capacity))
    writer.declare()
    return writer


def episode(log: LogWriter, stream: int, agent: int, steps: int, chunk_length: int = 8) -> None:
    """One whole episode of ``steps`` steps, appended in chunks numbered from 0 (a new stream id per episode)."""
    entries = []
    for number, lo in enumerate(range(0, steps, chunk_length)):
        t = min(chunk_length, steps - lo)
        first = np.zeros(t, dtype=bool)
        first[0] = lo == 0
        last = np.zeros(t, dtype=bool)
        last[-1] = lo + t == steps
        chunk = TrajectoryChunk(
            stream_id=stream, agent_id=agent, frames=np.arange(lo, lo + t, dtype=np.float32)[:, None].repeat(2, 1),
            actions=np.zeros(t, dtype=np.int64), rewards=np.ones(t, dtype=np.float32), first=first, last=last,
            terminated=last.copy())  # fmt: skip
        entries.append((encode_chunk(chunk, chunk_seq=number), agent, t))
    log.append(entries)
