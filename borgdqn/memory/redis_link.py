"""An agent's link to the Redis memory: writes and sampling off the training thread, and a local buffer.

The training thread never talks to Redis. ``add`` puts the chunk in a small local memory (an embedded
``SharedReplay`` private to this process) and in an outbox; a writer thread drains the outbox into Redis. A
sampler thread keeps a couple of batches drawn from Redis ready; ``sample`` takes one, or, when none is ready in
time (Redis slow or away), draws from the local buffer instead, so learning goes on. Priorities go back to
whichever memory a batch came from (local keys are negative: ``-1 - key``).

When Redis goes away (killed, restarted, network cut), both threads retry with capped exponential backoff and
jitter; redis-py reconnects on the next command. A restarted Redis that lost the memory (no persistence) gets
its layout recreated. While Redis is away the outbox keeps at most ``outbox_chunks`` chunks; beyond that the
oldest are dropped (counted, and the stream is cut there so that no transition spans the gap).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

import numpy as np

from borgdqn.memory.protocol import MemoryNotReady, MemoryStats, SequenceBatch, TrajectoryChunk, TransitionBatch
from borgdqn.memory.redis_replay import RedisReplay
from borgdqn.memory.shared import SharedReplay

log = logging.getLogger(__name__)

T = TypeVar("T")
Batch = TransitionBatch | SequenceBatch


@dataclass(frozen=True)
class LinkSettings:
    outbox_chunks: int = 256  # chunks waiting for Redis; beyond this the oldest are dropped
    priority_updates: int = 64  # pending priority updates; beyond this the oldest are dropped (they are stale)
    prefetch: int = 2  # batches the sampler keeps ready
    stall_s: float = 1.0  # the longest ``sample`` waits for a Redis batch before it uses the local buffer
    stats_every_s: float = 1.0
    log_every_s: float = 60.0  # a status line (batches from Redis and from the local buffer, drops, outages)
    backoff_first_s: float = 0.1
    backoff_max_s: float = 5.0
    close_timeout_s: float = 10.0  # at close, how long to keep writing queued chunks


@dataclass
class LinkCounters:
    """What the link did; logged at close and readable by the agent."""

    remote_batches: int = 0
    local_batches: int = 0
    dropped_chunks: int = 0
    dropped_priority_updates: int = 0
    write_errors: int = 0
    outages: int = 0
    away_s: float = 0.0


@dataclass
class _Request:
    kind: str  # "transitions" | "sequences"
    args: tuple[Any, ...]  # sample's arguments, beta last

    def same_shape(self, other: _Request) -> bool:
        return self.kind == other.kind and self.args[:-1] == other.args[:-1]  # beta may move


@dataclass
class _Outage:
    """Shared by both threads: when Redis went away (None while it is reachable)."""

    since: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _is_outage(err: BaseException) -> bool:
    import redis

    # BusyLoadingError (a restarted server reading its AOF) is a ConnectionError too.
    return isinstance(err, (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError))


class RedisLink:
    """Implements ``ReplayMemory`` for one agent process over a ``RedisReplay`` (see the module docstring).

    ``connect`` makes a new client of the same memory; the link makes two (RedisReplay is not thread-safe):
    one for the writer thread, one for the sampler thread.
    """

    def __init__(self, connect: Callable[[], RedisReplay], local: SharedReplay,
                 settings: LinkSettings | None = None) -> None:
        self._settings = settings or LinkSettings()
        self._local = local
        self._writer_mem = connect()
        self._sampler_mem = connect()
        self._stats = self._sampler_mem.stats()
        self.counters = LinkCounters()
        self._outage = _Outage()
        self._closing = threading.Event()
        self._failure: BaseException | None = None
        self._cond = threading.Condition()
        self._outbox: deque[TrajectoryChunk] = deque()
        self._writing: TrajectoryChunk | None = None  # the outbox's head while the writer thread writes it
        self._cut_streams: set[int] = set()
        self._priorities: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._want: _Request | None = None
        self._ready: deque[tuple[_Request, Batch]] = deque()
        self._degraded = False  # the last wait for a Redis batch ran out: do not wait again until one arrives
        self._writer = threading.Thread(target=self._write_loop, name="redis-writer", daemon=True)
        self._sampler = threading.Thread(target=self._sample_loop, name="redis-sampler", daemon=True)
        self._writer.start()
        self._sampler.start()

    # ------------------------------------------------------------------------------------------ training thread
    def add(self, chunk: TrajectoryChunk) -> None:
        self._raise_failure()
        self._local.add(chunk)
        with self._cond:
            if len(self._outbox) >= self._settings.outbox_chunks:
                # The oldest chunk goes, unless the writer is busy with it: then the next oldest.
                i = 1 if self._outbox[0] is self._writing and len(self._outbox) > 1 else 0
                dropped = self._outbox[i]
                del self._outbox[i]
                self._cut_streams.add(dropped.stream_id)
                self.counters.dropped_chunks += 1
            self._outbox.append(chunk)
            self._cond.notify_all()

    def sample(self, batch_size: int, n_step: int, gamma: float, stack: int, beta: float) -> TransitionBatch:
        batch = self._take(_Request("transitions", (batch_size, n_step, gamma, stack, beta)))
        if batch is None:
            # A local batch's ages count the local buffer's insertions (this agent's steps only), not the hive's:
            # younger than Redis ages would be, and only while Redis lags; good enough for a report's mean.
            batch = self._local.sample(batch_size, n_step, gamma, stack, beta)
            batch.keys = -1 - batch.keys
        assert isinstance(batch, TransitionBatch)
        return batch

    def sample_sequences(self, batch_size: int, length: int, stack: int, beta: float) -> SequenceBatch:
        batch = self._take(_Request("sequences", (batch_size, length, stack, beta)))
        if batch is None:
            batch = self._local.sample_sequences(batch_size, length, stack, beta)  # ages: as in ``sample``
            batch.keys = -1 - batch.keys
        assert isinstance(batch, SequenceBatch)
        return batch

    def _take(self, request: _Request) -> Batch | None:
        """A batch the sampler drew from Redis for ``request``, or None: learn from the local buffer this time."""
        self._raise_failure()
        deadline = time.monotonic() + (0.0 if self._degraded else self._settings.stall_s)
        with self._cond:
            if self._want is None or not self._want.same_shape(request):
                self._ready.clear()
            self._want = request
            self._cond.notify_all()
            while True:
                while self._ready:
                    drawn_for, batch = self._ready.popleft()
                    if drawn_for.same_shape(request):
                        self._degraded = False
                        self.counters.remote_batches += 1
                        return batch
                left = deadline - time.monotonic()
                if left <= 0 or self._failure is not None:
                    break
                self._cond.wait(left)
        self._raise_failure()
        self._degraded = True
        self.counters.local_batches += 1
        return None

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        values = np.asarray(priorities, dtype=np.float64).reshape(-1)
        if keys.shape != values.shape:
            raise ValueError(f"{keys.shape[0]} keys but {values.shape[0]} priorities")
        local = keys < 0
        if local.any():
            self._local.update_priorities(-1 - keys[local], values[local])
        if (~local).any():
            with self._cond:
                if len(self._priorities) >= self._settings.priority_updates:
                    self._priorities.popleft()
                    self.counters.dropped_priority_updates += 1
                self._priorities.append((keys[~local], values[~local]))
                self._cond.notify_all()

    def stats(self) -> MemoryStats:
        """The Redis memory's stats as last read by the sampler thread (at most ``stats_every_s`` old while
        Redis is reachable; the last reading while it is away). Size and inserted are at least the local
        buffer's: Redis holds (or will hold) every step the local buffer does, and a fresh agent should not
        wait a reading to start learning."""
        self._raise_failure()
        remote, local = self._stats, self._local.stats()
        if local.size <= remote.size and local.inserted <= remote.inserted:
            return remote
        return replace(remote, size=max(remote.size, min(local.size, remote.capacity)),
                       inserted=max(remote.inserted, local.inserted))

    @property
    def away(self) -> bool:
        return self._outage.since is not None

    @property
    def queued(self) -> int:
        """Chunks added but not yet handed to Redis (the one being written included)."""
        return len(self._outbox)

    def close(self) -> None:
        """Write what is queued (for up to ``close_timeout_s``), stop both threads, free the local buffer."""
        with self._cond:
            self._closing.set()
            self._cond.notify_all()
        self._writer.join(self._settings.close_timeout_s + 5.0)
        self._sampler.join(5.0)
        left = len(self._outbox)
        self._log_counters("closed", f"unwritten_chunks={left}")
        for mem in (self._writer_mem, self._sampler_mem):
            try:
                mem.close()
            except Exception as err:  # closing a client of a server that is gone must not fail the agent
                log.debug("redis link: closing a client: %s", err)
        self._local.close()
        self._local.unlink()

    def _log_counters(self, event: str, extra: str = "") -> None:
        c = self.counters
        log.info("redis link %s remote_batches=%d local_batches=%d queued_chunks=%d dropped_chunks=%d outages=%d "
                 "away_s=%.1f write_errors=%d %s", event, c.remote_batches, c.local_batches, len(self._outbox),
                 c.dropped_chunks, c.outages, c.away_s, c.write_errors, extra)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"the Redis link failed: {self._failure}") from self._failure

    # ------------------------------------------------------------------------------------------ outages
    def _call(self, what: str, fn: Callable[[], T], mem: RedisReplay, give_up: Callable[[], bool]) -> T | None:
        """``fn()``, retried through outages with backoff until it succeeds (or ``give_up()``: None)."""
        while True:
            try:
                result = fn()
            except Exception as err:
                if not _is_outage(err):
                    raise
                self._went_away(what, err)
                if not self._wait_for_server(mem, give_up):
                    return None
                continue
            self._came_back()
            return result

    def _wait_for_server(self, mem: RedisReplay, give_up: Callable[[], bool]) -> bool:
        """Back off until the server answers again and holds the memory's layout (False: gave up)."""
        delay = self._settings.backoff_first_s
        while not give_up():
            # Full jitter: agents that lost the same server do not come back in lock step.
            self._closing.wait(random.uniform(0.5, 1.0) * delay)
            delay = min(delay * 2, self._settings.backoff_max_s)
            if give_up():
                break
            try:
                mem.ping()
                if mem.ensure_layout():
                    log.warning("redis memory was empty after reconnecting (a restart without persistence): "
                                "recreated its layout")
                return True
            except Exception as err:
                if not _is_outage(err):
                    raise
        return False

    def _went_away(self, what: str, err: BaseException) -> None:
        with self._outage.lock:
            if self._outage.since is None:
                self._outage.since = time.monotonic()
                self.counters.outages += 1
                log.warning("redis away (%s: %s); retrying with backoff, learning from the local buffer",
                            what, " ".join(str(err).split()))

    def _came_back(self) -> None:
        with self._outage.lock:
            since = self._outage.since
            if since is None:
                return
            self._outage.since = None
            away = time.monotonic() - since
            self.counters.away_s += away
        log.warning("redis back after %.1fs; %d chunks queued, %d dropped so far", away, len(self._outbox),
                    self.counters.dropped_chunks)

    # ------------------------------------------------------------------------------------------ writer thread
    def _write_loop(self) -> None:
        mem = self._writer_mem
        deadline: float | None = None

        def give_up() -> bool:
            return deadline is not None and time.monotonic() > deadline

        try:
            while True:
                with self._cond:
                    while not (self._outbox or self._priorities or self._closing.is_set()):
                        self._cond.wait()
                    if self._closing.is_set() and deadline is None:
                        deadline = time.monotonic() + self._settings.close_timeout_s
                    updates = list(self._priorities)
                    self._priorities.clear()
                    chunk = self._writing = self._outbox[0] if self._outbox else None
                    cut = chunk is not None and chunk.stream_id in self._cut_streams
                    if cut:
                        assert chunk is not None
                        self._cut_streams.discard(chunk.stream_id)
                for keys, values in updates:
                    self._write_op("priorities", partial(mem.update_priorities, keys, values), give_up)
                mem.raise_max_priority(self._sampler_mem.max_priority)
                if chunk is None:
                    if deadline is not None:
                        self._write_op("flush", mem.flush, give_up)
                        return
                    continue
                if cut:
                    self._write_op("cut", partial(mem.break_stream, chunk.stream_id), give_up)
                if not self._write_op("write", partial(mem.add, chunk), give_up):
                    return  # closing, and Redis stayed away
                with self._cond:
                    self._outbox.popleft()  # still ``chunk``: the training thread never drops the one being written
                    self._writing = None
        except BaseException as err:
            self._fail(err)

    def _write_op(self, what: str, fn: Callable[[], object], give_up: Callable[[], bool]) -> bool:
        """True if ``fn`` ran (or failed for good and was counted); False if it gave up during an outage."""
        import redis

        try:
            return self._call(what, lambda: fn() or True, self._writer_mem, give_up) is not None
        except redis.ResponseError as err:
            # A server-side refusal (e.g. OOM under maxmemory): count it, keep the agent running. Anything else
            # is a bug, and fails the link (the agent's next add or sample raises it).
            self.counters.write_errors += 1
            if self.counters.write_errors <= 10:
                log.error("redis %s failed: %s", what, " ".join(str(err).split()))
            return True

    # ------------------------------------------------------------------------------------------ sampler thread
    def _sample_loop(self) -> None:
        mem = self._sampler_mem
        next_stats = 0.0
        next_log = time.monotonic() + self._settings.log_every_s
        try:
            while not self._closing.is_set():
                now = time.monotonic()
                if now >= next_log:
                    self._log_counters("status")
                    next_log = now + self._settings.log_every_s
                if now >= next_stats:
                    stats = self._call("stats", mem.stats, mem, self._closing.is_set)
                    if stats is not None:
                        self._stats = stats
                    next_stats = time.monotonic() + self._settings.stats_every_s
                with self._cond:
                    want = self._want
                    full = len(self._ready) >= self._settings.prefetch
                    if want is None or full:
                        self._cond.wait(max(0.0, next_stats - time.monotonic()))
                        continue
                batch = self._call("sample", partial(self._draw, want), mem, self._closing.is_set)
                if batch is None:
                    self._closing.wait(0.2)  # too few transitions in Redis yet (or closing): look again shortly
                    continue
                with self._cond:
                    if self._want is not None and self._want.same_shape(want):
                        self._ready.append((want, batch))
                        self._cond.notify_all()
        except BaseException as err:
            self._fail(err)

    def _draw(self, want: _Request) -> Batch | None:
        mem = self._sampler_mem
        try:
            if want.kind == "sequences":
                return mem.sample_sequences(*want.args)
            return mem.sample(*want.args)
        except MemoryNotReady:
            return None

    def _fail(self, err: BaseException) -> None:
        log.error("redis link thread %s failed: %s", threading.current_thread().name, err, exc_info=err)
        with self._cond:
            self._failure = err
            self._cond.notify_all()
