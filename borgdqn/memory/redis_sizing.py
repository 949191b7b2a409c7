"""How much memory the Redis replay memory needs: the ``maxmemory`` of the memory pod's redis-server.

The memory is a ring of ``slots = ceil(capacity / chunk_length)`` chunk keys plus four small arrays (see
``redis_replay``), so what it holds once full is known in advance, up to how well the frames compress::

    slots      = ceil(capacity / chunk_length)
    chunk      = chunk_length * bytes_per_step + PER_CHUNK_OVERHEAD       (one stored chunk and its Redis key)
    arrays     = slots * (8 + 2 + 2 + 4) + slots * chunk_length * 4     (gseq, steps, agent, seqprio; prio)
    data       = slots * chunk + arrays
    maxmemory  = ceil(data * (1 + headroom)) + BASE_BYTES

``bytes_per_step`` is what one step costs in a stored chunk, *including* its share of the steps a chunk borrows
from its neighbours (frame stack - 1 before; n-step, or the rest of an LSTM sequence, after): exactly the
``bytes_per_step`` that the memory monitor reports (stored chunk bytes / steps stored), so a measured figure
can be fed back. The default is a
generous guess for Atari frames (84x84 uint8, LZ4): Pong measures ~125 B/step with 32-step chunks, stack 4,
n-step 3; a raw frame is 7,056 B. ``headroom`` covers the allocator's size-class rounding (up to 25% of a value)
and frames that compress worse than guessed; ``BASE_BYTES`` covers Redis itself (client buffers, scripts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_CHUNK_LENGTH = 32
DEFAULT_BYTES_PER_STEP = 1024
DEFAULT_HEADROOM = 0.5
PER_CHUNK_OVERHEAD = 256  # key name, Redis object and dict entry, the chunk's protobuf header
PER_SLOT_BYTES = 8 + 2 + 2 + 4  # gseq int64, steps uint16, agent uint16, seqprio float32 (LSTM memories)
PER_STEP_ARRAY_BYTES = 4  # prio float32
BASE_BYTES = 64 << 20


@dataclass(frozen=True)
class MemorySizing:
    """The numbers behind one ``maxmemory`` (logged by the memory image's entrypoint)."""

    capacity: int
    chunk_length: int
    bytes_per_step: float
    headroom: float
    slots: int
    chunk_bytes: int  # one chunk with its per-key overhead
    array_bytes: int
    data_bytes: int
    maxmemory: int


def size_memory(
    capacity: int,
    chunk_length: int = DEFAULT_CHUNK_LENGTH,
    bytes_per_step: float = DEFAULT_BYTES_PER_STEP,
    headroom: float = DEFAULT_HEADROOM,
) -> MemorySizing:
    """The ``maxmemory`` (bytes) of a Redis memory of ``capacity`` steps; ValueError names a bad argument."""
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1 step, not {capacity}")
    if chunk_length < 1:
        raise ValueError(f"chunk_length must be at least 1 step, not {chunk_length}")
    if not (math.isfinite(bytes_per_step) and bytes_per_step > 0):
        raise ValueError(f"bytes_per_step must be a positive number, not {bytes_per_step}")
    if not (math.isfinite(headroom) and headroom >= 0):
        raise ValueError(f"headroom must be a fraction >= 0, not {headroom}")
    slots = max(1, -(-capacity // chunk_length))
    chunk = math.ceil(chunk_length * bytes_per_step) + PER_CHUNK_OVERHEAD
    arrays = slots * PER_SLOT_BYTES + slots * chunk_length * PER_STEP_ARRAY_BYTES
    data = slots * chunk + arrays
    maxmemory = math.ceil(data * (1 + headroom)) + BASE_BYTES
    return MemorySizing(
        capacity=capacity,
        chunk_length=chunk_length,
        bytes_per_step=bytes_per_step,
        headroom=headroom,
        slots=slots,
        chunk_bytes=chunk,
        array_bytes=arrays,
        data_bytes=data,
        maxmemory=maxmemory,
    )
