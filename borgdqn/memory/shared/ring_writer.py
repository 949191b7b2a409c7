"""Writing the ring: reserve seqs under the lock, copy outside it, publish under it.

Every step gets a global monotonic sequence number ``seq`` (slot = seq % C; a sampled step's age is the number of
seqs handed out after its own). A write takes the lock twice, briefly: to *reserve* ``len(chunk)`` consecutive
seqs at the head (evicting the oldest steps: their per-agent counts drop and their slots are marked WRITING) and
to *publish* them (slots get their seqs, counts and priorities are set, the stream's previous chunk is linked
forward). The copy of frames and metadata happens between the two, outside the lock, so writers copy in
parallel. Each slot stores ``prev``/``next``: the seq of the neighbouring step of the same stream (seq-1/seq+1
inside a chunk; across chunks, a per-stream table of the stream's last seq - an open-addressing hash table in the
segment, so stream ids may be any non-negative ints). A link is valid only while the target slot still holds that
seq. A writer that would lap a slot still being written by another (possible only when C is tiny) waits for it
instead of interleaving the two copies. Priorities: new steps get the largest priority seen so far, ``last``
steps 0; a chunk with a ``recurrent_state`` also takes a sequence-start entry in the side ring.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from borgdqn.memory.sampling_rules import LAST
from borgdqn.memory.shared.chunk_input import Prepared
from borgdqn.memory.shared.layout import (
    F_MAX_PRIORITY,
    H_HEAD,
    H_INSERTED,
    H_SIDE_HEAD,
    H_SIDE_TAIL,
    H_SIZE,
    WRITING,
    SegmentParams,
)
from borgdqn.memory.shared.segment import Arrays, HeldLock, ring_runs

log = logging.getLogger(__name__)

_LAP_WAIT_S = 30.0  # a writer lapped by another for this long is presumed dead


class RingWriter:
    """Stores prepared chunks in the ring of ``x``; any number of writers (threads or processes) at once."""

    def __init__(self, x: Arrays, params: SegmentParams, locked: HeldLock) -> None:
        self._x = x
        self._params = params
        self._capacity = params.capacity
        self._locked = locked

    def write(self, p: Prepared, continues: bool = True) -> None:
        x, c, t = self._x, self._capacity, p.length
        s0, prev_last, entry = self._reserve(p)
        if not continues:
            prev_last = -1
        runs = ring_runs(s0 % c, t, c)
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

    def _reserve(self, p: Prepared) -> tuple[int, int, int]:
        """Under the lock: hand out seqs, evict what they overwrite; returns (first seq, link, side entry)."""
        x, c, t = self._x, self._capacity, p.length
        waiting_since: float | None = None
        while True:
            with self._locked:
                s0 = int(x.header[H_HEAD])
                runs = ring_runs(s0 % c, t, c)
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
