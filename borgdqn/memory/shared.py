"""The embedded replay backend: one shared-memory ring that N agent processes write to and sample from at once.

Layout (see ``layout.py``): a single POSIX shared-memory segment holds a ring of C step slots, each with the
step's single newest frame and a few bytes of metadata (~37 B: sequence number, links, action, reward, flags,
agent id) plus, when prioritized, its sum-tree leaf (~8.1 B). Nothing is stored twice: frame stacks and n-step
windows are rebuilt at sample time by following links, so one step costs ~7100 B with Pong frames (7056 B).

Writing. Every step gets a global monotonic sequence number ``seq`` (slot = seq % C; a sampled step's age is the
number of seqs handed out after its own). ``add(chunk)`` takes the lock twice, briefly: to *reserve* ``len(chunk)``
consecutive seqs at the head (evicting the oldest steps: their per-agent counts drop and their slots are marked
WRITING) and to *publish* them (slots get their seqs, counts and priorities are set, the stream's previous chunk is
linked forward). The copy of frames and metadata happens between the two, outside the lock, so writers copy in
parallel. Each slot stores ``prev``/``next``: the seq of the neighbouring step of the same stream (seq-1/seq+1
inside a chunk; across chunks, a per-stream table of the stream's last seq - an open-addressing hash table in the
segment, so stream ids may be any non-negative ints). A link is valid only while the target slot still holds that
seq. A writer that would lap a slot still being written by another (possible only when C is tiny) waits for it
instead of interleaving the two copies.

Reading, without the lock. A writer marks its slots WRITING (under the lock, so behind a full fence) before it
touches them and publishes their seqs only once the whole chunk is copied; links only lead to published steps or
to steps of the same chunk. A sampler follows the links of all B candidates at once, keeps the windows whose
slots hold the seqs it expects and whose steps obey the episode rules, copies, then checks the seqs again. With
x86's ordered stores and loads, a row whose seqs did not change read untorn data; torn rows are replaced by
fresh draws, so a batch is always full and valid. Stacks go back ``stack-1`` links within the episode and repeat
the episode's first frame before it (as ``FrameStacker`` does); n-step windows go forward up to n links and stop
at a ``last`` step. A start needs the stream's data up to ``t+m``: the newest steps of a stream wait for their
successors. The oldest 1/32 of the ring (at most 4096 slots) is not drawn from: it is about to be overwritten.

Priorities (``prioritized=True``): a 64-ary sum tree (``sumtree.py``) over the C slots stores ``p ** alpha``;
new steps get the largest priority seen so far, ``last`` steps 0. Draws are stratified over the prefix sums.
Importance weights are ``(N * P(i)) ** -beta`` normalised by the batch's largest weight, with N the number of
stored steps. Keys are seqs, so ``update_priorities`` recognises keys whose slot was overwritten since (stale).

Sequences (LSTM): a chunk that carries ``recurrent_state`` marks its first step as a sequence start; the state
goes into a side ring of ``max_sequences`` entries (not per step) with its own sum tree: a sequence has its own
priority (initially the max, then whatever the learner sends back for the sequence's key), as in R2D2. A
sequence runs ``length`` steps along the links; steps after the episode's last step, and steps the stream has
not written yet, are padding (mask False, zeros).

Sharing: the owner calls ``create`` and sends ``handle()`` to child processes as a ``Process`` argument (the
lock inside pickles only while a process is being started), where ``attach(handle, seed, spec)`` maps the segment.
A private memory (``create(..., private=True)``: an agent's replica of the Redis log, shared by its threads only)
lives in anonymous memory instead, with huge pages where the kernel allows. Each process gives its learner's
``SamplingSpec`` (n-step, gamma, stack, sequence length) once, at ``create`` or ``attach``.
The owner unlinks the segment with ``unlink()``, at normal interpreter exit, or - after a crash - through
multiprocessing's resource tracker. The lock is held only for bookkeeping (tens of microseconds, never for a
copy); a lock not released within a minute means its holder died, and raises instead of hanging the hive.

Returned batches are new arrays owned by the caller; the big frame arrays come from a small per-process pool
that only recycles buffers nobody references any more (allocating ~1 MB per batch costs more in page faults
than copying the frames).
"""

from __future__ import annotations

import _posixshmem
import _thread
import functools
import logging
import mmap
import multiprocessing as mp
import os
import secrets
import sys
import threading
import time
import weakref
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.synchronize import Lock as ProcessLock
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from borgdqn.memory.layout import (
    EMPTY,
    F_MAX_PRIORITY,
    H_CLIENTS,
    H_HEAD,
    H_INSERTED,
    H_MAGIC,
    H_REJECTED,
    H_SIDE_HEAD,
    H_SIDE_TAIL,
    H_SIZE,
    H_VERSION,
    MAGIC,
    VERSION,
    WRITING,
    Layout,
    SegmentParams,
)
from borgdqn.memory.protocol import (
    MemoryNotReady,
    MemoryStats,
    SamplingSpec,
    SequenceBatch,
    TrajectoryChunk,
    TransitionBatch,
)
from borgdqn.memory.sampling_rules import (
    FIRST,
    LAST,
    SEQUENCE_KEY,
    TERMINATED,
    check_batch_args,
    gamma_tables,
    importance_weights,
    window,
)
from borgdqn.memory.sumtree import SumTree

log = logging.getLogger(__name__)

MAX_CLIENTS = 1024
_MAX_ROUNDS = 24  # draw rounds before giving up: only a memory with (almost) nothing to sample gets there
_POOL_SIZE = 8  # recycled output buffers per process (a few batches' obs and next_obs)
_LAP_WAIT_S = 30.0  # a writer lapped by another for this long is presumed dead
_LOCK_TIMEOUT_S = 60.0  # held this long, the lock's holder died holding it: fail loudly instead of hanging
_INT32 = np.iinfo(np.int32)

_Rows = dict[str, np.ndarray]  # per-row arrays of a batch being assembled
_ThreadLock = _thread.LockType  # a private memory's lock: its threads share it, no other process does


@dataclass(frozen=True)
class SharedReplayHandle:
    """What a child process needs to attach: the segment's name, its layout parameters and the lock."""

    name: str
    params: SegmentParams
    lock: ProcessLock


class _Held:
    """``with`` for the shared lock, with a timeout: a process killed inside it would otherwise hang the hive."""

    def __init__(self, lock: ProcessLock | _ThreadLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        if not self._lock.acquire(timeout=_LOCK_TIMEOUT_S):
            raise RuntimeError(
                f"replay memory lock not free after {_LOCK_TIMEOUT_S:.0f}s: a process died while holding it; "
                "restart the hive"
            )

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class _Prepared(NamedTuple):
    length: int
    stream: int
    agent: int
    frames: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    flags: np.ndarray
    state: np.ndarray | None


class _Arrays:
    """Numpy views of the segment; dropped as a whole on close so that the mapping can be released."""

    def __init__(self, views: dict[str, np.ndarray], p: SegmentParams) -> None:
        self.header = views["header"]
        self.headerf = views["headerf"]
        self.sampled = views["sampled"]
        self.agent_counts = views["agent_counts"]
        self.stream_keys = views["stream_keys"]
        self.stream_last = views["stream_last"]
        self.seq = views["seq"]
        self.prev = views["prev"]
        self.next = views["next"]
        self.actions = views["actions"]
        self.agents = views["agents"]
        self.rewards = views["rewards"]
        self.flags = views["flags"]
        self.frames = views["frames"]
        empty = np.zeros(0, dtype=np.int64)
        self.side_id = views.get("side_id", empty)
        self.side_seq = views.get("side_seq", empty)
        self.side_state = views.get("side_state", np.zeros((0, 2, 0), dtype=np.float32))
        self.tree = SumTree(views["tree"], p.capacity) if "tree" in views else None
        self.side_tree = SumTree(views["side_tree"], p.max_sequences) if "side_tree" in views else None


@functools.lru_cache(maxsize=64)
def _aranges(k: int) -> np.ndarray:
    """``0.0 .. k-1`` (read-only, shared): the strata of ``k`` stratified draws."""
    out = np.arange(k, dtype=np.float64)
    out.flags.writeable = False
    return out


def default_sequences(capacity: int) -> int:
    """Sequence starts a memory keeps unless told: enough for chunks of 16 steps or more."""
    return max(16, -(-capacity // 16))


def _segment_name(name: str) -> str:
    return name if name.startswith("/") else "/" + name


def _unlink_segment(name: str, owner_pid: int | None = None) -> None:
    if owner_pid is not None and os.getpid() != owner_pid:
        return  # a forked copy of the owner exiting must not free the hive's memory
    try:
        _posixshmem.shm_unlink(name)
    except FileNotFoundError:
        return
    resource_tracker.unregister(name, "shared_memory")


def _segments(start: int, count: int, capacity: int) -> list[tuple[int, int, int]]:
    """(slot, offset in chunk, length) runs of ``count`` slots from ``start``; two runs when the ring wraps."""
    if start + count <= capacity:
        return [(start, 0, count)]
    first = capacity - start
    return [(start, 0, first), (0, first, count - first)]


def _as_int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{what} must be an integer, got {type(value).__name__}")
    if not lo <= int(value) < hi:
        raise ValueError(f"{what} {int(value)} outside [{lo}, {hi})")
    return int(value)


def _as_flags(value: Any, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind in "iu" and np.all((arr == 0) | (arr == 1)):
        return arr.astype(bool)
    raise ValueError(f"{what} must be bool, got {arr.dtype}")


class SharedReplay:
    """Replay memory in shared memory for the processes of one machine; implements ``ReplayMemory``."""

    def __init__(
        self, mm: mmap.mmap, name: str, params: SegmentParams, lock: ProcessLock | _ThreadLock, *, owner: bool,
        seed: int
    ) -> None:
        self._mm = mm
        self._name = name
        self._params = params
        self._lock = lock
        self._locked = _Held(lock)
        self._layout = Layout.build(params)
        self._x = _Arrays(self._layout.views(mm), params)
        self._capacity = params.capacity
        self._frame_shape = tuple(params.frame_shape)
        self._frame_dtype = np.dtype(params.frame_dtype)
        self._rng = np.random.default_rng(seed)
        self._closed = False
        self._rejections_logged = 0
        self._client = -1
        self._pool: list[np.ndarray] = []
        self._pool_lock = threading.Lock()  # threads of one process may sample through one instance
        self._finalizer = weakref.finalize(self, _unlink_segment, name, os.getpid()) if owner else None
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
        seg = _segment_name(name or f"borgdqn-replay-{os.getpid()}-{secrets.token_hex(4)}")
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
        self._client = 0

    def handle(self) -> SharedReplayHandle:
        """A small picklable object for ``attach`` in a child process (pass it as a ``Process`` argument)."""
        if not self._name or isinstance(self._lock, _ThreadLock):
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
            memory._client = min(int(header[H_CLIENTS]), MAX_CLIENTS - 1)
            header[H_CLIENTS] += 1
        return memory

    def close(self) -> None:
        """Unmap this process's view (the data stays for the others); the owner also calls ``unlink``."""
        if self._closed:
            return
        self._closed = True
        del self._x
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
            _unlink_segment(self._name)

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
            prepared = self._prepare(chunk)
        except Exception as err:  # hostile input of any shape: count it, never let it reach the pool
            self._reject(chunk, err)
            return
        self._write(prepared, continues)

    def _prepare(self, chunk: TrajectoryChunk) -> _Prepared:
        chunk.validate(self._frame_shape, self._frame_dtype)
        t = len(chunk)
        if t > self._capacity:
            raise ValueError(f"chunk of {t} steps does not fit in a memory of {self._capacity}")
        stream = _as_int(chunk.stream_id, "stream_id", 0, SEQUENCE_KEY)
        agent = _as_int(chunk.agent_id, "agent_id", 0, self._params.max_agents)
        actions = np.asarray(chunk.actions)
        if actions.dtype.kind not in "iu":
            raise ValueError(f"actions must be integers, got {actions.dtype}")
        actions32 = actions.astype(np.int32)
        # The cast is exact iff every action fits: one comparison instead of min and max (uint64 against
        # int32 would compare as float64, so that type keeps the explicit bound).
        if (actions.max() > _INT32.max) if actions.dtype == np.uint64 else (actions32 != actions).any():
            raise ValueError("action outside the int32 range")
        rewards = np.asarray(chunk.rewards)
        if rewards.dtype.kind != "f":
            raise ValueError(f"rewards must be floats, got {rewards.dtype}")
        rewards32 = rewards.astype(np.float32)
        # validate() saw finite rewards; only a wider float can overflow on the way to float32.
        if rewards.dtype.itemsize > 4 and not np.isfinite(rewards32).all():
            raise ValueError("reward does not fit float32")
        first = _as_flags(chunk.first, "first")
        last = _as_flags(chunk.last, "last")
        terminated = _as_flags(chunk.terminated, "terminated")
        # Records follow dm_env: the step after a last step is the first of the next episode, nothing else.
        if (first[1:] != last[:-1]).any():
            raise ValueError("a step starts an episode iff the step before it is last")
        if self._frame_dtype.kind == "f" and not np.isfinite(chunk.frames).all():
            raise ValueError("non-finite frame values")
        state = None
        if chunk.recurrent_state is not None:
            hidden = self._params.recurrent_hidden
            if hidden is None:
                raise ValueError("chunk carries a recurrent_state but the memory has no recurrent_hidden")
            state = np.asarray(chunk.recurrent_state)
            if state.shape != (2, hidden) or state.dtype.kind != "f" or not np.isfinite(state).all():
                raise ValueError(f"recurrent_state must be finite floats of shape (2, {hidden}), got {state.shape}")
        # Each flag shifted into its bit directly in uint8 (fewer, smaller temporaries than bool * int).
        flags = np.left_shift(last, LAST.bit_length() - 1, dtype=np.uint8)
        flags |= np.left_shift(terminated, TERMINATED.bit_length() - 1, dtype=np.uint8)
        flags |= np.left_shift(first, FIRST.bit_length() - 1, dtype=np.uint8)
        return _Prepared(t, stream, agent, chunk.frames, actions32, rewards32, flags, state)

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

    def _write(self, p: _Prepared, continues: bool = True) -> None:
        x, c, t = self._x, self._capacity, p.length
        s0, prev_last, entry = self._reserve(p)
        if not continues:
            prev_last = -1
        runs = _segments(s0 % c, t, c)
        for slot, i, n in runs:
            x.frames[slot : slot + n] = p.frames[i : i + n]
            x.actions[slot : slot + n] = p.actions[i : i + n]
            x.rewards[slot : slot + n] = p.rewards[i : i + n]
            x.flags[slot : slot + n] = p.flags[i : i + n]
            x.agents[slot : slot + n] = p.agent
            x.prev[slot : slot + n] = np.arange(s0 + i - 1, s0 + i + n - 1)
            x.next[slot : slot + n] = np.arange(s0 + i + 1, s0 + i + n + 1)
        x.prev[s0 % c] = prev_last
        x.next[(s0 + t - 1) % c] = -1
        if entry >= 0 and p.state is not None:
            x.side_state[entry % self._params.max_sequences] = p.state
        tree_values: list[np.ndarray] = []
        if x.tree is not None:
            top = x.headerf[F_MAX_PRIORITY] ** self._params.alpha
            tree_values = [np.where(p.flags[i : i + n] & LAST, 0.0, top) for _, i, n in runs]
        with self._locked:
            for slot, i, n in runs:
                x.seq[slot : slot + n] = np.arange(s0 + i, s0 + i + n)
            x.agent_counts[p.agent] += t
            x.header[H_SIZE] += t
            x.header[H_INSERTED] += t
            if prev_last >= 0 and x.seq[prev_last % c] == prev_last:
                x.next[prev_last % c] = s0
            if x.tree is not None:
                for (slot, _, _), values in zip(runs, tree_values, strict=True):
                    x.tree.set_range(slot, values)
            if entry >= 0:
                r = entry % self._params.max_sequences
                if x.side_id[r] == entry:
                    x.side_seq[r] = s0
                    if x.side_tree is not None:
                        x.side_tree.set(np.array([r]), x.headerf[F_MAX_PRIORITY] ** self._params.alpha)

    def _reserve(self, p: _Prepared) -> tuple[int, int, int]:
        """Under the lock: hand out seqs, evict what they overwrite; returns (first seq, link, side entry)."""
        x, c, t = self._x, self._capacity, p.length
        waiting_since: float | None = None
        while True:
            with self._locked:
                s0 = int(x.header[H_HEAD])
                runs = _segments(s0 % c, t, c)
                # A slot holds a seq (>= 0), EMPTY or WRITING, the smallest: one min per run tells whether a
                # writer is still copying there (lapped) and whether every slot holds a step to evict.
                lows = [int(x.seq[slot : slot + n].min()) for slot, _, n in runs]
                lapped = min(lows) == WRITING
                if lapped and waiting_since is not None and time.monotonic() - waiting_since > _LAP_WAIT_S:
                    log.error("replay: a writer has not finished its chunk for %.0fs; taking its slots", _LAP_WAIT_S)
                    lapped = False
                if not lapped:
                    for (slot, _, n), low in zip(runs, lows, strict=True):
                        old = x.seq[slot : slot + n]
                        if low >= 0:  # a full ring: every slot holds a step
                            np.subtract.at(x.agent_counts, x.agents[slot : slot + n], 1)
                            x.header[H_SIZE] -= n
                        else:
                            alive = old >= 0
                            evicted = int(alive.sum())
                            if evicted:
                                np.subtract.at(x.agent_counts, x.agents[slot : slot + n][alive], 1)
                                x.header[H_SIZE] -= evicted
                        old[:] = WRITING
                    x.header[H_HEAD] = s0 + t
                    prev_last = self._stream_swap(p.stream, s0 + t - 1, s0 + t - c)
                    entry = self._reserve_entry(s0 + t - c, p.state is not None)
                    return s0, prev_last, entry
            # Only a ring smaller than the writes in flight gets here: let the lapped writer finish.
            if waiting_since is None:
                waiting_since = time.monotonic()
            time.sleep(0.0005)

    def _stream_swap(self, stream: int, last: int, oldest_live: int) -> int:
        """Record ``last`` as the stream's newest seq; return its previous newest seq (-1 if none)."""
        keys, lasts = self._x.stream_keys, self._x.stream_last
        mask = keys.shape[0] - 1
        i = ((stream * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) >> (64 - mask.bit_length())
        free = -1
        for _ in range(keys.shape[0]):
            key = int(keys[i])
            if key == stream:
                previous = int(lasts[i])
                lasts[i] = last
                return previous
            if key == -1:
                if free < 0:
                    free = i
                break
            # An entry whose stream wrote nothing still stored is reusable; it stays non-empty so that
            # probe chains through it stay intact.
            if free < 0 and lasts[i] < oldest_live:
                free = i
            i = (i + 1) & mask
        if free < 0:
            log.warning("replay: more than %d live streams; chunk of stream %d stored unlinked", mask + 1, stream)
            return -1
        keys[free] = stream
        lasts[free] = last
        return -1

    def _reserve_entry(self, oldest_live: int, wanted: bool) -> int:
        """Retire sequence starts that were evicted; allocate a new entry if ``wanted`` (else -1)."""
        x = self._x
        r_max = self._params.max_sequences
        if self._params.recurrent_hidden is None:
            return -1
        head, tail = int(x.header[H_SIDE_HEAD]), max(int(x.header[H_SIDE_TAIL]), int(x.header[H_SIDE_HEAD]) - r_max)
        while tail < head:
            r = tail % r_max
            if x.side_id[r] == tail:
                start = int(x.side_seq[r])
                if start == WRITING or start >= oldest_live:
                    break
                if x.side_tree is not None:
                    x.side_tree.set(np.array([r]), 0.0)
            tail += 1
        entry = -1
        if wanted:
            entry = head
            r = entry % r_max
            x.side_id[r] = entry
            x.side_seq[r] = WRITING
            if x.side_tree is not None:
                x.side_tree.set(np.array([r]), 0.0)
            head += 1
            tail = max(tail, head - r_max)
        x.header[H_SIDE_HEAD] = head
        x.header[H_SIDE_TAIL] = tail
        return entry

    # ------------------------------------------------------------------------------------------ reading
    def _oldest_drawable(self, head: int) -> int:
        c = self._capacity
        if head <= c:
            return 0
        return head - c + min(c // 32, 4096)

    def _window(
        self, starts: np.ndarray, back: int, ahead: int, strict: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        x = self._x
        return window(x.prev, x.next, x.seq, x.flags, starts, back, ahead, strict)

    def _draw_steps(self, k: int, stratified: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``k`` candidate start seqs, their sampling probabilities (1 when uniform) and which draws are usable.

        Rows are not filtered here: the caller validates the windows of all ``k`` and filters once.
        """
        x = self._x
        head = int(x.header[H_HEAD])
        lo = self._oldest_drawable(head)
        if x.tree is None:
            if head <= lo:
                return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, bool)
            seqs = self._rng.integers(lo, head, size=k)
            return seqs, np.ones(k), x.seq.take(seqs, mode="wrap") == seqs
        total = x.tree.total()
        if total <= 0.0:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, bool)
        if stratified:
            u = self._rng.random(k)
            u += _aranges(k)
            u /= k
        else:
            u = self._rng.random(k)
        u *= total
        slots, values = x.tree.find(u)
        seqs = x.seq[slots]
        ok = values > 0.0
        ok &= seqs >= lo
        values /= total
        return seqs, values, ok

    def _collect(self, need: int, candidates: Callable[[int, bool], tuple[_Rows, np.ndarray]], what: str) -> _Rows:
        """Exactly ``need`` rows of metadata-valid candidates, drawing as many rounds as it takes."""
        parts: list[_Rows] = []
        have = 0
        for round_ in range(_MAX_ROUNDS):
            # Draw a few spare the first time: some draws are always invalid (chunk tails, the oldest slots).
            # Later rounds grow geometrically, so that a memory with few valid starts still fills a batch.
            k = need + need // 8 + 2 if round_ == 0 else max(2 * (need - have), 16) << min(round_, 10)
            part, ok = candidates(k, round_ == 0)
            valid = ok.nonzero()[0]
            if valid.size:
                if round_ == 0 and valid.size >= need:
                    # The usual case, one round: filter and pick with one gather per array.
                    if valid.size > need:
                        valid = valid[self._pick(valid.size, need)]
                    return {key: value[valid] for key, value in part.items()}
                parts.append({key: value[valid] for key, value in part.items()})
                have += valid.size
            if have >= need:
                break
        else:
            raise MemoryNotReady(
                f"could not draw {need} valid {what} in {_MAX_ROUNDS} rounds: the memory holds "
                f"{int(self._x.header[H_SIZE])} steps but too few can start one yet (fill it more before learning)"
            )
        rows = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if have > need:
            pick = self._pick(have, need)
            rows = {k: v[pick] for k, v in rows.items()}
        return rows

    def _pick(self, have: int, need: int) -> np.ndarray:
        # A random subset of stratified draws is still unbiased; the first `need` would not be.
        pick = self._rng.permutation(have)[:need]
        pick.sort()
        return pick

    def _sample_rows(
        self,
        batch_size: int,
        candidates: Callable[[int, bool], tuple[_Rows, np.ndarray]],
        gather: Callable[[_Rows], tuple[_Rows, np.ndarray]],
        what: str,
    ) -> _Rows:
        """Gather a batch once; rows torn by a concurrent writer (rare) are replaced in place."""
        out, fresh = gather(self._collect(batch_size, candidates, what))
        if np.count_nonzero(fresh) == fresh.size:  # the common case: nothing was torn
            self._count_sampled(batch_size)
            return out
        for _ in range(_MAX_ROUNDS):
            bad = np.flatnonzero(~fresh)
            if bad.size == 0:
                self._count_sampled(batch_size)
                return out
            more, fresh_more = gather(self._collect(bad.size, candidates, what))
            for key, value in out.items():
                value[bad] = more[key]
            fresh[bad] = fresh_more
        raise RuntimeError(f"could not read {batch_size} untorn {what}: writers overwrite the memory too fast")

    def sample(self, batch_size: int, beta: float) -> TransitionBatch:
        self._check_open()
        check_batch_args(batch_size, beta)
        spec = self._sampling_spec()
        n_step, gamma, stack = spec.n_step, spec.gamma, spec.stack
        out = self._sample_rows(
            batch_size,
            lambda k, stratified: self._transition_candidates(k, stratified, n_step, stack),
            lambda rows: self._gather_transitions(rows, n_step, gamma, stack),
            "transitions",
        )
        return TransitionBatch(
            obs=out["obs"],
            actions=out["actions"],
            returns=out["returns"],
            discounts=out["discounts"],
            next_obs=out["next_obs"],
            weights=self._weights(out["probs"], beta, int(self._x.header[H_SIZE])),
            keys=out["keys"],
            agent_ids=out["agent_ids"],
            ages=out["ages"],
        )

    def _transition_candidates(self, k: int, stratified: bool, n: int, stack: int) -> tuple[_Rows, np.ndarray]:
        """``k`` draws with their window of seqs ``[t-stack+1 .. t+n]``; ok: the draw, stack and window exist."""
        seqs, probs, drawn = self._draw_steps(k, stratified)
        pos, alive, end_flags, ok = self._window(seqs, stack - 1, n, strict=True)
        ok &= drawn
        return {"pos": pos, "alive": alive, "end_flags": end_flags, "probs": probs}, ok

    def _gather_transitions(self, rows: _Rows, n: int, gamma: float, stack: int) -> tuple[_Rows, np.ndarray]:
        x = self._x
        pos, alive = rows["pos"], rows["alive"]  # seqs: the gathers below take them % capacity ("wrap")
        start = pos[:, stack - 1]
        # Usually every row has its full n steps (m = n): then masks and per-row offsets are not needed.
        full = np.count_nonzero(alive) == alive.size
        obs = self._frames_at(pos[:, :stack])
        if full:
            m = None
            next_obs = self._frames_at(pos[:, n : n + stack])
        else:
            m = alive.sum(axis=1)
            next_obs = self._frames_at(np.take_along_axis(pos, m[:, None] + np.arange(stack), axis=1))
        # Rewards of steps t .. t+n-1; those at or after the episode's last step (k >= m) are masked out.
        rewards = x.rewards.take(pos[:, stack - 1 : stack - 1 + n], mode="wrap")
        actions = x.actions.take(start, mode="wrap").astype(np.int64)
        agent_ids = x.agents.take(start, mode="wrap")
        # Last, after every read of the rows' data: a row whose slots still hold its seqs was read untorn.
        fresh = (x.seq.take(pos, mode="wrap") == pos).all(axis=1)
        # Seqs are the hive's insertion counter: the steps added after a start are the seqs handed out since.
        ages = int(x.header[H_HEAD]) - 1 - start
        powers, discount_of = gamma_tables(gamma, n)
        out = {
            "obs": obs,
            "next_obs": next_obs,
            "actions": actions,
            # Multiplying by an all-true mask changes no bit: skipping it gives the same returns.
            "returns": (rewards if full else rewards * alive) @ powers[:n],
            "discounts": discount_of[n if m is None else m, rows["end_flags"]],
            "keys": start.copy(),
            "agent_ids": agent_ids,
            "ages": ages,
            "probs": rows["probs"],
        }
        return out, fresh

    def _draw_sequences(self, k: int, stratified: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidate sequence entries: (entry ids, start seqs, probabilities; 1 when uniform)."""
        x = self._x
        r_max = self._params.max_sequences
        lo = self._oldest_drawable(int(x.header[H_HEAD]))
        none = np.zeros(0, np.int64)
        if x.side_tree is None:
            head, tail = int(x.header[H_SIDE_HEAD]), int(x.header[H_SIDE_TAIL])
            tail = max(tail, head - r_max)
            if head <= tail:
                return none, none, np.zeros(0)
            entries = self._rng.integers(tail, head, size=k)
            ok = x.side_id[entries % r_max] == entries
            starts = x.side_seq[entries % r_max]
            ok &= starts >= lo
            return entries[ok], starts[ok], np.ones(int(ok.sum()))
        total = x.side_tree.total()
        if total <= 0.0:
            return none, none, np.zeros(0)
        u = (np.arange(k) + self._rng.random(k)) / k if stratified else self._rng.random(k)
        rows, values = x.side_tree.find(u * total)
        entries = x.side_id[rows]
        starts = x.side_seq[rows]
        ok = (values > 0.0) & (entries >= 0) & (starts >= lo)
        return entries[ok], starts[ok], values[ok] / total

    def sample_sequences(self, batch_size: int, beta: float) -> SequenceBatch:
        """Sequences of the spec's ``sequence_length`` steps from stored sequence starts.

        Positions after the episode's last step, or beyond what the stream has written so far, are padding:
        mask False, zero frames, actions, rewards and flags.
        """
        self._check_open()
        if self._params.recurrent_hidden is None:
            raise RuntimeError("this memory was created without recurrent_hidden: it stores no sequences")
        check_batch_args(batch_size, beta)
        spec = self._sampling_spec()
        length, stack = spec.sequence_length, spec.stack
        if length < 1:
            raise RuntimeError(f"the sampling spec has no sequence_length: {spec}")
        out = self._sample_rows(
            batch_size,
            lambda k, stratified: self._sequence_candidates(k, stratified, length, stack),
            lambda rows: self._gather_sequences(rows, stack),
            "sequences",
        )
        head, tail = int(self._x.header[H_SIDE_HEAD]), int(self._x.header[H_SIDE_TAIL])
        live = min(head - tail, self._params.max_sequences)
        return SequenceBatch(
            frames=out["frames"],
            actions=out["actions"],
            rewards=out["rewards"],
            first=out["first"],
            last=out["last"],
            terminated=out["terminated"],
            mask=out["mask"],
            recurrent_state=out["state"],
            weights=self._weights(out["probs"], beta, live),
            keys=out["keys"],
            agent_ids=out["agent_ids"],
            ages=out["ages"],
        )

    def _sequence_candidates(self, k: int, stratified: bool, length: int, stack: int) -> tuple[_Rows, np.ndarray]:
        entries, starts, probs = self._draw_sequences(k, stratified)
        pos, alive, _, ok = self._window(starts, stack - 1, length - 1, strict=False)
        mask = np.concatenate([np.ones((entries.shape[0], 1), dtype=bool), alive], axis=1)
        return {"pos": pos, "mask": mask, "entries": entries, "starts": starts, "probs": probs}, ok

    def _gather_sequences(self, rows: _Rows, stack: int) -> tuple[_Rows, np.ndarray]:
        x, c = self._x, self._capacity
        pos, mask, entries, starts = rows["pos"], rows["mask"], rows["entries"], rows["starts"]
        side = entries % self._params.max_sequences
        slots = pos % c
        steps = slots[:, stack - 1 :]
        state = x.side_state[side]
        frames = self._frames_at(steps if stack == 1 else np.lib.stride_tricks.sliding_window_view(slots, stack, 1))
        actions = np.where(mask, x.actions[steps], 0).astype(np.int64)
        rewards = np.where(mask, x.rewards[steps], 0.0).astype(np.float32)
        flags = np.where(mask, x.flags[steps], 0)
        agent_ids = x.agents[steps[:, 0]].astype(np.int32)
        fresh = (x.seq[slots] == pos).all(axis=1) & (x.side_id[side] == entries) & (x.side_seq[side] == starts)
        ages = int(x.header[H_HEAD]) - 1 - starts  # of each sequence's first step, as for transitions
        frames[~mask] = 0
        out = {
            "frames": frames,
            "actions": actions,
            "rewards": rewards,
            "first": (flags & FIRST) != 0,
            "last": (flags & LAST) != 0,
            "terminated": (flags & TERMINATED) != 0,
            "mask": mask.copy(),
            "state": state,
            "keys": entries | SEQUENCE_KEY,
            "agent_ids": agent_ids,
            "ages": ages,
            "probs": rows["probs"],
        }
        return out, fresh

    def _sampling_spec(self) -> SamplingSpec:
        if self.spec is None:
            raise RuntimeError("this memory was opened without a SamplingSpec: give one to create or attach")
        return self.spec

    def _frames_at(self, slots: np.ndarray) -> np.ndarray:
        """``frames[slots % capacity]`` (seqs will do) into a recycled buffer: fresh ~1 MB arrays cost more in page
        faults than the copy.

        A pooled buffer is reused only when nothing outside the pool references it any more (CPython refcount:
        the caller dropped the batch, and no view or tensor of it survives), so a returned batch is never
        overwritten behind the caller's back.
        """
        shape = (*slots.shape, *self._frame_shape)
        with self._pool_lock:
            for i in range(len(self._pool)):
                # Only references: the pool's list and getrefcount's argument (no loop variable on purpose).
                if self._pool[i].shape == shape and sys.getrefcount(self._pool[i]) == 2:
                    buf = self._pool.pop(i)
                    break
            else:
                buf = np.empty(shape, dtype=self._frame_dtype)
            self._pool.append(buf)
            if len(self._pool) > _POOL_SIZE:
                del self._pool[0]
        # "wrap": seqs may be passed for slots; and unlike "raise", it copies straight into `out` (no buffer).
        self._x.frames.take(slots, axis=0, out=buf, mode="wrap")
        return buf

    def _weights(self, probs: np.ndarray, beta: float, population: int) -> np.ndarray:
        return importance_weights(probs, beta, population, prioritized=self._x.tree is not None)

    def _count_sampled(self, n: int) -> None:
        if self._client == MAX_CLIENTS - 1:  # the last counter is shared by late attachers
            with self._locked:
                self._x.sampled[self._client] += n
        else:
            self._x.sampled[self._client] += n

    # ------------------------------------------------------------------------------------------ priorities
    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        """Set priorities (e.g. |TD error|) of sampled keys; keys evicted or rewritten since are ignored."""
        self._check_open()
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        values = np.asarray(priorities, dtype=np.float64).reshape(-1)
        if keys.shape != values.shape:
            raise ValueError(f"{keys.shape[0]} keys but {values.shape[0]} priorities")
        x = self._x
        if x.tree is None:
            return
        finite = np.isfinite(values) & (keys >= 0)
        raw = np.abs(np.where(finite, values, 0.0)) + self._params.priority_eps
        leaf = raw**self._params.alpha
        is_seq = (keys & SEQUENCE_KEY) != 0
        steps, seqs = ~is_seq & finite, is_seq & finite
        c, r_max = self._capacity, self._params.max_sequences
        step_keys, step_slots = keys[steps], keys[steps] % c
        entries = keys[seqs] & ~SEQUENCE_KEY
        with self._locked:
            live = (x.seq[step_slots] == step_keys) & ((x.flags[step_slots] & LAST) == 0)
            x.tree.set(step_slots[live], leaf[steps][live])
            biggest = float(raw[steps][live].max(initial=0.0))
            if x.side_tree is not None and entries.size:
                rows = entries % r_max
                live_seq = (x.side_id[rows] == entries) & (x.side_seq[rows] >= 0)
                x.side_tree.set(rows[live_seq], leaf[seqs][live_seq])
                biggest = max(biggest, float(raw[seqs][live_seq].max(initial=0.0)))
            if biggest > x.headerf[F_MAX_PRIORITY]:
                x.headerf[F_MAX_PRIORITY] = biggest

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
    _SAVED = ("frames", "actions", "agents", "rewards", "flags", "prev", "next")

    def save(self, path: Path) -> None:
        """Write the memory's contents to an ``.npz`` file while the hive keeps running.

        Slots rewritten during the copy are detected by their seq (as samplers do) and saved as empty.
        """
        self._check_open()
        x = self._x
        before = x.seq.copy()
        with zipfile.ZipFile(Path(path), "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key in self._SAVED:
                with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, getattr(x, key))
            seq = np.where(x.seq == before, before, EMPTY)
            seq[seq < 0] = EMPTY
            with self._locked:
                small = {
                    "seq": seq,
                    "header": x.header.copy(),
                    "headerf": x.headerf.copy(),
                    "stream_keys": x.stream_keys.copy(),
                    "stream_last": x.stream_last.copy(),
                    "tree_leaves": x.tree.leaves.copy() if x.tree is not None else np.zeros(0),
                    "side_id": x.side_id.copy(),
                    "side_seq": x.side_seq.copy(),
                    "side_tree_leaves": x.side_tree.leaves.copy() if x.side_tree is not None else np.zeros(0),
                }
            small["side_state"] = x.side_state.copy()
            small["side_ok"] = (x.side_id == small["side_id"]) & (x.side_seq == small["side_seq"])
            small["params"] = np.array(repr(self._params))
            for key, value in small.items():
                with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, value)

    def restore(self, path: Path) -> None:
        """Load a ``save``d memory into this (new, empty) one of the same parameters."""
        self._check_open()
        x = self._x
        with np.load(Path(path), allow_pickle=False) as data:
            if str(data["params"]) != repr(self._params):
                raise ValueError(f"{path} was saved from a memory with other parameters: {data['params']}")
            with self._locked:
                if x.header[H_HEAD] != 0:
                    raise RuntimeError("restore() needs a new, empty memory")
                for key in self._SAVED:
                    getattr(x, key)[:] = data[key]
                seq = data["seq"]
                header = data["header"]
                for field in (H_HEAD, H_INSERTED, H_REJECTED, H_SIDE_HEAD, H_SIDE_TAIL):
                    x.header[field] = header[field]
                x.headerf[:] = data["headerf"]
                x.stream_keys[:] = data["stream_keys"]
                x.stream_last[:] = data["stream_last"]
                live = seq >= 0
                x.agent_counts[:] = np.bincount(x.agents[live], minlength=x.agent_counts.shape[0])
                x.header[H_SIZE] = int(live.sum())
                side_ok = data["side_ok"] & (data["side_seq"] >= 0)
                x.side_id[:] = np.where(side_ok, data["side_id"], -1)
                x.side_seq[:] = np.where(side_ok, data["side_seq"], EMPTY)
                x.side_state[:] = data["side_state"]
                if x.tree is not None:
                    x.tree.leaves[:] = np.where(live, data["tree_leaves"], 0.0)
                    x.tree.rebuild()
                if x.side_tree is not None:
                    x.side_tree.leaves[:] = np.where(side_ok, data["side_tree_leaves"], 0.0)
                    x.side_tree.rebuild()
                x.seq[:] = seq
