"""The embedded replay memory: one ring of steps that N agent processes write to and sample from at once.

Layout (``layout.py``): a single POSIX shared-memory segment holds a ring of C step slots, each with the step's
single newest frame and a few bytes of metadata (~37 B: sequence number, links, action, reward, flags, agent id)
plus, when prioritized, its sum-tree leaf (~8.1 B). Nothing is stored twice: frame stacks and n-step windows are
rebuilt at sample time by following links, so one step costs ~7100 B with Pong frames (7056 B). How a chunk is
checked: ``chunk_input.py``; written: ``ring_writer.py``; sampled, and its priorities taken back:
``ring_sampler.py``; saved and restored: ``checkpoint.py``.

Sharing: the owner calls ``create`` and sends ``handle()`` to child processes as a ``Process`` argument (the
lock inside pickles only while a process is being started), where ``attach(handle, seed, spec)`` maps the segment.
A private memory (``create(..., private=True)``: an agent's replica of the Redis log, shared by its threads only)
lives in anonymous memory instead, with huge pages where the kernel allows. Each process gives its learner's
``SamplingSpec`` (n-step, gamma, stack, sequence length) once, at ``create`` or ``attach``. The owner unlinks the
segment with ``unlink()``, at normal interpreter exit, or - after a crash - through multiprocessing's resource
tracker.
"""

from __future__ import annotations

import _posixshmem
import logging
import mmap
import multiprocessing as mp
import os
import secrets
import threading
import weakref
from multiprocessing import resource_tracker
from multiprocessing.synchronize import Lock as ProcessLock
from pathlib import Path
from typing import Any

import numpy as np

from borgdqn.memory.protocol import MemoryStats, SamplingSpec, SequenceBatch, TrajectoryChunk, TransitionBatch
from borgdqn.memory.shared.checkpoint import restore_ring, save_ring
from borgdqn.memory.shared.chunk_input import prepare_chunk
from borgdqn.memory.shared.layout import (
    EMPTY,
    F_MAX_PRIORITY,
    H_CLIENTS,
    H_INSERTED,
    H_MAGIC,
    H_REJECTED,
    H_SIZE,
    H_VERSION,
    MAGIC,
    VERSION,
    Layout,
    SegmentParams,
)
from borgdqn.memory.shared.ring_sampler import RingSampler
from borgdqn.memory.shared.ring_writer import RingWriter
from borgdqn.memory.shared.segment import (
    MAX_CLIENTS,
    Arrays,
    HeldLock,
    SharedReplayHandle,
    ThreadLock,
    check_room,
    default_sequences,
    segment_name,
    unlink_segment,
)

log = logging.getLogger(__name__)


class SharedReplay:
    """Replay memory in shared memory for the processes of one machine; implements ``ReplayMemory``."""

    def __init__(
        self, mm: mmap.mmap, name: str, params: SegmentParams, lock: ProcessLock | ThreadLock, *, owner: bool, seed: int
    ) -> None:
        self._mm = mm
        self._name = name
        self._params = params
        self._lock = lock
        self._locked = HeldLock(lock)
        self._layout = Layout.build(params)
        self._x = Arrays(self._layout.views(mm), params)
        self._capacity = params.capacity
        self._writer = RingWriter(self._x, params, self._locked)
        self._sampler = RingSampler(self._x, params, self._locked, seed)
        self._closed = False
        self._rejections_logged = 0
        self._finalizer = weakref.finalize(self, unlink_segment, name, os.getpid()) if owner else None
        # How this process's learner samples (its own: each process that attaches gives its spec).
        self.spec: SamplingSpec | None = None

    # ------------------------------------------------------------------------------------------ lifecycle
    @classmethod
    def create(
        cls,
        capacity: int,
        frame_shape: tuple[int, ...],
        frame_dtype: Any,
        *,
        prioritized: bool,
        alpha: float,
        priority_eps: float,
        recurrent_hidden: int | None = None,
        max_streams: int = 4096,
        seed: int = 0,
        name: str | None = None,
        max_agents: int = 1024,
        max_sequences: int | None = None,
        private: bool = False,
        spec: SamplingSpec | None = None,
    ) -> SharedReplay:
        """Allocate a memory of ``capacity`` steps (the caller owns it and unlinks it at the end).

        ``max_streams``: distinct streams linked at once (older, evicted streams free their entry);
        ``max_agents``: agent ids must lie in ``[0, max_agents)``; ``max_sequences``: sequence starts kept
        (default capacity // 16, enough for chunks of 16 steps or more). ``private``: anonymous memory of this
        process alone (an agent's replica of the Redis log, whose threads share it): nothing in ``/dev/shm``,
        whose size a container caps, and no ``handle``. ``spec``: how this process samples.
        """
        shape = tuple(int(d) for d in frame_shape)
        if capacity < 1 or not shape or min(shape) < 1:
            raise ValueError(f"capacity and frame dimensions must be >= 1, got {capacity} and {frame_shape}")
        if alpha < 0 or priority_eps <= 0:
            raise ValueError(f"alpha must be >= 0 and priority_eps > 0, got {alpha} and {priority_eps}")
        if recurrent_hidden is not None and recurrent_hidden < 1:
            raise ValueError(f"recurrent_hidden must be >= 1, got {recurrent_hidden}")
        if max_streams < 1 or max_agents < 1:
            raise ValueError("max_streams and max_agents must be >= 1")
        sequences = default_sequences(capacity) if max_sequences is None else max_sequences
        if sequences < 1:
            raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
        params = SegmentParams(
            capacity=int(capacity),
            frame_shape=shape,
            frame_dtype=np.dtype(frame_dtype).str,
            prioritized=bool(prioritized),
            alpha=float(alpha),
            priority_eps=float(priority_eps),
            recurrent_hidden=None if recurrent_hidden is None else int(recurrent_hidden),
            max_streams=int(max_streams),
            max_agents=int(max_agents),
            max_sequences=int(sequences),
            max_clients=MAX_CLIENTS,
        )
        layout = Layout.build(params)
        if private:
            mm = mmap.mmap(-1, layout.nbytes)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                # Huge pages where the kernel allows them: a fresh replica takes its frames in 512x fewer page
                # faults, and random draws over gigabytes of frames miss the TLB far less.
                mm.madvise(mmap.MADV_HUGEPAGE)
            memory = cls(mm, "", params, threading.Lock(), owner=False, seed=seed)
            memory._initialise()
            memory.spec = spec
            return memory
        check_room(layout.nbytes)
        seg = segment_name(name or f"borgdqn-replay-{os.getpid()}-{secrets.token_hex(4)}")
        fd = _posixshmem.shm_open(seg, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            os.ftruncate(fd, layout.nbytes)
            mm = mmap.mmap(fd, layout.nbytes)
        except BaseException:
            _posixshmem.shm_unlink(seg)
            raise
        finally:
            os.close(fd)
        # The tracker unlinks the segment if this process dies without unlink(); unlink() unregisters it.
        resource_tracker.register(seg, "shared_memory")
        memory = cls(mm, seg, params, mp.get_context("spawn").Lock(), owner=True, seed=seed)
        memory._initialise()
        memory.spec = spec
        log.debug("replay created name=%s bytes=%d capacity=%d", seg, layout.nbytes, capacity)
        return memory

    def _initialise(self) -> None:
        x = self._x
        x.header[H_MAGIC] = MAGIC
        x.header[H_VERSION] = VERSION
        x.headerf[F_MAX_PRIORITY] = 1.0
        x.seq[:] = EMPTY
        x.prev[:] = -1
        x.next[:] = -1
        x.stream_keys[:] = -1
        x.side_id[:] = -1
        x.side_seq[:] = EMPTY
        x.header[H_CLIENTS] = 1
        self._sampler.client = 0

    def handle(self) -> SharedReplayHandle:
        """A small picklable object for ``attach`` in a child process (pass it as a ``Process`` argument)."""
        if not self._name or isinstance(self._lock, ThreadLock):
            raise TypeError("a private memory cannot be attached by another process")
        return SharedReplayHandle(self._name, self._params, self._lock)

    @classmethod
    def attach(cls, handle: SharedReplayHandle, seed: int, spec: SamplingSpec | None = None) -> SharedReplay:
        """Map the memory described by ``handle`` (made by ``create`` in another process); ``spec``: how this
        process samples."""
        layout = Layout.build(handle.params)
        try:
            fd = _posixshmem.shm_open(handle.name, os.O_RDWR, mode=0o600)
        except FileNotFoundError:
            raise FileNotFoundError(f"replay memory {handle.name} does not exist (its owner unlinked it?)") from None
        try:
            if os.fstat(fd).st_size < layout.nbytes:
                raise ValueError(f"shared memory {handle.name} is smaller than its layout")
            mm = mmap.mmap(fd, layout.nbytes)
        finally:
            os.close(fd)
        memory = cls(mm, handle.name, handle.params, handle.lock, owner=False, seed=seed)
        memory.spec = spec
        header = memory._x.header
        if header[H_MAGIC] != MAGIC or header[H_VERSION] != VERSION:
            memory.close()
            raise ValueError(f"shared memory {handle.name} does not hold a borgdqn replay of version {VERSION}")
        with memory._locked:
            memory._sampler.client = min(int(header[H_CLIENTS]), MAX_CLIENTS - 1)
            header[H_CLIENTS] += 1
        return memory

    def close(self) -> None:
        """Unmap this process's view (the data stays for the others); the owner also calls ``unlink``."""
        if self._closed:
            return
        self._closed = True
        del self._x, self._writer, self._sampler
        try:
            self._mm.close()
        except BufferError:
            # Someone still holds a view (only possible through private attributes): let GC unmap it later.
            log.debug("replay %s: mapping still referenced at close", self._name)

    def unlink(self) -> None:
        """Free the segment (owner, at the end): attached processes keep their mapping until they close."""
        if self._finalizer is not None:
            self._finalizer()
        elif self._name:
            unlink_segment(self._name)

    def __getstate__(self) -> Any:
        raise TypeError("SharedReplay does not pickle: send memory.handle() and call SharedReplay.attach(handle)")

    @property
    def name(self) -> str:
        return self._name

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def nbytes(self) -> int:
        """Size of the shared segment (everything the memory stores, for all agents)."""
        return self._layout.nbytes

    def bytes_per_step(self) -> float:
        return self._layout.nbytes / self._capacity

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("replay memory is closed")

    # ------------------------------------------------------------------------------------------ writing
    def add(self, chunk: TrajectoryChunk, *, continues: bool = True) -> None:
        """Store ``chunk``; ``continues=False`` starts its stream anew: nothing links it to the stream's earlier
        steps (a replica does this after a gap in the log, so that no stack or n-step window spans the gap)."""
        self._check_open()
        try:
            prepared = prepare_chunk(chunk, self._params)
        except Exception as err:  # hostile input of any shape: count it, never let it reach the pool
            self._reject(chunk, err)
            return
        self._writer.write(prepared, continues)

    def _reject(self, chunk: Any, err: Exception) -> None:
        with self._locked:
            self._x.header[H_REJECTED] += 1
        self._rejections_logged += 1
        n = self._rejections_logged
        if n <= 10 or n % 1000 == 0:
            log.warning(
                "replay rejected chunk stream=%s agent=%s reason=%s rejected_here=%d",
                getattr(chunk, "stream_id", "?"), getattr(chunk, "agent_id", "?"), err, n,
            )  # fmt: skip

    # ------------------------------------------------------------------------------------------ reading
    def sample(self, batch_size: int, beta: float) -> TransitionBatch:
        self._check_open()
        return self._sampler.sample(batch_size, beta, self._sampling_spec())

    def sample_sequences(self, batch_size: int, beta: float) -> SequenceBatch:
        """Sequences of the spec's ``sequence_length`` steps from stored sequence starts (``ring_sampler``)."""
        self._check_open()
        return self._sampler.sample_sequences(batch_size, beta, self._sampling_spec())

    def _sampling_spec(self) -> SamplingSpec:
        if self.spec is None:
            raise RuntimeError("this memory was opened without a SamplingSpec: give one to create or attach")
        return self.spec

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        """Set priorities (e.g. |TD error|) of sampled keys; keys evicted or rewritten since are ignored."""
        self._check_open()
        self._sampler.update_priorities(keys, priorities)

    # ------------------------------------------------------------------------------------------ stats
    def stats(self) -> MemoryStats:
        self._check_open()
        x = self._x
        with self._locked:
            header = x.header.copy()
            counts = x.agent_counts.copy()
            sampled = int(x.sampled.sum())
        return MemoryStats(
            size=int(header[H_SIZE]),
            capacity=self._capacity,
            inserted=int(header[H_INSERTED]),
            sampled=sampled,
            rejected=int(header[H_REJECTED]),
            per_agent={int(a): int(counts[a]) for a in np.flatnonzero(counts)},
        )

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, path: Path) -> None:
        """Write the memory's contents to an ``.npz`` file while the hive keeps running.

        Slots rewritten during the copy are detected by their seq (as samplers do) and saved as empty.
        """
        self._check_open()
        save_ring(self._x, self._params, self._locked, path)

    def restore(self, path: Path) -> None:
        """Load a ``save``d memory into this (new, empty) one of the same parameters."""
        self._check_open()
        restore_ring(self._x, self._params, self._locked, path)
