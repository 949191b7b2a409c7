"""How much memory the Redis log needs: the ``maxmemory`` of the memory pod's redis-server.

The log holds at most ``capacity`` steps in whole chunks (see ``writer``), one stream entry per chunk plus a few
small hashes, so what it holds once full is known in advance, up to how well the frames compress::

    chunks     = ceil(capacity / chunk_length)
    chunk      = chunk_length * bytes_per_step + PER_CHUNK_OVERHEAD       (one entry: its fields and stream node)
    data       = chunks * chunk
    maxmemory  = ceil(data * (1 + headroom)) + BASE_BYTES + model_store_bytes

``bytes_per_step`` is what one step costs in a stored chunk: exactly the ``bytes_per_step`` that the memory
monitor reports (chunk bytes held / steps held), so a measured figure can be fed back. The default is a generous
guess for Atari frames (84x84 uint8, LZ4): Pong measures ~95 B/step with 32-step chunks; a raw frame is 7,056 B.
``headroom`` covers the allocator's size-class rounding (up to 25% of a value) and frames that compress worse than
guessed; ``BASE_BYTES`` covers Redis itself (client buffers, scripts, the AOF rewrite buffer).
``model_store_bytes`` is the budget of the hive's model store (``model_store``), which shares the Redis: a
collective's agents keep their latest checkpoints there, and the store refuses what would pass its budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_CHUNK_LENGTH = 32
DEFAULT_BYTES_PER_STEP = 1024
DEFAULT_HEADROOM = 0.5
PER_CHUNK_OVERHEAD = 256  # the stream entry (id, field names, agent, steps, time) and the chunk's protobuf header
BASE_BYTES = 64 << 20
DEFAULT_MODEL_STORE_BYTES = 1 << 30  # ~37 Atari agents' checkpoints of ~27 MB


@dataclass(frozen=True)
class MemorySizing:
    """The numbers behind one ``maxmemory`` (logged by the memory image's entrypoint)."""

    capacity: int
    chunk_length: int
    bytes_per_step: float
    headroom: float
    chunks: int
    chunk_bytes: int  # one chunk with its entry's overhead
    data_bytes: int
    model_store_bytes: int
    maxmemory: int


def size_memory(
    capacity: int,
    chunk_length: int = DEFAULT_CHUNK_LENGTH,
    bytes_per_step: float = DEFAULT_BYTES_PER_STEP,
    headroom: float = DEFAULT_HEADROOM,
    model_store_bytes: int = 0,
) -> MemorySizing:
    """The ``maxmemory`` (bytes) of a Redis memory of ``capacity`` steps and a model store of ``model_store_bytes``;
    ValueError names a bad argument."""
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1 step, not {capacity}")
    if chunk_length < 1:
        raise ValueError(f"chunk_length must be at least 1 step, not {chunk_length}")
    if not (math.isfinite(bytes_per_step) and bytes_per_step > 0):
        raise ValueError(f"bytes_per_step must be a positive number, not {bytes_per_step}")
    if not (math.isfinite(headroom) and headroom >= 0):
        raise ValueError(f"headroom must be a fraction >= 0, not {headroom}")
    if model_store_bytes < 0:
        raise ValueError(f"model_store_bytes must be >= 0, not {model_store_bytes}")
    chunks = max(1, -(-capacity // chunk_length))
    chunk = math.ceil(chunk_length * bytes_per_step) + PER_CHUNK_OVERHEAD
    data = chunks * chunk
    maxmemory = math.ceil(data * (1 + headroom)) + BASE_BYTES + model_store_bytes
    return MemorySizing(
        capacity=capacity,
        chunk_length=chunk_length,
        bytes_per_step=bytes_per_step,
        headroom=headroom,
        chunks=chunks,
        chunk_bytes=chunk,
        data_bytes=data,
        model_store_bytes=model_store_bytes,
        maxmemory=maxmemory,
    )


# An agent pod's memory besides its replica: torch, the envs, batches in flight and the run's files (agent processes
# on CPU stay under 2 GiB); with a GPU, CUDA's context and pinned buffers on the host besides.
AGENT_BASE_BYTES = 2 << 30
AGENT_BASE_BYTES_GPU = 6 << 30


def replica_bytes(capacity: int, frame_shape: tuple[int, ...], frame_dtype: str = "|u1", *, prioritized: bool = True,
                  recurrent_hidden: int | None = None) -> int:
    """What an agent's replica of a log of ``capacity`` steps takes: the embedded memory's own layout (frames,
    per-step metadata, sum tree, sequence starts)."""
    from borgdqn.memory.hive_limits import MAX_REPLICA_STREAMS
    from borgdqn.memory.shared.layout import Layout, SegmentParams
    from borgdqn.memory.shared.segment import MAX_CLIENTS, default_sequences

    params = SegmentParams(
        capacity=capacity, frame_shape=tuple(frame_shape), frame_dtype=frame_dtype, prioritized=prioritized,
        alpha=0.6, priority_eps=1e-6, recurrent_hidden=recurrent_hidden, max_streams=MAX_REPLICA_STREAMS,
        max_agents=1024, max_sequences=default_sequences(capacity), max_clients=MAX_CLIENTS)
    return Layout.build(params).nbytes


def agent_pod_bytes(capacity: int, frame_shape: tuple[int, ...], frame_dtype: str = "|u1", *,
                    prioritized: bool = True, recurrent_hidden: int | None = None, gpu: bool = True) -> int:
    """The memory an agent pod needs: its replica plus the agent's own (``AGENT_BASE_BYTES[_GPU]``), rounded up to
    a whole GiB."""
    need = replica_bytes(capacity, frame_shape, frame_dtype, prioritized=prioritized,
                         recurrent_hidden=recurrent_hidden) + (AGENT_BASE_BYTES_GPU if gpu else AGENT_BASE_BYTES)
    return -(-need // (1 << 30)) << 30
