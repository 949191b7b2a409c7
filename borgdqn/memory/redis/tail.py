"""Following the hive's log into a local replica: every chunk of every agent, in the log's order.

A tail keeps a cursor (the g of the last entry it read). It first loads the whole log (``XRANGE`` in batches:
``catch_up``), then follows it (``XREAD BLOCK``: ``poll``). Each entry is decoded as hostile input: bytes that do
not decode are counted (``bad_chunks``) and skipped, never added. Streams are linked by their chunk numbers: a
chunk continues its stream in the replica only if it is the very next chunk of that stream; after any gap (a
chunk its writer dropped while Redis was away, one trimmed before this tail read it, a bad one, a restarted
writer) the stream is cut there, so that no frame stack or n-step window spans the gap. Entries trimmed between
two reads are counted as ``skipped_chunks`` (a tail that fell further behind than the log holds).

A log that was recreated under the tail (a Redis restarted without persistence: its chunk counter is below the
cursor) is read again from its start (``resets``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from borgdqn.memory.codec import decode_chunk
from borgdqn.memory.redis.keys import F_DATA, F_WRITTEN, LogKeys, LogShape
from borgdqn.memory.shared import SharedReplay

log = logging.getLogger(__name__)


@dataclass
class TailCounters:
    chunks: int = 0  # added to the replica
    steps: int = 0
    bad_chunks: int = 0  # did not decode: skipped, never reached the replica
    skipped_chunks: int = 0  # trimmed from the log before this tail read them
    cuts: int = 0  # chunks that did not continue their stream (a gap before them)
    resets: int = 0  # the log was recreated under the tail


def _g(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


class LogTail:
    """Follows log ``name`` through ``client`` into ``replica``; one thread calls it."""

    def __init__(self, client: Any, name: str, shape: LogShape, replica: SharedReplay, *, batch: int = 256,
                 lag_window: int = 4096) -> None:
        self._r = client
        self.keys = LogKeys.of(name)
        self.shape = shape
        self.replica = replica
        self.batch = batch
        self.cursor = 0  # g of the last entry read (0: none yet)
        self.counters = TailCounters()
        self._next_chunk: dict[int, int] = {}  # stream -> the chunk number that continues it
        self._dtype = np.dtype(shape.frame_dtype)
        self._lags_ms: deque[float] = deque(maxlen=lag_window)
        self._epoch: bytes | None = None  # the log's epoch (new each time the log is created) as last seen

    def _check_epoch(self, head: int, epoch: bytes | None) -> None:
        """Start over when the log was recreated under the tail: a new epoch, or fewer chunks than were read."""
        recreated = (epoch is not None and self._epoch is not None and epoch != self._epoch) or head < self.cursor
        if epoch is not None or recreated:
            self._epoch = epoch  # a log gone (no epoch yet) adopts the epoch of the log that replaces it
        if recreated:
            self.counters.resets += 1
            log.warning("redis log %s was recreated (a restart without persistence?): reading it again from its "
                        "start", self.keys.log)
            self.cursor = 0

    def catch_up(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Load every entry up to the log's head as of now; returns the entries read. ``progress(read, held)`` is
        called after each batch: entries read so far, of the ``held`` entries the log held at the start."""
        pipe = self._r.pipeline(transaction=False)
        pipe.hmget(self.keys.stats, ["chunks", "epoch"])
        pipe.xlen(self.keys.log)
        (head, epoch), held = pipe.execute()
        target = int(head or 0)
        self._check_epoch(target, epoch)
        read = 0
        while self.cursor < target:
            entries = self._r.xrange(self.keys.log, min=f"{self.cursor + 1}-0", max="+", count=self.batch)
            if not entries:
                break  # the log was recreated, or trimmed to nothing: ``poll`` handles both
            self._take(entries)
            read += len(entries)
            if progress is not None:
                progress(min(read, int(held)), max(int(held), 1))
        return read

    def poll(self, block_ms: int) -> int:
        """Read what was appended since the cursor, waiting up to ``block_ms`` for something; returns entries read."""
        pipe = self._r.pipeline(transaction=False)
        pipe.hmget(self.keys.stats, ["chunks", "epoch"])
        pipe.xread({self.keys.log: f"{self.cursor}-1"}, count=self.batch, block=block_ms)
        (head, epoch), answer = pipe.execute()
        before = self.cursor
        self._check_epoch(int(head or 0), epoch)
        if self.cursor != before:
            return 0  # what was read belongs to the new log only if it is read again from its start
        entries = answer[0][1] if answer else []
        if entries:
            self._take(entries)
        return len(entries)

    def lag_ms(self, q: float) -> float | None:
        """The ``q`` quantile of the write-to-replica lag of the last chunks added (ms), None before any."""
        if not self._lags_ms:
            return None
        return float(np.quantile(np.fromiter(self._lags_ms, dtype=np.float64), q))

    def _take(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        c = self.counters
        for entry_id, fields in entries:
            try:
                g = _g(entry_id)
            except ValueError:
                c.bad_chunks += 1  # not an entry our script wrote
                continue
            if self.cursor and g > self.cursor + 1:
                c.skipped_chunks += g - self.cursor - 1
            self.cursor = max(self.cursor, g)
            self._add(fields)

    def _add(self, fields: dict[bytes, bytes]) -> None:
        c = self.counters
        try:
            decoded = decode_chunk(fields.get(F_DATA, b""), self.shape.frame_shape, self._dtype)
            if decoded.context_steps or decoded.lookahead_steps:
                raise ValueError("borrowed steps: a chunk of the first Redis memory, not of the log")
        except Exception as err:  # hostile bytes of any kind: count, skip, never add
            c.bad_chunks += 1
            if c.bad_chunks <= 10 or c.bad_chunks % 1000 == 0:
                log.warning("redis log: skipped a chunk that does not decode (%s); bad_chunks=%d", err, c.bad_chunks)
            return
        chunk = decoded.chunk
        expected = self._next_chunk.get(chunk.stream_id)
        continues = expected == decoded.chunk_seq
        if expected is not None and not continues:
            c.cuts += 1
        self._next_chunk[chunk.stream_id] = decoded.chunk_seq + 1
        self.replica.add(chunk, continues=continues)
        c.chunks += 1
        c.steps += len(chunk)
        with contextlib.suppress(ValueError):  # no writer time: no lag to tell
            self._lags_ms.append(time.time() * 1000 - float(fields.get(F_WRITTEN, b"")))
