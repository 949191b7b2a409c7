"""An agent's link to the hive's log: its own chunks go out, everyone's come back into a local replica.

``RedisLink`` implements ``ReplayMemory`` for one agent process:

- ``add`` numbers the chunk within its stream and puts it in a bounded outbox; a **writer thread** encodes and
  appends the outbox to the log in batches. While Redis is away the outbox keeps at most ``outbox_chunks``
  chunks; beyond that the oldest are dropped (counted; the gap in the stream's chunk numbers cuts the stream in
  every replica).
- a **tail thread** first loads the whole log into the replica (``caught_up`` then becomes true; progress goes
  to the log), then follows it: every chunk of every agent, this agent's own included, reaches the replica
  through the log, so all replicas hold the same steps in the same order per stream.
- ``sample`` / ``sample_sequences`` / ``update_priorities`` go to the replica (an embedded ``SharedReplay``,
  private to this process): sampling never crosses the network, and priorities are this learner's own TD errors
  over its own replica. Until the replica has caught up, ``sample`` raises ``MemoryNotReady``.

When Redis goes away both threads retry with capped exponential backoff and full jitter; acting and learning go on
from the replica. Every few seconds the writer thread also writes the link's counters (drops, skips, bad chunks,
outages, lag) to ``borg:{name}:links`` for the memory monitor and the operator.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np

from borgdqn.memory.codec import encode_chunk
from borgdqn.memory.protocol import MemoryNotReady, MemoryStats, SequenceBatch, TrajectoryChunk, TransitionBatch
from borgdqn.memory.redis.client import RefusedAccess, UntrustedServer, is_outage, refused_access, untrusted_server
from borgdqn.memory.redis.keys import LogKeys, LogShape
from borgdqn.memory.redis.tail import LogTail
from borgdqn.memory.redis.writer import LogWriter
from borgdqn.memory.shared import SharedReplay

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class LinkSettings:
    outbox_chunks: int = 625  # chunks waiting for Redis (20k steps of 32); beyond this the oldest are dropped
    batch_chunks: int = 64  # chunks per append
    poll_ms: int = 100  # how long one tail read waits for new entries
    report_every_s: float = 5.0  # the link's counters to Redis (for the monitor and the operator)
    log_every_s: float = 60.0  # a status line in the agent's log
    progress_every_s: float = 2.0  # catch-up progress lines
    backoff_first_s: float = 0.1
    backoff_max_s: float = 5.0
    close_timeout_s: float = 10.0  # at close, how long to keep writing queued chunks


@dataclass
class LinkCounters:
    """What the link did: logged, written to ``borg:{name}:links``, and read by the agent for its metrics."""

    written_chunks: int = 0
    dropped_chunks: int = 0  # own chunks dropped from a full outbox while Redis was away
    write_errors: int = 0  # appends the server refused (e.g. OOM): counted, dropped
    outages: int = 0
    away_s: float = 0.0
    replica_chunks: int = 0  # chunks the tail added to the replica
    sampled: int = 0  # transitions or sequences this learner drew from its replica
    bad_chunks: int = 0  # log entries that did not decode: skipped
    skipped_chunks: int = 0  # log entries trimmed before the tail read them
    cuts: int = 0
    catch_up_s: float = 0.0
    lag_p50_ms: float | None = None
    lag_p99_ms: float | None = None
    caught_up: bool = False


class _Outage:
    """Shared by both threads: when Redis went away (None while it is reachable)."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.lock = threading.Lock()


class RedisLink:
    """Implements ``ReplayMemory`` over log ``name`` (see the module docstring).

    ``connect()`` returns a new ``redis.Redis`` client; the link makes two (the tail blocks in XREAD on its own
    connection). ``replica`` is this agent's private embedded memory, made with the learner's sampling spec; the
    link owns and closes it.
    """

    def __init__(self, connect: Callable[[], Any], name: str, shape: LogShape, replica: SharedReplay, *,
                 label: str = "agent", settings: LinkSettings | None = None) -> None:
        self._settings = settings or LinkSettings()
        self.name = name
        self.label = label
        self.replica = replica
        self.counters = LinkCounters()
        self._keys = LogKeys.of(name)
        self._writer_client = connect()
        self._writer = LogWriter(self._writer_client, name, shape)
        try:
            self._writer.declare()  # a log of another shape is refused here, in the caller's thread
            self._tail_client = connect()
        except BaseException:
            self._writer_client.close()
            raise
        self._tail = LogTail(self._tail_client, name, shape, replica)
        self._outage = _Outage()
        self._closing = threading.Event()
        self._caught_up = threading.Event()
        self._failure: BaseException | None = None
        self._cond = threading.Condition()
        self._outbox: deque[tuple[TrajectoryChunk, int, float]] = deque()  # chunk, its number, unix ms added
        self._in_flight = 0
        self._chunk_numbers: dict[int, int] = {}
        self._loaded = (0, 0)  # catch-up: (chunks loaded, chunks to load)
        self._threads = [threading.Thread(target=self._guarded, args=(self._write_loop,), name="redis-writer",
                                          daemon=True),
                         threading.Thread(target=self._guarded, args=(self._tail_loop,), name="redis-tail",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------------------------------ training thread
    def add(self, chunk: TrajectoryChunk) -> None:
        self._raise_failure()
        number = self._chunk_numbers.get(chunk.stream_id, 0)
        self._chunk_numbers[chunk.stream_id] = number + 1
        with self._cond:
            if len(self._outbox) + self._in_flight >= self._settings.outbox_chunks:
                # The oldest queued chunk goes (the gap in its stream's chunk numbers cuts the stream in every
                # replica); when all are being written already, this one goes instead.
                self.counters.dropped_chunks += 1
                if not self._outbox:
                    return
                self._outbox.popleft()
            self._outbox.append((chunk, number, time.time() * 1000))
            self._cond.notify_all()

    def sample(self, batch_size: int, beta: float) -> TransitionBatch:
        self._ready()
        return self.replica.sample(batch_size, beta)

    def sample_sequences(self, batch_size: int, beta: float) -> SequenceBatch:
        self._ready()
        return self.replica.sample_sequences(batch_size, beta)

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        self.replica.update_priorities(keys, priorities)

    def stats(self) -> MemoryStats:
        """The replica's stats: what this learner samples from (the log's steps as far as the tail has read)."""
        self._raise_failure()
        return self.replica.stats()

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    def wait_caught_up(self, timeout_s: float) -> bool:
        """Block until the replica holds the whole log as of the link's start (True), or ``timeout_s`` passed."""
        return self._caught_up.wait(timeout_s)

    @property
    def loading(self) -> float | None:
        """While the replica loads the log: the part loaded (0..1); None once it has caught up."""
        if self._caught_up.is_set():
            return None
        done, target = self._loaded
        return done / target if target else 0.0

    @property
    def cursor(self) -> int:
        """The number (g) of the last log entry the tail has read: the replica holds the log up to it."""
        return self._tail.cursor

    @property
    def away(self) -> bool:
        return self._outage.since is not None

    @property
    def queued(self) -> int:
        """Own chunks added but not appended yet (the batch being written included)."""
        return len(self._outbox) + self._in_flight

    def snapshot(self) -> LinkCounters:
        """The counters now (the tail's figures folded in)."""
        c, t = self.counters, self._tail.counters
        c.replica_chunks, c.bad_chunks, c.skipped_chunks, c.cuts = t.chunks, t.bad_chunks, t.skipped_chunks, t.cuts
        c.lag_p50_ms, c.lag_p99_ms = self._tail.lag_ms(0.5), self._tail.lag_ms(0.99)
        c.caught_up = self.caught_up
        c.sampled = self.replica.stats().sampled
        away = c.away_s
        since = self._outage.since
        if since is not None:
            away += time.monotonic() - since
        return LinkCounters(**{**asdict(c), "away_s": away})

    def close(self) -> None:
        """Append what is queued (for up to ``close_timeout_s``), stop both threads, free the replica."""
        with self._cond:
            self._closing.set()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(self._settings.close_timeout_s + 5.0)
        self._log_counters("closed", f"unwritten_chunks={self.queued}")
        for client in (self._writer_client, self._tail_client):
            try:
                client.close()
            except Exception as err:  # closing a client of a server that is gone must not fail the agent
                log.debug("redis link: closing a client: %s", err)
        self.replica.close()

    def _ready(self) -> None:
        self._raise_failure()
        if not self._caught_up.is_set():
            raise MemoryNotReady("the replica is still loading the hive's log")

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"the Redis link failed: {self._failure}") from self._failure

    def _log_counters(self, event: str, extra: str = "") -> None:
        c = self.snapshot()
        log.info("redis link %s written_chunks=%d queued_chunks=%d dropped_chunks=%d write_errors=%d outages=%d "
                 "away_s=%.1f replica_chunks=%d bad_chunks=%d skipped_chunks=%d cuts=%d lag_p50_ms=%s "
                 "lag_p99_ms=%s %s", event, c.written_chunks, self.queued, c.dropped_chunks, c.write_errors,
                 c.outages, c.away_s, c.replica_chunks, c.bad_chunks, c.skipped_chunks, c.cuts,
                 _ms(c.lag_p50_ms), _ms(c.lag_p99_ms), extra)

    # ------------------------------------------------------------------------------------------ outages
    def _guarded(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as err:
            if refused_access(err):  # expected, and no bug of ours: one line, no traceback
                err = RefusedAccess(f"redis refused this client ({' '.join(str(err).split())}): the password "
                                    "changed, the memory's Secret was replaced, or its ACL forbids the command")
                log.error("redis link thread %s failed: %s", threading.current_thread().name, err)
            elif untrusted_server(err):
                err = UntrustedServer(f"redis's TLS certificate did not verify ({' '.join(str(err).split())}): "
                                      "the memory's certificate changed, or replay.redis_ca_file is not its CA")
                log.error("redis link thread %s failed: %s", threading.current_thread().name, err)
            else:
                log.error("redis link thread %s failed: %s", threading.current_thread().name, err, exc_info=err)
            with self._cond:
                self._failure = err
                self._cond.notify_all()
            self._caught_up.set()  # nobody waits for a catch-up that will not come

    def _call(self, what: str, fn: Callable[[], T], client: Any, give_up: Callable[[], bool]) -> T | None:
        """``fn()``, retried through outages with backoff until it succeeds (or ``give_up()``: None)."""
        delay = self._settings.backoff_first_s
        while True:
            try:
                result = fn()
            except Exception as err:
                if not is_outage(err):
                    raise
                self._went_away(what, err)
                while not give_up():
                    # Full jitter: agents that lost the same server do not come back in lock step.
                    self._closing.wait(random.uniform(0.5, 1.0) * delay)
                    delay = min(delay * 2, self._settings.backoff_max_s)
                    try:
                        client.ping()
                        break
                    except Exception as ping_err:
                        if not is_outage(ping_err):
                            raise
                else:
                    return None
                continue
            self._came_back()
            return result

    def _went_away(self, what: str, err: BaseException) -> None:
        with self._outage.lock:
            if self._outage.since is None:
                self._outage.since = time.monotonic()
                self.counters.outages += 1
                log.warning("redis away (%s: %s); retrying with backoff, learning from the replica",
                            what, " ".join(str(err).split()))

    def _came_back(self) -> None:
        with self._outage.lock:
            since = self._outage.since
            if since is None:
                return
            self._outage.since = None
            away = time.monotonic() - since
            self.counters.away_s += away
        log.warning("redis back after %.1fs; %d chunks queued, %d dropped so far", away, self.queued,
                    self.counters.dropped_chunks)

    # ------------------------------------------------------------------------------------------ writer thread
    def _write_loop(self) -> None:
        s = self._settings
        deadline: float | None = None
        next_report = 0.0
        next_log = time.monotonic() + s.log_every_s

        def give_up() -> bool:
            return deadline is not None and time.monotonic() > deadline

        while True:
            now = time.monotonic()
            if now >= next_report:
                self._call("report", self._report, self._writer_client, lambda: self._closing.is_set())
                next_report = now + s.report_every_s
            if now >= next_log:
                self._log_counters("status")
                next_log = now + s.log_every_s
            with self._cond:
                if not self._outbox and not self._closing.is_set():
                    self._cond.wait(max(0.0, min(next_report, next_log) - time.monotonic()))
                if self._closing.is_set() and deadline is None:
                    deadline = time.monotonic() + s.close_timeout_s
                batch = [self._outbox.popleft() for _ in range(min(len(self._outbox), s.batch_chunks))]
                self._in_flight = len(batch)
            if not batch:
                if deadline is not None:
                    self._call("report", self._report, self._writer_client, give_up)
                    return
                continue
            entries = [(encode_chunk(chunk, chunk_seq=number), int(chunk.agent_id), len(chunk))
                       for chunk, number, _ in batch]
            added = [at for _, _, at in batch]
            written = self._call("append", partial(self._append, entries, added), self._writer_client, give_up)
            with self._cond:
                self._in_flight = 0
                if written is None:  # closing, and Redis stayed away: what is left is lost, and said so
                    self._outbox.extendleft(reversed(batch))
                    return

    def _append(self, entries: list[tuple[bytes, int, int]], added_ms: list[float]) -> bool:
        import redis

        try:
            self._writer.append(entries, added_ms)
            self.counters.written_chunks += len(entries)
        except redis.ResponseError as err:
            if refused_access(err):  # the memory's ACL forbids what the log needs: no later write can succeed
                raise
            # A server-side refusal (e.g. OOM under maxmemory): count it, keep the agent running.
            self.counters.write_errors += 1
            if self.counters.write_errors <= 10:
                log.error("redis append failed: %s", " ".join(str(err).split()))
        return True

    def _report(self) -> None:
        counters = asdict(self.snapshot())
        counters["queued_chunks"] = self.queued
        counters["time"] = time.time()
        self._writer_client.hset(self._keys.links, self.label, json.dumps(counters))

    # ------------------------------------------------------------------------------------------ tail thread
    def _tail_loop(self) -> None:
        s = self._settings
        tail, client = self._tail, self._tail_client
        started = time.monotonic()
        shown = [started]

        def progress(done: int, target: int) -> None:
            self._loaded = (done, target)
            if time.monotonic() - shown[0] >= s.progress_every_s:
                shown[0] = time.monotonic()
                log.info("redis log catch-up chunks=%d/%d steps=%d", done, target, tail.counters.steps)

        while not self._caught_up.is_set():
            if self._call("catch-up", lambda: tail.catch_up(progress), client, self._closing.is_set) is None:
                return
            self.counters.catch_up_s = time.monotonic() - started
            log.info("redis log caught up in %.1fs: chunks=%d steps=%d", self.counters.catch_up_s,
                     tail.counters.chunks, tail.counters.steps)
            self._caught_up.set()
        while not self._closing.is_set():
            self._call("tail", lambda: tail.poll(s.poll_ms), client, self._closing.is_set)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
