"""The Redis replay memory against a real redis-server (the harness's), checked by the embedded memory's oracle.

Frames encode (stream, step index), so every sampled stack and n-step window is checked step by step against
what the stream really was (``Stream`` and ``check_transitions`` from the embedded memory's tests).
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
import redis

from borgdqn.memory.codec import encode_chunk
from borgdqn.memory.protocol import ReplayMemory
from borgdqn.memory.redis_replay import RedisReplay, RedisReplayConfig
from borgdqn.proto.borg.v1 import experience_pb2 as pb
from tests.harness.process import free_port
from tests.harness.redis import RedisServer
from tests.test_replay_shared import F32, GAMMA, U8_SMALL, Codec, Stream, check_transitions, new_memory, samplable

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

