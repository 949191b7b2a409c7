"""The shared-memory replay: real POSIX shared memory, real processes (spawn), every sample checked by an oracle.

Frames encode (stream, step index), so a sampled stack, n-step window or sequence can be checked step by step
against what the stream really was: ``Stream`` is the oracle that knows episodes, rewards and actions.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from borgdqn.memory.protocol import ReplayMemory, SamplingSpec, SequenceBatch, TrajectoryChunk, TransitionBatch
from borgdqn.memory.shared import SharedReplay, SharedReplayHandle
from tests.support.replay_oracle import (
    F32,
    GAMMA,
    U8,
    U8_SMALL,
    Codec,
    Stream,
    check_sequences,
    check_transitions,
    draw,
    draw_sequences,
)


def new_memory(capacity: int, codec: Codec = F32, **kwargs: Any) -> SharedReplay:
    options: dict[str, Any] = {"prioritized": False, "alpha": 0.6, "priority_eps": 1e-6, "seed": 0}
    options.update(kwargs)
    return SharedReplay.create(capacity, codec.shape, np.dtype(codec.dtype), **options)


@pytest.fixture
def memories() -> Any:
    made: list[SharedReplay] = []

    def make(capacity: int, codec: Codec = F32, **kwargs: Any) -> SharedReplay:
        memory = new_memory(capacity, codec, **kwargs)
        made.append(memory)
        return memory

    yield make
    for memory in made:
        memory.close()
        memory.unlink()


def sample_many(memory: SharedReplay, batches: int, batch_size: int, n: int, stack: int) -> list[TransitionBatch]:
    return [draw(memory, batch_size, n, GAMMA, stack, 0.5) for _ in range(batches)]


# --------------------------------------------------------------------------------------------- basics
def test_implements_the_protocol_and_counts_bytes(memories: Any) -> None:
    memory = memories(10_000, U8, prioritized=True)
    assert isinstance(memory, ReplayMemory)
    # Everything stored per step (frame, metadata, sum-tree leaf, tables amortised) within 1.1 frames.
    assert memory.bytes_per_step() <= 1.1 * 84 * 84
    assert memory.bytes_per_step() >= 84 * 84


def test_wrap_around_evicts_oldest_first(memories: Any, tmp_path: Path) -> None:
    memory = memories(64)
    a = Stream.from_episodes(1, 0, [300], [])
    for start in range(0, 200, 7):  # chunks of 7 cross the ring's end in the middle
        memory.add(a.chunk(start, min(start + 7, 200), F32))
    stats = memory.stats()
    assert (stats.size, stats.capacity, stats.inserted, stats.per_agent) == (64, 64, 200, {0: 64})
    starts = set()
    for batch in sample_many(memory, 20, 16, 2, 3):
        starts.update(t for _, t in check_transitions(batch, {1: a}, F32, 2, 3, {1: 200}))
    # Only the newest 64 steps remain; starts also need their 2 previous frames and 2 next steps.
    assert min(starts) >= 200 - 64 + 2 and max(starts) <= 197
    memory.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as saved:
        live = np.sort(saved["seq"][saved["seq"] >= 0])
        np.testing.assert_array_equal(live, np.arange(136, 200))
        _, idx = F32.decode(saved["frames"])
        np.testing.assert_array_equal(idx[saved["seq"] >= 0], saved["seq"][saved["seq"] >= 0])

    b = Stream.from_episodes(2, 1, [30], [])
    memory.add(b.chunk(0, 24, F32))
    assert memory.stats().per_agent == {0: 40, 1: 24}
    assert memory.stats().size == 64


def test_sample_ages_count_the_steps_added_after_the_start(memories: Any) -> None:
    # Three streams interleaved in chunks of 5 into a ring of 64: the ring wraps several times.
    memory = memories(64, recurrent_hidden=3)
    streams = {sid: Stream.random(sid, sid, 105, max_episode=30) for sid in range(3)}
    adds = [(sid, start, start + 5) for start in range(0, 100, 5) for sid in streams]
    for sid, start, stop in adds:
        memory.add(streams[sid].chunk(start, stop, F32, state=True))
    order = insertion_order(adds)
    assert len(order) == memory.stats().inserted == 300
    for _ in range(10):
        batch = draw(memory, 16, 3, GAMMA, 2, 0.5)
        starts = check_transitions(batch, streams, F32, 3, 2, {sid: 100 for sid in streams})
        assert batch.ages.tolist() == [299 - order[start] for start in starts]
        # The steps of a start's n-step window came after it; only the newest 64 steps are stored.
        windows = [streams[sid].transition(t, 3, 2, GAMMA)[1] for sid, t in starts]
        assert (batch.ages >= windows).all() and (batch.ages < 64).all()
        sequences = draw_sequences(memory, 8, 6, 1, 0.5)
        starts = check_sequences(sequences, streams, F32, 6, 1, {sid: (100, 100) for sid in streams})
        assert sequences.ages.tolist() == [299 - order[start] for start in starts]
    # One more chunk: every stored step is 5 steps older, whichever stream it belongs to.
    adds.append((0, 100, 105))
    memory.add(streams[0].chunk(100, 105, F32))
    order = insertion_order(adds)
    for _ in range(4):
        batch = draw(memory, 32, 1, GAMMA, 1, 0.5)
        assert batch.ages.tolist() == [304 - order[start] for start in check_transitions(batch, streams, F32, 1, 1)]


# The hand-computed table: episode 0..4 terminates (step 4 is its last), episode 5..8 is truncated at 8.
HAND_REWARDS = [1, 2, 3, 4, 100, 10, 20, 30, 100, 0]
HAND_TABLE = {  # n: {start: (return, discount, last frame of next_obs)}
    3: {
        0: (1 + 0.9 * 2 + 0.81 * 3, 0.729, 3),
        1: (2 + 0.9 * 3 + 0.81 * 4, 0.0, 4),  # reaches the terminated last step at j = 3 <= n
        2: (3 + 0.9 * 4, 0.0, 4),
        3: (4, 0.0, 4),
        5: (10 + 0.9 * 20 + 0.81 * 30, 0.729, 8),  # truncated at j = 3: bootstrapped with gamma^3
        6: (20 + 0.9 * 30, 0.81, 8),
        7: (30, 0.9, 8),
    },
    1: {
        0: (1, 0.9, 1),
        1: (2, 0.9, 2),
        2: (3, 0.9, 3),
        3: (4, 0.0, 4),  # the next step is the terminated last step
        5: (10, 0.9, 6),
        6: (20, 0.9, 7),
        7: (30, 0.9, 8),  # the next step is a truncated last step: bootstrapped
    },
}


@pytest.mark.parametrize("codec", [F32, U8], ids=["float32", "uint8"])
@pytest.mark.parametrize("n", [1, 3])
def test_nstep_returns_and_discounts_by_hand(memories: Any, codec: Codec, n: int) -> None:
    memory = memories(64, codec)
    s = Stream.from_episodes(0, 0, [5, 4, 1], [True, False], HAND_REWARDS)
    other = Stream.random(9, 1, 30)
    # Chunk boundaries inside both episodes, with another stream's chunks between them.
    for i, (start, stop) in enumerate([(0, 3), (3, 7), (7, 10)]):
        memory.add(s.chunk(start, stop, codec))
        memory.add(other.chunk(10 * i, 10 * i + 10, codec))
    seen: dict[int, tuple[float, float, int]] = {}
    for batch in sample_many(memory, 30, 16, n, 4):
        check_transitions(batch, {0: s, 9: other}, codec, n, 4, {0: 10, 9: 30})
        sids, idx = codec.decode(batch.obs[:, -1])
        _, next_idx = codec.decode(batch.next_obs[:, -1])
        for row in np.flatnonzero(sids == 0):
            seen[int(idx[row])] = (float(batch.returns[row]), float(batch.discounts[row]), int(next_idx[row]))
    assert sorted(seen) == sorted(HAND_TABLE[n]), "some start was never sampled, or a last step was"
    for start, (ret, disc, nxt) in HAND_TABLE[n].items():
        got = seen[start]
        assert math.isclose(got[0], ret, rel_tol=1e-6) and math.isclose(got[1], disc, abs_tol=1e-7), (start, got)
        assert got[2] == nxt, (start, got)


def test_stacks_repeat_the_first_frame_and_span_interleaved_chunks(memories: Any) -> None:
    memory = memories(512)
    streams = {sid: Stream.random(sid, sid % 2, 90, max_episode=12) for sid in (3, 4, 5)}
    # Round robin with chunks of 4: between two chunks of a stream come the chunks of the two others.
    adds = [(sid, start, min(start + 4, 90)) for start in range(0, 90, 4) for sid in streams]
    for sid, start, stop in adds:
        memory.add(streams[sid].chunk(start, stop, F32))
    seen: set[tuple[int, int]] = set()
    for batch in sample_many(memory, 60, 32, 2, 4):
        seen.update(check_transitions(batch, streams, F32, 2, 4, {sid: 90 for sid in streams}))
    padded = {(sid, t) for sid, t in seen if t - streams[sid].episode_first[t] < 3}
    spanning = {(sid, t) for sid, t in seen if t % 4 < 3 and t - streams[sid].episode_first[t] >= 3}
    assert padded and spanning, "the samples did not cover padded stacks and stacks across chunks"
    allowed = samplable(streams, adds, 512, 2, 4)
    assert seen <= allowed and len(seen) >= 0.95 * len(allowed)


# ----------------------------------------------------------------------------------- property test
def insertion_order(adds: list[tuple[int, ...]]) -> dict[tuple[int, int], int]:
    """The insertion index of every step of ``adds`` ((stream, start, stop, ...) in the order they were stored)."""
    order: dict[tuple[int, int], int] = {}
    for sid, start, stop, *_ in adds:
        for t in range(start, stop):
            order[(sid, t)] = len(order)
    return order


def samplable(
    streams: dict[int, Stream], adds: list[tuple[int, int, int]], capacity: int, n: int, stack: int
) -> set[tuple[int, int]]:
    """Exactly the starts the memory may return after ``adds``, from the eviction and episode rules."""
    seq_of = insertion_order(adds)
    head = len(seq_of)
    oldest = head - capacity
    drawable = 0 if head <= capacity else oldest + min(capacity // 32, 4096)
    written = {sid: max(stop for s, _, stop in adds if s == sid) for sid in streams}
    out = set()
    for (sid, t), seq in seq_of.items():
        s = streams[sid]
        if s.last[t] or seq < drawable:
            continue
        m = next((j for j in range(1, n + 1) if t + j < len(s) and s.last[t + j]), n)
        if t + m >= written[sid]:
            continue
        if all(seq_of[(sid, i)] >= oldest for i in [*s.stack(t, stack), *range(t, t + m + 1)]):
            out.add((sid, t))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    num_streams=st.integers(1, 3),
    capacity=st.sampled_from([24, 64, 200]),
    n=st.integers(1, 4),
    stack=st.integers(1, 4),
    prioritized=st.booleans(),
)
def test_no_transition_crosses_an_episode_end(
    data: st.DataObject, num_streams: int, capacity: int, n: int, stack: int, prioritized: bool
) -> None:
    streams = {}
    for sid in range(num_streams):
        lengths = data.draw(st.lists(st.integers(2, 9), min_size=1, max_size=12), label=f"episodes {sid}")
        ends = data.draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)), label=f"ends {sid}")
        streams[sid] = Stream.from_episodes(sid, sid, lengths, ends)
    # Interleave the streams' chunks in a random order, with random chunk sizes.
    cursor = dict.fromkeys(streams, 0)
    adds = []
    while any(cursor[sid] < len(s) for sid, s in streams.items()):
        sid = data.draw(st.sampled_from([k for k in streams if cursor[k] < len(streams[k])]))
        size = data.draw(st.integers(1, 7))
        stop = min(cursor[sid] + size, len(streams[sid]))
        adds.append((sid, cursor[sid], stop))
        cursor[sid] = stop
    memory = new_memory(capacity, prioritized=prioritized, seed=data.draw(st.integers(0, 99)))
    try:
        for sid, start, stop in adds:
            memory.add(streams[sid].chunk(start, stop, F32))
        allowed = samplable(streams, adds, capacity, n, stack)
        written = {sid: len(s) for sid, s in streams.items()}
        if not allowed:
            with pytest.raises(RuntimeError, match="could not draw"):
                draw(memory, 8, n, GAMMA, stack, 0.5)
            return
        order = insertion_order(adds)
        for _ in range(4):
            batch = draw(memory, 8, n, GAMMA, stack, 0.5)
            starts = check_transitions(batch, streams, F32, n, stack, written)
            assert set(starts) <= allowed, f"sampled {set(starts) - allowed}, which cannot start a transition"
            # Ages are exact after any interleaving and wrap-around: the steps stored after the start.
            assert batch.ages.tolist() == [len(order) - 1 - order[start] for start in starts]
    finally:
        memory.close()
        memory.unlink()


# ------------------------------------------------------------------------------------------ processes
def stream_set(agent: int, per_writer: int, steps: int) -> list[Stream]:
    return [Stream.random(agent * 1024 + e, agent, steps) for e in range(per_writer)]


def _writer(handle: SharedReplayHandle, agent: int, per_writer: int, steps: int, start: Any) -> None:
    memory = SharedReplay.attach(handle, seed=agent)
    try:
        rng = np.random.default_rng(agent)
        queues: list[list[TrajectoryChunk]] = []
        for s in stream_set(agent, per_writer, steps):
            cuts = np.cumsum(rng.integers(1, 40, steps))
            bounds = [0, *cuts[cuts < steps].tolist(), steps]
            queues.append([s.chunk(a, b, U8_SMALL) for a, b in itertools.pairwise(bounds)])
        start.wait(timeout=120)
        # The streams' chunks interleaved at random, each stream's in order.
        while any(queues):
            q = queues[int(rng.choice([i for i, q in enumerate(queues) if q]))]
            memory.add(q.pop(0))
    finally:
        memory.close()


def _sampler(
    handle: SharedReplayHandle, seed: int, specs: list[tuple[int, int, int]], start: Any, stop: Any, out: Any
) -> None:
    memory = SharedReplay.attach(handle, seed=seed)
    checked, overlapping, error = 0, 0, ""
    try:
        streams = {sid: Stream.random(sid, agent, steps) for sid, agent, steps in specs}
        rng = np.random.default_rng(seed)
        start.wait(timeout=120)
        while not stop.is_set() or checked < 32 * 32:
            writing = not stop.is_set()
            batch = draw(memory, 32, 3, GAMMA, 4, 0.4)
            checked += len(check_transitions(batch, streams, U8_SMALL, 3, 4))
            overlapping += writing
            memory.update_priorities(batch.keys, rng.random(32) * 3)
    except Exception as err:
        error = f"{err.__class__.__name__}: {err}"
    finally:
        memory.close()
        out.put((checked, overlapping, error))


@pytest.mark.integration
@pytest.mark.parametrize("writers", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_concurrent_writers_and_samplers_lose_and_corrupt_nothing(memories: Any, tmp_path: Path, writers: int) -> None:
    capacity, per_writer, steps = 2048, 2, 12_000
    memory = memories(capacity, U8_SMALL, prioritized=True)
    # The parent's own stream fills the memory first, so that samplers can start at once.
    seed_stream = Stream.random(99_000, 99, 600)
    memory.add(seed_stream.chunk(0, 600, U8_SMALL))
    specs = [(seed_stream.sid, 99, 600)] + [
        (s.sid, agent, steps) for agent in range(writers) for s in stream_set(agent, per_writer, steps)
    ]
    ctx = mp.get_context("spawn")
    start, stop, results = ctx.Barrier(writers + 2), ctx.Event(), ctx.Queue()
    samplers = [
        ctx.Process(target=_sampler, args=(memory.handle(), 100 + i, specs, start, stop, results)) for i in range(2)
    ]
    procs = [ctx.Process(target=_writer, args=(memory.handle(), a, per_writer, steps, start)) for a in range(writers)]
    for p in samplers + procs:
        p.start()
    for p in procs:
        p.join(120)
    stop.set()
    outcomes = [results.get(timeout=120) for _ in samplers]
    for p in samplers:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs + samplers)
    assert [error for _, _, error in outcomes] == ["", ""]
    assert all(checked >= 32 * 32 for checked, _, _ in outcomes)
    # The samplers really ran while the writers lapped the ring several times.
    assert all(overlapping >= 3 for _, overlapping, _ in outcomes), outcomes

    total = 600 + writers * per_writer * steps
    stats = memory.stats()
    assert (stats.inserted, stats.size, stats.rejected) == (total, capacity, 0)
    assert sum(stats.per_agent.values()) == capacity
    assert stats.sampled >= sum(checked for checked, _, _ in outcomes)

    streams = {sid: Stream.random(sid, agent, n) for sid, agent, n in specs}
    # Every stored step, read back through a checkpoint: intact frame, the right metadata, valid links.
    memory.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as saved:
        seq = saved["seq"]
        live = np.flatnonzero(seq >= 0)
        np.testing.assert_array_equal(np.sort(seq[live]), np.arange(total - capacity, total))
        frames = saved["frames"][live]
        assert U8_SMALL.intact(frames).all()
        sids, idx = U8_SMALL.decode(frames)
        step_of = {int(q): (int(a), int(t)) for q, a, t in zip(seq[live], sids, idx, strict=True)}
        for slot, sid, t in zip(live, sids, idx, strict=True):
            s = streams[int(sid)]
            assert saved["actions"][slot] == s.actions[t] and saved["rewards"][slot] == s.rewards[t]
            assert saved["flags"][slot] == s.first[t] * 1 + s.last[t] * 2 + s.terminated[t] * 4
            assert saved["agents"][slot] == s.agent
            prev = int(saved["prev"][slot])
            if prev in step_of:  # the link points at a stored step: it must be the stream's previous one
                assert step_of[prev] == (sid, t - 1)
        # Each stream's stored steps are its newest ones, without holes.
        for sid in np.unique(sids):
            kept = np.sort(idx[sids == sid])
            np.testing.assert_array_equal(kept, np.arange(kept[0], kept[0] + kept.size))
    for batch in sample_many(memory, 20, 32, 3, 4):
        check_transitions(batch, streams, U8_SMALL, 3, 4)


LAPPER_STEPS = 30_000


def _lapper(handle: SharedReplayHandle, start: Any) -> None:
    memory = SharedReplay.attach(handle, seed=1)
    try:
        s = Stream.random(5, 1, LAPPER_STEPS, max_episode=60)
        start.wait(timeout=120)
        for a in range(0, LAPPER_STEPS, 30):
            memory.add(s.chunk(a, a + 30, U8_SMALL, state=True))
    finally:
        memory.close()


@pytest.mark.integration
def test_samples_stay_intact_while_a_writer_laps_a_tiny_ring(memories: Any) -> None:
    # 512 slots and a writer adding 30-step chunks as fast as it can: slots are overwritten while they are
    # being copied out, and those torn rows must be replaced, never returned.
    memory = memories(512, U8_SMALL, prioritized=True, recurrent_hidden=3)
    old = Stream.random(6, 2, 512, max_episode=60)
    for a in range(0, 510, 30):
        memory.add(old.chunk(a, a + 30, U8_SMALL, state=True))
    streams = {5: Stream.random(5, 1, LAPPER_STEPS, max_episode=60), 6: old}
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    writer = ctx.Process(target=_lapper, args=(memory.handle(), start))
    writer.start()
    start.wait(timeout=120)
    # Sample as fast as possible while the writer runs; check afterwards (the oracle is slow).
    drawn: list[tuple[TransitionBatch, SequenceBatch, int, int]] = []
    while writer.is_alive() and len(drawn) < 400:
        before = memory.stats().inserted - 510
        transitions = draw(memory, 32, 3, GAMMA, 4, 0.4)
        sequences = draw_sequences(memory, 8, 10, 1, 0.4)
        drawn.append((transitions, sequences, before, memory.stats().inserted - 510))
    writer.join()
    assert writer.exitcode == 0
    assert len(drawn) >= 20
    for transitions, sequences, before, after in drawn:
        check_transitions(transitions, streams, U8_SMALL, 3, 4)
        check_sequences(sequences, streams, U8_SMALL, 10, 1, {5: (before, after), 6: (510, 510)})


def test_handle_travels_only_to_spawned_processes(memories: Any) -> None:
    memory = memories(64)
    with pytest.raises(TypeError, match="handle"):
        pickle.dumps(memory)
    # The lock inside a handle pickles only while a process is being started (Process args, Pool initargs).
    with pytest.raises(RuntimeError):
        pickle.dumps(memory.handle())


def test_owner_exit_unlinks_the_segment() -> None:
    code = (
        "import numpy as np\n"
        "from borgdqn.memory.shared import SharedReplay\n"
        "m = SharedReplay.create(64, (4,), np.float32, prioritized=True, alpha=0.6, priority_eps=1e-6)\n"
        "print(m.name)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    name = done.stdout.strip().lstrip("/")
    assert name.startswith("borgdqn-replay-")
    assert not os.path.exists(f"/dev/shm/{name}")
    assert "leaked" not in done.stderr


def test_returned_batches_are_never_overwritten_by_later_samples(memories: Any) -> None:
    # Output buffers are recycled, but only once nothing outside the memory references them any more.
    memory = memories(256, U8_SMALL, prioritized=True)
    s = Stream.random(1, 0, 200)
    memory.add(s.chunk(0, 200, U8_SMALL))
    kept = draw(memory, 16, 2, GAMMA, 4, 0.0)
    view = draw(memory, 16, 2, GAMMA, 4, 0.0).next_obs[3:5]  # a view keeps its whole batch array alive
    copies = kept.obs.copy(), kept.next_obs.copy(), view.copy()
    for _ in range(30):
        draw(memory, 16, 2, GAMMA, 4, 0.0)
    np.testing.assert_array_equal(kept.obs, copies[0])
    np.testing.assert_array_equal(kept.next_obs, copies[1])
    np.testing.assert_array_equal(view, copies[2])
    # Dropped batches do give their buffers back.
    ids = {id(draw(memory, 16, 2, GAMMA, 4, 0.0).obs) for _ in range(30)}
    assert len(ids) <= 3


def test_unlink_frees_the_segment_and_close_is_idempotent() -> None:
    memory = new_memory(64)
    path = f"/dev/shm/{memory.name.lstrip('/')}"
    assert os.path.exists(path)
    memory.close()
    memory.close()
    memory.unlink()
    assert not os.path.exists(path)
    with pytest.raises(RuntimeError, match="closed"):
        memory.stats()


# -------------------------------------------------------------------------------------------- sequences
@pytest.mark.parametrize("stack", [1, 2])
def test_sequences_return_stored_states_and_mask_after_the_episode(memories: Any, stack: int) -> None:
    memory = memories(1024, recurrent_hidden=3, prioritized=True)
    streams = {sid: Stream.random(sid, sid, 118, max_episode=14) for sid in (7, 8)}
    for start in range(0, 118, 5):
        for s in streams.values():
            memory.add(s.chunk(start, min(start + 5, 118), F32, state=True))
    # Chunk boundaries are the only sequence starts; length = burn-in 2 + 5 learned + n 1.
    length = 8
    seen: set[tuple[int, int]] = set()
    for _ in range(40):
        batch = draw_sequences(memory, 16, length, stack, 0.5)
        starts = check_sequences(batch, streams, F32, length, stack, {7: (118, 118), 8: (118, 118)})
        assert all(t % 5 == 0 for _, t in starts)
        seen.update(starts)
    ended = [(sid, t) for sid, t in seen if streams[sid].episode_last[t] < t + length - 1]
    unwritten = [(sid, t) for sid, t in seen if t + length > 118]
    assert ended and unwritten, "no sequence ran past an episode end or past the stream's newest step"
    assert len(seen) >= 0.9 * 2 * 24


def test_sequence_priorities_use_their_own_keys(memories: Any) -> None:
    memory = memories(1024, recurrent_hidden=3, prioritized=True, alpha=1.0)
    s = Stream.random(5, 0, 200)
    for start in range(0, 200, 10):
        memory.add(s.chunk(start, start + 10, F32, state=True))
    batch = draw_sequences(memory, 20, 6, 1, 0.0)
    favourite = batch.keys[0]
    others = np.setdiff1d(batch.keys, [favourite])
    memory.update_priorities(np.array([favourite, *others]), np.array([1000.0, *np.full(others.size, 1e-3)]))
    again = draw_sequences(memory, 64, 6, 1, 1.0)
    assert (again.keys == favourite).mean() > 0.5
    # The favourite's weight is the smallest, and weights are max-normalised.
    assert math.isclose(float(again.weights.max()), 1.0)
    assert again.weights[again.keys == favourite].max() == again.weights.min()
    with pytest.raises(RuntimeError, match="recurrent_hidden"):
        draw_sequences(memories(64), 4, 4, 1, 0.0)


# ----------------------------------------------------------------------------------------- priorities
def chi_square_limit(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_prioritized_frequencies_follow_priorities(memories: Any) -> None:
    alpha, eps = 0.7, 1e-6
    memory = memories(256, prioritized=True, alpha=alpha, priority_eps=eps, seed=3)
    s = Stream.from_episodes(1, 0, [100], [])  # one running episode: starts 0..98 (99 has no successor yet)
    memory.add(s.chunk(0, 100, F32))
    priorities = np.random.default_rng(0).uniform(0.05, 3.0, 99)
    memory.update_priorities(np.arange(99), priorities)  # keys are seqs: here the step indexes
    counts = np.zeros(99)
    for _ in range(300):
        batch = draw(memory, 64, 1, GAMMA, 1, 0.0)
        np.add.at(counts, batch.keys, 1)
    expected = (priorities + eps) ** alpha
    expected *= counts.sum() / expected.sum()
    limit = chi_square_limit(98)
    assert ((counts - expected) ** 2 / expected).sum() < limit
    flat = np.full(99, counts.sum() / 99)  # the test can tell: uniform sampling would fail it
    assert ((counts - flat) ** 2 / flat).sum() > 10 * limit


def test_importance_weights_formula(memories: Any) -> None:
    alpha, eps, beta = 0.6, 1e-3, 0.5
    memory = memories(256, prioritized=True, alpha=alpha, priority_eps=eps, seed=1)
    s = Stream.from_episodes(1, 0, [100], [])
    memory.add(s.chunk(0, 100, F32))
    priorities = np.linspace(0.1, 4.0, 99)
    memory.update_priorities(np.arange(99), priorities)
    batch = draw(memory, 32, 1, GAMMA, 1, beta)
    leaves = np.append((priorities + eps) ** alpha, 1.0)  # step 99 kept the initial max priority 1
    p = leaves[batch.keys] / leaves.sum()
    w = (100 * p) ** -beta  # N = steps stored
    np.testing.assert_allclose(batch.weights, w / w.max(), rtol=1e-5)
    uniform = memories(256, prioritized=False)
    uniform.add(s.chunk(0, 100, F32))
    np.testing.assert_array_equal(draw(uniform, 32, 1, GAMMA, 1, beta).weights, np.ones(32, np.float32))


def test_new_steps_get_the_max_priority_and_last_steps_none(memories: Any) -> None:
    memory = memories(256, prioritized=True, alpha=1.0)
    s = Stream.from_episodes(1, 0, [10, 20], [True])
    memory.add(s.chunk(0, 10, F32))
    memory.update_priorities(np.arange(5), np.full(5, 7.0))
    memory.add(s.chunk(10, 30, F32))
    leaves = memory._x.tree.leaves  # white box: the priorities themselves
    assert leaves[9] == 0.0, "the last step of an episode must never be drawn"
    np.testing.assert_allclose(leaves[10:30], 7.0 + 1e-6)
    memory.update_priorities(np.array([9]), np.array([5.0]))  # a last step stays at 0
    assert leaves[9] == 0.0


def test_stale_keys_are_ignored(memories: Any) -> None:
    memory = memories(64, prioritized=True, alpha=1.0)
    s = Stream.from_episodes(1, 0, [300], [])
    memory.add(s.chunk(0, 64, F32))
    old_keys = draw(memory, 32, 1, GAMMA, 1, 0.0).keys
    memory.add(s.chunk(64, 128, F32))  # overwrites every slot
    tree = memory._x.tree
    before = tree.total()
    memory.update_priorities(old_keys, np.full(32, 1000.0))
    assert tree.total() == before
    memory.update_priorities(np.array([100, 101]), np.array([np.nan, np.inf]))  # not finite: ignored too
    assert tree.total() == before
    memory.update_priorities(np.array([100]), np.array([1000.0]))  # a live key does count
    assert tree.total() > before + 900
    with pytest.raises(ValueError, match="keys"):
        memory.update_priorities(np.arange(3), np.ones(2))


# -------------------------------------------------------------------------------------------- hostile input
def hostile_chunks(s: Stream) -> dict[str, Any]:
    good = s.chunk(0, 8, F32)

    def bad(**changes: Any) -> TrajectoryChunk:
        fields = dict(vars(good))
        fields.update(changes)
        return TrajectoryChunk(**fields)

    nan = good.rewards.copy()
    nan[3] = np.nan
    term = good.terminated.copy()
    term[2] = True
    first = good.first.copy()
    first[5] = True
    return {
        "frame shape": bad(frames=np.zeros((8, 5), np.float32)),
        "frame dtype": bad(frames=good.frames.astype(np.float64)),
        "terminated without last": bad(terminated=term),
        "nan reward": bad(rewards=nan),
        "float actions": bad(actions=good.actions.astype(np.float32)),
        "huge action": bad(actions=np.full(8, 2**40)),
        "negative agent": bad(agent_id=-1),
        "agent too large": bad(agent_id=10**6),
        "stream not an int": bad(stream_id="seven"),
        "first without a last before": bad(first=first),
        "short actions": bad(actions=good.actions[:3]),
        "empty": bad(frames=good.frames[:0], actions=good.actions[:0], rewards=good.rewards[:0],
                     first=good.first[:0], last=good.last[:0], terminated=good.terminated[:0], policy_ids=None),
        "too long": Stream.from_episodes(2, 0, [100], []).chunk(0, 70, F32),
        "recurrent state without a table": bad(recurrent_state=np.zeros((2, 3), np.float32)),
        "non-finite frame": bad(frames=np.full((8, 4), np.inf, np.float32)),
        "not a chunk": None,
    }  # fmt: skip


def test_hostile_chunks_are_counted_and_skipped(memories: Any, caplog: pytest.LogCaptureFixture) -> None:
    memory = memories(64)
    s = Stream.from_episodes(1, 0, [4, 30], [True])
    memory.add(s.chunk(8, 20, F32))
    caplog.set_level(logging.WARNING, logger="borgdqn.memory.shared")
    chunks = hostile_chunks(s)
    for what, chunk in chunks.items():
        memory.add(chunk)
        assert memory.stats().rejected == list(chunks).index(what) + 1, what
    stats = memory.stats()
    assert (stats.size, stats.inserted, stats.rejected) == (12, 12, len(chunks))
    assert sum("rejected chunk" in r.getMessage() for r in caplog.records) == 10  # then one in a thousand
    memory.add(s.chunk(20, 30, F32))
    for batch in sample_many(memory, 5, 16, 2, 2):
        check_transitions(batch, {1: s}, F32, 2, 2)


def test_bad_sample_arguments_and_an_empty_memory(memories: Any) -> None:
    memory = memories(64, prioritized=True)
    with pytest.raises(RuntimeError, match="could not draw"):
        draw(memory, 4, 1, GAMMA, 1, 0.0)
    with pytest.raises(ValueError, match="need n_step, stack >= 1"):
        draw(memory, 4, 0, GAMMA, 1, 0.0)
    with pytest.raises(ValueError, match="0 < gamma <= 1"):
        draw(memory, 4, 1, 1.5, 1, 0.0)
    with pytest.raises(ValueError, match="need batch_size >= 1 and beta >= 0"):
        draw(memory, 0, 1, GAMMA, 1, 0.0)
    with pytest.raises(RuntimeError, match="opened without a SamplingSpec"):  # no silent default settings
        memories(64).sample(4, 0.0)
    with pytest.raises(RuntimeError, match="no sequence_length"):  # a spec for transitions draws no sequences
        memories(64, recurrent_hidden=3, spec=SamplingSpec()).sample_sequences(4, 0.0)


# ----------------------------------------------------------------------------------------- checkpoints
def test_save_and_restore_keep_contents_and_links(memories: Any, tmp_path: Path) -> None:
    streams = {sid: Stream.random(sid, sid, 160) for sid in (1, 2)}
    memory = memories(256, prioritized=True)
    for start in range(0, 120, 8):
        for s in streams.values():
            memory.add(s.chunk(start, start + 8, F32))
    memory.update_priorities(np.arange(100, 140), np.full(40, 3.0))
    memory.save(tmp_path / "replay.npz")

    restored = memories(256, prioritized=True, seed=5)
    restored.restore(tmp_path / "replay.npz")
    before, after = memory.stats(), restored.stats()
    assert (after.size, after.inserted, after.per_agent) == (before.size, before.inserted, before.per_agent)
    np.testing.assert_array_equal(restored._x.tree.leaves, memory._x.tree.leaves)
    # Streams go on after the restore: stacks and n-step windows cross from the saved chunks into new ones.
    for s in streams.values():
        restored.add(s.chunk(120, 160, F32))
    seen = set()
    for batch in sample_many(restored, 40, 32, 3, 4):
        seen.update(check_transitions(batch, streams, F32, 3, 4, {1: 160, 2: 160}))
    assert any(117 <= t <= 122 for _, t in seen)
    with pytest.raises(RuntimeError, match="empty"):
        restored.restore(tmp_path / "replay.npz")
    with pytest.raises(ValueError, match="parameters"):
        memories(128).restore(tmp_path / "replay.npz")


def test_a_private_memory_lives_in_this_process_only_and_can_cut_a_stream() -> None:
    before = set(os.listdir("/dev/shm"))
    memory = SharedReplay.create(256, F32.shape, np.dtype(F32.dtype), prioritized=False, alpha=0.6,
                                 priority_eps=1e-6, private=True)
    try:
        assert set(os.listdir("/dev/shm")) == before, "nothing in /dev/shm, whose size a container caps"
        with pytest.raises(TypeError, match="cannot be attached"):
            memory.handle()
        stream = Stream.from_episodes(3, 0, [40], [])
        memory.add(stream.chunk(0, 20, F32))
        memory.add(stream.chunk(20, 40, F32), continues=False)  # as a replica does after a gap in the log
        starts = {t for _ in range(30) for _, t in check_transitions(draw(memory, 16, 2, GAMMA, 2, 0.4),
                                                                       {3: stream}, F32, 2, 2)}
        # No transition's n steps reach across the cut, and no stack reaches back over it.
        assert not starts & {18, 19, 20} and starts & set(range(18)) and starts & set(range(21, 38))
    finally:
        memory.close()
        memory.unlink()
