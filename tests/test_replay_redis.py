"""The Redis replay memory against a real redis-server (the harness's), checked by the embedded memory's oracle.

Frames encode (stream, step index), so every sampled stack and n-step window is checked step by step against
what the stream really was (``Stream`` and ``check_transitions`` from the embedded memory's tests).
"""

from __future__ import annotations

import itertools
import math
import uuid
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import redis

from borgdqn.memory.codec import encode_chunk
from borgdqn.memory.protocol import MemoryNotReady, ReplayMemory
from borgdqn.memory.redis_replay import SEQUENCE_KEY, RedisReplay, RedisReplayConfig
from borgdqn.memory.shared import SEQUENCE_KEY as SHARED_SEQUENCE_KEY
from borgdqn.proto.borg.v1 import experience_pb2 as pb
from tests.harness.process import free_port
from tests.harness.redis import RedisServer
from tests.test_replay_shared import (
    F32,
    GAMMA,
    U8_SMALL,
    Codec,
    Stream,
    check_sequences,
    check_transitions,
    insertion_order,
    new_memory,
    samplable,
)

pytestmark = pytest.mark.integration


def config(capacity: int = 4096, chunk_length: int = 8, codec: Codec = F32, *, stack: int = 4, n: int = 3,
           prioritized: bool = False, alpha: float = 0.6) -> RedisReplayConfig:
    return RedisReplayConfig(capacity=capacity, chunk_length=chunk_length, frame_shape=codec.shape,
                             frame_dtype=codec.dtype, prioritized=prioritized, alpha=alpha, priority_eps=1e-6,
                             context=stack - 1, lookahead=n)


@pytest.fixture
def memories(redis_server: RedisServer) -> Any:
    made: list[RedisReplay] = []

    def make(cfg: RedisReplayConfig, name: str | None = None, seed: int = 0) -> RedisReplay:
        memory = RedisReplay.connect(redis_server.url, name or uuid.uuid4().hex, cfg, seed=seed)
        memory._refresh_s = 0.0  # tests read their own writes at once
        made.append(memory)
        return memory

    yield make
    for memory in made:
        memory.close()


def write_streams(memory: Any, streams: dict[int, Stream], chunk_length: int, codec: Codec = F32) -> list[tuple]:
    """Adds the streams' chunks interleaved (as agents' envs do), then flushes; returns the adds in order."""
    adds = []
    cursor = dict.fromkeys(streams, 0)
    while any(cursor[sid] < len(s) for sid, s in streams.items()):
        for sid, s in streams.items():
            if cursor[sid] < len(s):
                stop = min(cursor[sid] + chunk_length, len(s))
                memory.add(s.chunk(cursor[sid], stop, codec))
                adds.append((sid, cursor[sid], stop))
                cursor[sid] = stop
    if isinstance(memory, RedisReplay):
        memory.flush()
    return adds


def covered(memory: ReplayMemory, streams: dict[int, Stream], codec: Codec, n: int, stack: int,
            batches: int = 80) -> set[tuple[int, int]]:
    written = {sid: len(s) for sid, s in streams.items()}
    starts: set[tuple[int, int]] = set()
    for _ in range(batches):
        starts |= set(check_transitions(memory.sample(64, n, GAMMA, stack, 0.5), streams, codec, n, stack, written))
    return starts


@pytest.mark.parametrize(("n", "stack"), [(1, 1), (3, 4), (2, 2)])
def test_samples_match_the_oracle_and_the_embedded_memory(memories: Any, n: int, stack: int) -> None:
    streams = {sid: Stream.random(sid, agent=sid % 2, total=90, max_episode=25) for sid in range(3)}
    memory = memories(config(stack=stack, n=n))
    assert isinstance(memory, ReplayMemory)
    adds = write_streams(memory, streams, chunk_length=8)
    allowed = samplable(streams, adds, capacity=10**6, n=n, stack=stack)
    # Every sample is right (check_transitions), none crosses an episode end, and every valid start is drawn:
    # exactly the starts the embedded memory may draw from the same data.
    assert covered(memory, streams, F32, n, stack) == allowed
    embedded = new_memory(4096)
    try:
        write_streams(embedded, streams, chunk_length=8)
        assert covered(embedded, streams, F32, n, stack) == allowed
    finally:
        embedded.close()
        embedded.unlink()


def test_atari_frames_round_trip(memories: Any) -> None:
    streams = {7: Stream.random(7, agent=3, total=40)}
    memory = memories(config(codec=U8_SMALL))
    write_streams(memory, streams, chunk_length=8, codec=U8_SMALL)
    batch = memory.sample(16, 3, GAMMA, 4, 0.5)
    check_transitions(batch, streams, U8_SMALL, 3, 4, {7: 40})
    assert (batch.agent_ids == 3).all()


def test_the_oldest_chunks_are_evicted_first(memories: Any) -> None:
    stream = Stream.from_episodes(0, 0, [200], [])  # one long episode: every step can start a transition
    memory = memories(config(capacity=32, chunk_length=8, stack=1, n=1))
    write_streams(memory, {0: stream}, chunk_length=8)
    stats = memory.stats()
    assert (stats.size, stats.capacity, stats.inserted) == (32, 32, 200)
    starts = covered(memory, {0: stream}, F32, 1, 1, batches=20)
    # 4 slots hold the newest 4 chunks (steps 168..199); the last step has no next step stored.
    assert starts == {(0, t) for t in range(168, 199)}


def test_priorities_change_the_sampling_frequencies(memories: Any) -> None:
    stream = Stream.from_episodes(0, 0, [65], [])
    memory = memories(config(capacity=128, chunk_length=8, stack=1, n=1, prioritized=True, alpha=1.0))
    write_streams(memory, {0: stream}, chunk_length=8)
    batch = memory.sample(64, 1, GAMMA, 1, 0.0)
    keys: dict[int, int] = {}
    for _ in range(40):
        batch = memory.sample(64, 1, GAMMA, 1, 0.0)
        keys.update(zip(batch.keys.tolist(), check_transitions(batch, {0: stream}, F32, 1, 1), strict=True))
    assert len(keys) == 64  # steps 0..63 start transitions (64 is the last stored step)
    favourite = next(iter(keys))
    memory.update_priorities(np.array(list(keys)), np.array([9.0 if k == favourite else 1.0 for k in keys]))
    draws = 6400
    hits = sum(int((memory.sample(64, 1, GAMMA, 1, 0.0).keys == favourite).sum()) for _ in range(draws // 64))
    expected = draws * 9.0 / (9.0 + 63.0)  # proportional: p ** alpha / sum
    sigma = (draws * (9 / 72) * (63 / 72)) ** 0.5
    assert abs(hits - expected) < 5 * sigma, (hits, expected)
    weights = memory.sample(256, 1, GAMMA, 1, 1.0)
    assert weights.weights.max() == 1.0 and weights.weights.min() < 0.5  # the favourite is weighted down


def test_hostile_slots_are_counted_and_never_sampled(memories: Any, redis_server: RedisServer) -> None:
    name = uuid.uuid4().hex
    memory = memories(config(capacity=64, chunk_length=8, stack=1, n=1), name=name)
    stream = Stream.from_episodes(0, 0, [64], [])
    write_streams(memory, {0: stream}, chunk_length=8)
    client = redis.Redis.from_url(redis_server.url)
    newer = pb.TrajectoryChunk.FromString(encode_chunk(stream.chunk(8, 16, F32)))
    newer.schema_version = 2
    client.set(f"borg:{{{name}}}:c:0", b"\x00\xffnot a chunk")  # steps 0..7
    client.set(f"borg:{{{name}}}:c:1", newer.SerializeToString())  # steps 8..15
    starts = covered(memory, {0: stream}, F32, 1, 1, batches=20)
    assert starts == {(0, t) for t in range(16, 63)}
    assert memory.bad_reads >= 2


def test_malformed_chunks_are_rejected_and_counted(memories: Any) -> None:
    memory = memories(config(capacity=64, chunk_length=8, stack=1, n=1))
    bad = Stream.from_episodes(0, 0, [8], []).chunk(0, 8, Codec((5,), "float32"))  # wrong frame shape
    memory.add(bad)
    stats = memory.stats()
    assert (stats.rejected, stats.size, stats.inserted) == (1, 0, 0)


def test_stats_count_each_agents_share(memories: Any) -> None:
    memory = memories(config(capacity=256, chunk_length=8))
    streams = {0: Stream.random(0, agent=0, total=48), 1024: Stream.random(1024, agent=1, total=16)}
    write_streams(memory, streams, chunk_length=8)
    stats = memory.stats()
    assert stats.per_agent == {0: 48, 1: 16}
    assert stats.size == 64


def test_a_second_client_must_agree_on_the_shape(memories: Any) -> None:
    name = uuid.uuid4().hex
    memories(config(capacity=64), name=name)
    with pytest.raises(ValueError, match="the Redis memory was created with"):
        memories(config(capacity=128), name=name)


def test_wrong_password_and_unreachable_server_fail_in_one_line(redis_server: RedisServer) -> None:
    wrong = redis_server.url.replace(redis_server.password, "guess")
    with pytest.raises(ConnectionError, match="refused the password") as refused:
        RedisReplay.connect(wrong, "x", config())
    without = f"redis://127.0.0.1:{redis_server.port}/0"
    with pytest.raises(ConnectionError, match="refused the password"):
        RedisReplay.connect(without, "x", config())
    closed = f"redis://:secret@127.0.0.1:{free_port()}/0"
    with pytest.raises(ConnectionError, match=r"unreachable after 1s") as unreachable:
        RedisReplay.connect(closed, "x", config(), timeout_s=1)
    for failure in (refused, unreachable):
        message = str(failure.value)
        assert "\n" not in message and "secret" not in message and redis_server.password not in message



# -------------------------------------------------------------------------------------------- sequences
HIDDEN = 3  # Stream.state_at's width


def seq_config(capacity: int = 4096, chunk_length: int = 8, *, stack: int = 1, n: int = 2, length: int = 12,
               prioritized: bool = False, alpha: float = 0.6) -> RedisReplayConfig:
    return replace(config(capacity, chunk_length, stack=stack, n=n, prioritized=prioritized, alpha=alpha),
                   recurrent_hidden=HIDDEN, sequence_length=length)


def write_chunks(memory: Any, streams: dict[int, Stream], sizes: list[int], stateless: int = 0) -> list[tuple]:
    """Adds the streams' chunks interleaved, of ``sizes`` steps in turn; every chunk but each ``stateless``-th
    carries the recurrent state (so starts a sequence). Flushes a Redis memory; returns (sid, start, stop, state)."""
    adds = []
    cursor = dict.fromkeys(streams, 0)
    turn = 0
    while any(cursor[sid] < len(s) for sid, s in streams.items()):
        for sid, s in streams.items():
            if cursor[sid] < len(s):
                stop = min(cursor[sid] + sizes[turn % len(sizes)], len(s))
                state = not stateless or turn % stateless != stateless - 1
                memory.add(s.chunk(cursor[sid], stop, F32, state=state))
                adds.append((sid, cursor[sid], stop, state))
                cursor[sid] = stop
                turn += 1
    if isinstance(memory, RedisReplay):
        memory.flush()
    return adds


_SEQUENCE_FIELDS = ("frames", "actions", "rewards", "first", "last", "terminated", "mask", "recurrent_state",
                    "agent_ids")


def sequences_by_start(memory: ReplayMemory, streams: dict[int, Stream], length: int, stack: int,
                       batches: int = 40, written: dict[int, int] | None = None,
                       ) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """Every sequence drawn in ``batches`` batches, checked against the oracle, by its (stream, start);
    ``written``: the steps of each stream a sequence may reach (default: all)."""
    upto = {sid: len(s) for sid, s in streams.items()} | (written or {})
    ends = {sid: (t, t) for sid, t in upto.items()}
    out: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for _ in range(batches):
        batch = memory.sample_sequences(32, length, stack, 0.5)
        for row, start in enumerate(check_sequences(batch, streams, F32, length, stack, ends)):
            seq = {name: getattr(batch, name)[row] for name in _SEQUENCE_FIELDS}
            if start in out:
                for name in _SEQUENCE_FIELDS:
                    np.testing.assert_array_equal(out[start][name], seq[name], err_msg=f"{start}: {name} changed")
            out[start] = seq
    return out


@pytest.mark.parametrize(("stack", "length", "sizes"), [(1, 12, [5, 3, 8, 4]), (2, 8, [8]), (4, 20, [6, 2, 7])])
def test_sequences_equal_the_embedded_memorys(memories: Any, stack: int, length: int, sizes: list[int]) -> None:
    # Lengths beyond a chunk: a sequence's lookahead spans several following chunks.
    streams = {sid: Stream.random(sid, agent=sid % 2, total=110, max_episode=30) for sid in (3, 4, 1029)}
    memory = memories(seq_config(chunk_length=8, stack=stack, n=2, length=length))
    adds = write_chunks(memory, streams, sizes, stateless=5)
    embedded = new_memory(4096, recurrent_hidden=HIDDEN)
    try:
        write_chunks(embedded, streams, sizes, stateless=5)
        expected = sequences_by_start(embedded, streams, length, stack)
    finally:
        embedded.close()
        embedded.unlink()
    got = sequences_by_start(memory, streams, length, stack)
    # Exactly the chunks that carry a state start sequences, and all of them are drawn from both memories.
    assert set(got) == set(expected) == {(sid, start) for sid, start, _, state in adds if state}
    for start, seq in got.items():
        for name in _SEQUENCE_FIELDS:
            np.testing.assert_array_equal(seq[name], expected[start][name], err_msg=f"{start}: {name}")
            assert seq[name].dtype == expected[start][name].dtype, name
    ended = [start for start, seq in got.items() if not seq["mask"].all() and seq["last"].any()]
    unwritten = [(sid, t) for sid, t in got if t + length > len(streams[sid]) and not streams[sid].last[t:].any()]
    assert ended and unwritten, "no sequence ran past an episode end and past the stream's newest step"
    # Transitions are unchanged by the longer lookahead.
    allowed = samplable(streams, [(sid, a, b) for sid, a, b, _ in adds], capacity=10**6, n=2, stack=stack)
    assert covered(memory, streams, F32, 2, stack) == allowed


def test_chunks_wait_for_a_sequences_worth_of_steps(memories: Any) -> None:
    # Chunks of 4 steps, sequences of 10: a chunk's 6 further steps are in the next two chunks.
    stream = Stream.from_episodes(0, 0, [30, 6], [True])
    memory = memories(seq_config(chunk_length=4, n=1, length=10))
    inserted = []
    for start in range(0, 36, 4):
        memory.add(stream.chunk(start, start + 4, F32, state=True))
        inserted.append(memory.stats().inserted)
    # Step 29 ends the episode: the chunks before it need nothing after it, and are written with the chunk that
    # holds it; that chunk still waits for step 32 (the new episode's n-step return at step 31).
    assert inserted == [0, 0, 4, 8, 12, 16, 20, 28, 32]
    memory.flush()
    assert memory.stats().inserted == 36
    got = sequences_by_start(memory, {0: stream}, 10, 1, batches=10)
    assert set(got) == {(0, t) for t in range(0, 36, 4)}
    assert got[(0, 28)]["mask"].tolist() == [True, True] + [False] * 8  # ends with the episode (step 29)
    assert got[(0, 32)]["mask"].tolist() == [True] * 4 + [False] * 6  # the stream's newest steps at the flush


def test_a_retried_add_stores_nothing_twice(memories: Any) -> None:
    stream = Stream.from_episodes(0, 2, [17, 5], [False])  # the last step of the first episode is step 16
    memory = memories(seq_config(chunk_length=4, n=1, length=10, stack=2))
    write = memory._write
    calls = {"n": 0}
    failing = {3, 4, 6}  # the writes of the add that ends the episode, and one more

    def flaky(**kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] in failing:
            raise redis.ConnectionError("connection reset (injected)")  # before the server applied anything
        return write(**kwargs)

    memory._write = flaky
    retries = 0
    for start in range(0, 22, 3):  # chunks of 3 steps: each held chunk waits for up to three more
        chunk = stream.chunk(start, min(start + 3, 22), F32, state=True)
        while True:
            try:
                memory.add(chunk)
                break
            except redis.ConnectionError:
                retries += 1
    memory.flush()
    assert retries == len(failing)
    assert memory.stats().inserted == 22
    embedded = new_memory(256, recurrent_hidden=HIDDEN)
    try:
        for start in range(0, 22, 3):
            embedded.add(stream.chunk(start, min(start + 3, 22), F32, state=True))
        expected = sequences_by_start(embedded, {0: stream}, 10, 2, batches=10)
    finally:
        embedded.close()
        embedded.unlink()
    got = sequences_by_start(memory, {0: stream}, 10, 2, batches=10)
    assert set(got) == set(expected) == {(0, t) for t in range(0, 22, 3)}
    for start, seq in got.items():
        for name in _SEQUENCE_FIELDS:
            np.testing.assert_array_equal(seq[name], expected[start][name], err_msg=f"{start}: {name}")


def test_a_broken_stream_writes_what_it_holds(memories: Any) -> None:
    stream = Stream.from_episodes(0, 0, [40], [])
    memory = memories(seq_config(chunk_length=4, n=1, length=10, stack=2))
    for start in (0, 4, 8):
        memory.add(stream.chunk(start, start + 4, F32, state=True))
    assert memory.stats().inserted == 4  # steps 0..3 have their 6 further steps, 4..11 wait
    memory.break_stream(0)  # steps 12..15 were dropped
    assert memory.stats().inserted == 12
    memory.add(stream.chunk(16, 20, F32, state=True))
    memory.flush()
    got = sequences_by_start(memory, {0: stream}, 10, 2, batches=10, written={0: 12})
    # No sequence runs into the gap; step 16 cannot start one: its stack needs step 15, which never came.
    assert set(got) == {(0, 0), (0, 4), (0, 8)}
    assert got[(0, 4)]["mask"].tolist() == [True] * 8 + [False] * 2
    assert got[(0, 8)]["mask"].tolist() == [True] * 4 + [False] * 6


def test_sequence_priorities_change_the_frequencies(memories: Any) -> None:
    stream = Stream.random(5, 0, 200)
    memory = memories(seq_config(chunk_length=10, n=1, length=6, prioritized=True, alpha=1.0))
    for start in range(0, 200, 10):
        memory.add(stream.chunk(start, start + 10, F32, state=True))
    memory.flush()
    batch = memory.sample_sequences(64, 6, 1, 0.0)
    assert ((batch.keys & SEQUENCE_KEY) != 0).all() and SEQUENCE_KEY == SHARED_SEQUENCE_KEY
    starts = dict(zip(batch.keys.tolist(), check_sequences(batch, {5: stream}, F32, 6, 1, {5: (200, 200)}),
                      strict=True))
    favourite = batch.keys[0]
    others = np.setdiff1d(batch.keys, [favourite])
    # One call with transition and sequence keys: each goes to its own priority.
    transitions = memory.sample(8, 1, GAMMA, 1, 0.0)
    keys = np.concatenate([[favourite], others, transitions.keys])
    memory.update_priorities(keys, np.concatenate([[1000.0], np.full(others.size, 1e-3), np.full(8, 5.0)]))
    again = memory.sample_sequences(64, 6, 1, 1.0)
    assert (again.keys == favourite).mean() > 0.5
    assert math.isclose(float(again.weights.max()), 1.0)
    assert again.weights[again.keys == favourite].max() == again.weights.min()
    assert check_sequences(again, {5: stream}, F32, 6, 1, {5: (200, 200)})[0] in starts.values()
    # Every step's transition priority is still the initial one but the 8 updated to 5.
    step_draws = np.concatenate([memory.sample(64, 1, GAMMA, 1, 0.0).keys for _ in range(20)])
    assert np.isin(step_draws, transitions.keys).mean() > 0.05


def test_sequences_need_recurrent_hidden_and_fit_what_is_stored(memories: Any) -> None:
    stream = Stream.from_episodes(0, 0, [40], [])
    plain = memories(config(chunk_length=8, stack=1, n=1))
    with pytest.raises(RuntimeError, match="created without recurrent_hidden"):
        plain.sample_sequences(4, 4, 1, 0.0)
    plain.add(stream.chunk(0, 8, F32, state=True))  # a state where no sequences are kept: refused
    assert plain.stats().rejected == 1
    name = uuid.uuid4().hex
    memory = memories(seq_config(chunk_length=8, stack=2, n=1, length=12), name=name)
    memory.add(replace(stream.chunk(0, 8, F32, state=True), recurrent_state=np.zeros((2, HIDDEN + 1), np.float32)))
    assert memory.stats().rejected == 1
    with pytest.raises(ValueError, match="sequences of up to 12 steps with stack <= 2"):
        memory.sample_sequences(4, 13, 1, 0.0)
    with pytest.raises(ValueError, match="sequences of up to 12 steps with stack <= 2"):
        memory.sample_sequences(4, 12, 3, 0.0)
    with pytest.raises(MemoryNotReady, match="could not draw 4 valid sequences"):
        memory.sample_sequences(4, 12, 1, 0.0)
    # Clients must agree on sequences too: without them, or of another length.
    with pytest.raises(ValueError, match="the Redis memory was created with"):
        memories(config(chunk_length=8, stack=2, n=1), name=name)
    with pytest.raises(ValueError, match="the Redis memory was created with"):
        memories(seq_config(chunk_length=8, stack=2, n=1, length=16), name=name)
    with pytest.raises(ValueError, match="needs recurrent_hidden"):
        replace(config(), sequence_length=8)


# ------------------------------------------------------------------------------------------ sample ages
def test_sample_ages_count_the_steps_inserted_after_the_start(memories: Any) -> None:
    stream = Stream.from_episodes(0, 0, [200], [])  # one stream: a step's insertion index is its index
    memory = memories(config(capacity=32, chunk_length=8, stack=1, n=1))
    # Chunks of 8, 5, 8 and 3 steps into a ring of 4 slots, checked after every add: while the ring fills, once it
    # wraps, and with chunks of any length in it. The newest chunk waits for the step after it (its lookahead):
    # the memory counts it in when it stores it.
    start, sizes = 0, itertools.cycle([8, 5, 8, 3])
    while start < 200:
        stop = min(start + next(sizes), 200)
        memory.add(stream.chunk(start, stop, F32))
        inserted = memory.stats().inserted
        assert inserted == start  # all but the chunk just added
        if inserted > 8:
            batch = memory.sample(32, 1, GAMMA, 1, 0.5)
            starts = check_transitions(batch, {0: stream}, F32, 1, 1)
            assert batch.ages.tolist() == [inserted - 1 - t for _, t in starts], f"{inserted} steps stored"
        start = stop
    memory.flush()
    seen = set()
    for _ in range(10):
        batch = memory.sample(32, 1, GAMMA, 1, 0.5)
        starts = check_transitions(batch, {0: stream}, F32, 1, 1)
        assert batch.ages.tolist() == [199 - t for _, t in starts]
        seen.update(starts)
    # The newest 4 chunks hold steps 176..199 (5 + 3 + 8 + 8); step 199 starts nothing.
    assert seen == {(0, t) for t in range(176, 199)}


def test_sample_ages_count_steps_stored_after_the_samplers_view(memories: Any) -> None:
    name = uuid.uuid4().hex
    writer = memories(config(stack=1, n=1), name=name)
    old, new = Stream.from_episodes(0, 0, [64], []), Stream.from_episodes(1, 1, [16], [])
    write_streams(writer, {0: old}, chunk_length=8)
    sampler = memories(config(stack=1, n=1), name=name)
    sampler._refresh_s = 3600.0  # its view of the slots stays as first read
    batch = sampler.sample(32, 1, GAMMA, 1, 0.5)
    assert batch.ages.tolist() == [63 - t for _, t in check_transitions(batch, {0: old}, F32, 1, 1)]
    write_streams(writer, {1: new}, chunk_length=8)
    # Drawn from the same view, the old steps are 16 steps older: ages count from the fetch, not the view.
    batch = sampler.sample(32, 1, GAMMA, 1, 0.5)
    assert batch.ages.tolist() == [79 - t for _, t in check_transitions(batch, {0: old}, F32, 1, 1)]


def test_sample_ages_equal_the_embedded_memorys(memories: Any) -> None:
    # Every chunk ends an episode, so the Redis writer holds none back: both memories insert the chunks in the
    # order they are added. 3 streams of 6 chunks of 8 steps into rings of 64 steps (8 chunks): wrapped twice.
    streams = {sid: Stream.from_episodes(sid, sid, [8] * 6, [sid != 1] * 6) for sid in range(3)}
    adds = [(sid, start, start + 8) for start in range(0, 48, 8) for sid in streams]
    order = insertion_order(adds)
    redis_memory = memories(seq_config(capacity=64, chunk_length=8, stack=2, n=2, length=6))
    embedded = new_memory(64, recurrent_hidden=HIDDEN)
    try:
        ages: list[dict[tuple[str, int, int], int]] = []
        for memory in (redis_memory, embedded):
            for sid, start, stop in adds:
                memory.add(streams[sid].chunk(start, stop, F32, state=True))
            by_start: dict[tuple[str, int, int], int] = {}
            for _ in range(20):
                batch = memory.sample(32, 2, GAMMA, 2, 0.5)
                sequences = memory.sample_sequences(8, 6, 2, 0.5)
                drawn = {"transition": (batch, check_transitions(batch, streams, F32, 2, 2)),
                         "sequence": (sequences, check_sequences(sequences, streams, F32, 6, 2,
                                                                 {sid: (48, 48) for sid in streams}))}  # fmt: skip
                for kind, (sampled, starts) in drawn.items():
                    assert sampled.ages.tolist() == [len(order) - 1 - order[start] for start in starts], kind
                    by_start.update(((kind, *start), age) for start, age in zip(starts, sampled.ages.tolist(),
                                                                                strict=True))  # fmt: skip
            ages.append(by_start)
    finally:
        embedded.close()
        embedded.unlink()
    common = ages[0].keys() & ages[1].keys()
    assert len(common) >= 0.9 * min(len(ages[0]), len(ages[1])) and {kind for kind, _, _ in common} == {
        "transition", "sequence"}
    assert all(ages[0][key] == ages[1][key] for key in common)
