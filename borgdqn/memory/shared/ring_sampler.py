"""Sampling the ring without the lock, and the learner's priorities.

A writer marks its slots WRITING (under the lock, so behind a full fence) before it touches them and publishes
their seqs only once the whole chunk is copied; links only lead to published steps or to steps of the same chunk.
A sampler follows the links of all B candidates at once, keeps the windows whose slots hold the seqs it expects
and whose steps obey the episode rules (``sampling_rules.window``), copies, then checks the seqs again. With x86's
ordered stores and loads, a row whose seqs did not change read untorn data; torn rows are replaced by fresh
draws, so a batch is always full and valid. Stacks go back ``stack-1`` links within the episode and repeat the
episode's first frame before it (as ``FrameStacker`` does); n-step windows go forward up to n links and stop at a
``last`` step. A start needs the stream's data up to ``t+m``: the newest steps of a stream wait for their
successors. The oldest 1/32 of the ring (at most 4096 slots) is not drawn from: it is about to be overwritten.

Priorities (``prioritized=True``): a 64-ary sum tree (``sumtree.py``) over the C slots stores ``p ** alpha``.
Draws are stratified over the prefix sums. Importance weights are ``(N * P(i)) ** -beta`` normalised by the
batch's largest weight, with N the number of stored steps. Keys are seqs, so ``update_priorities`` recognises
keys whose slot was overwritten since (stale).

Sequences (LSTM): a sequence start has its own priority in the side ring's sum tree (initially the max, then
whatever the learner sends back for the sequence's key), as in R2D2. A sequence runs ``length`` steps along the
links; steps after the episode's last step, and steps the stream has not written yet, are padding (mask False,
zeros).

Returned batches are new arrays owned by the caller; the big frame arrays come from a small per-process pool
that only recycles buffers nobody references any more (allocating ~1 MB per batch costs more in page faults
than copying the frames).
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable

import numpy as np

from borgdqn.memory.protocol import MemoryNotReady, SamplingSpec, SequenceBatch, TransitionBatch
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
from borgdqn.memory.shared.layout import F_MAX_PRIORITY, H_HEAD, H_SIDE_HEAD, H_SIDE_TAIL, H_SIZE, SegmentParams
from borgdqn.memory.shared.segment import MAX_CLIENTS, Arrays, HeldLock

_MAX_ROUNDS = 24  # draw rounds before giving up: only a memory with (almost) nothing to sample gets there
_POOL_SIZE = 8  # recycled output buffers per process (a few batches' obs and next_obs)

_Rows = dict[str, np.ndarray]  # per-row arrays of a batch being assembled


@functools.lru_cache(maxsize=64)
def _aranges(k: int) -> np.ndarray:
    """``0.0 .. k-1`` (read-only, shared): the strata of ``k`` stratified draws."""
    out = np.arange(k, dtype=np.float64)
    out.flags.writeable = False
    return out


class RingSampler:
    """Draws batches from the ring of ``x`` for one process (its threads may share it) and takes priorities back.

    ``client``: this process's own ``sampled`` counter in the segment.
    """

    def __init__(self, x: Arrays, params: SegmentParams, locked: HeldLock, seed: int) -> None:
        self._x = x
        self._params = params
        self._capacity = params.capacity
        self._frame_shape = tuple(params.frame_shape)
        self._frame_dtype = np.dtype(params.frame_dtype)
        self._locked = locked
        self._rng = np.random.default_rng(seed)
        self._pool: list[np.ndarray] = []
        self._pool_lock = threading.Lock()  # threads of one process may sample through one instance
        self.client = -1

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

    def sample(self, batch_size: int, beta: float, spec: SamplingSpec) -> TransitionBatch:
        check_batch_args(batch_size, beta)
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

    def sample_sequences(self, batch_size: int, beta: float, spec: SamplingSpec) -> SequenceBatch:
        """Sequences of the spec's ``sequence_length`` steps from stored sequence starts.

        Positions after the episode's last step, or beyond what the stream has written so far, are padding:
        mask False, zero frames, actions, rewards and flags.
        """
        if self._params.recurrent_hidden is None:
            raise RuntimeError("this memory was created without recurrent_hidden: it stores no sequences")
        check_batch_args(batch_size, beta)
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
        if self.client == MAX_CLIENTS - 1:  # the last counter is shared by late attachers
            with self._locked:
                self._x.sampled[self.client] += n
        else:
            self._x.sampled[self.client] += n

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        """Set priorities (e.g. |TD error|) of sampled keys; keys evicted or rewritten since are ignored."""
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
