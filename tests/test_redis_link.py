"""An agent's link to the Redis memory (background writer and sampler, local buffer, reconnects), against a real
redis-server that the tests kill (SIGKILL) and restart. Every sampled batch is checked by the embedded memory's
oracle (frames encode stream and step), and what Redis holds is read back chunk by chunk.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import shutil
import uuid
from typing import Any

import numpy as np
import pytest
import redis

from borgdqn.memory.codec import decode_chunk
from borgdqn.memory.protocol import MemoryNotReady
from borgdqn.memory.redis_link import LinkSettings, RedisLink
from borgdqn.memory.redis_replay import RedisReplay, RedisReplayConfig
from borgdqn.memory.shared import SharedReplay
from tests.conditions import eventually
from tests.harness.redis import RedisServer
from tests.test_replay_shared import GAMMA, U8_SMALL, Codec, Stream, check_transitions, insertion_order

pytestmark = pytest.mark.integration

N, STACK, CHUNK = 3, 4, 16


def shape(capacity: int = 8192, prioritized: bool = True) -> RedisReplayConfig:
    return RedisReplayConfig(capacity=capacity, chunk_length=CHUNK, frame_shape=U8_SMALL.shape,
                             frame_dtype=U8_SMALL.dtype, prioritized=prioritized, alpha=0.6, priority_eps=1e-6,
                             context=STACK - 1, lookahead=N)


def open_link(url: str, name: str, cfg: RedisReplayConfig, *, seed: int = 0, local_capacity: int = 2048,
              settings: LinkSettings | None = None) -> RedisLink:
    local = SharedReplay.create(local_capacity, U8_SMALL.shape, np.dtype(U8_SMALL.dtype), prioritized=cfg.prioritized,
                                alpha=cfg.alpha, priority_eps=cfg.priority_eps, max_streams=64, seed=seed)
    return RedisLink(lambda: RedisReplay.connect(url, name, cfg, seed=seed, timeout_s=10), local, settings)


def chunks_of(streams: list[Stream], seed: int) -> list[Any]:
    """Every stream cut into chunks of 1..CHUNK steps, interleaved at random (each stream's in order)."""
    rng = np.random.default_rng(seed)
    queues = []
    for s in streams:
        cuts = np.cumsum(rng.integers(1, CHUNK + 1, len(s)))
        bounds = [0, *cuts[cuts < len(s)].tolist(), len(s)]
        queues.append([s.chunk(a, b, U8_SMALL) for a, b in itertools.pairwise(bounds)])
    out = []
    while any(queues):
        out.append(queues[int(rng.choice([i for i, q in enumerate(queues) if q]))].pop(0))
    return out


def span(chunk: Any) -> tuple[int, int, int]:
    """(stream, first step, last step + 1) of a chunk, read from its frames."""
    _, steps = U8_SMALL.decode(chunk.frames)
    return chunk.stream_id, int(steps[0]), int(steps[-1]) + 1


def stored_steps(url: str, name: str, cfg: RedisReplayConfig, codec: Codec,
                 streams: dict[int, Stream]) -> list[tuple[int, int]]:
    """Every step the Redis memory holds as its chunks' own steps, each checked against its stream (frame intact,
    action, reward and flags right, agent right); returns their (stream, step) in slot order."""
    client = redis.Redis.from_url(url)
    try:
        head = int(client.get(f"borg:{{{name}}}:head") or 0)
        gseq = np.frombuffer(client.get(f"borg:{{{name}}}:gseq") or b"", dtype="<i8")
        out = []
        for slot in range(min(head, cfg.slots)):
            data = client.get(f"borg:{{{name}}}:c:{slot}")
            assert data is not None and gseq[slot] >= 0, f"slot {slot} is empty below head {head}"
            decoded = decode_chunk(data, codec.shape, np.dtype(codec.dtype))
            c = decoded.chunk
            own = slice(decoded.context_steps, len(c) - decoded.lookahead_steps)
            assert codec.intact(c.frames).all(), f"slot {slot}: corrupt frame"
            sids, idx = codec.decode(c.frames)
            assert (sids == c.stream_id).all() and (np.diff(idx) == 1).all(), f"slot {slot}: steps not consecutive"
            s = streams[c.stream_id]
            t = idx[own]
            assert (c.actions[own] == s.actions[t]).all() and (c.rewards[own] == s.rewards[t]).all()
            assert (c.first[own] == s.first[t]).all() and (c.last[own] == s.last[t]).all()
            assert (c.terminated[own] == s.terminated[t]).all() and c.agent_id == s.agent
            out += [(c.stream_id, int(i)) for i in t]
        return out
    finally:
        client.close()


def test_the_link_writes_everything_and_serves_batches_drawn_from_redis(redis_server: RedisServer) -> None:
    name, cfg = uuid.uuid4().hex, shape()
    streams = {s.sid: s for s in (Stream.random(sid, agent=1, total=600, max_episode=60) for sid in (10, 11))}
    link = open_link(redis_server.url, name, cfg)
    try:
        for chunk in chunks_of(list(streams.values()), seed=1):
            link.add(chunk)
        eventually(lambda: link.stats().inserted >= 1100, "most steps in Redis")
        remote = 0
        for _ in range(60):
            batch = link.sample(32, N, GAMMA, STACK, 0.5)
            check_transitions(batch, streams, U8_SMALL, N, STACK)
            assert (batch.keys >= 0).all() or (batch.keys < 0).all(), "one batch comes from one memory"
            remote += int((batch.keys >= 0).all())
            link.update_priorities(batch.keys, np.arange(32, dtype=np.float64))
        assert remote > 0 and link.counters.remote_batches == remote
    finally:
        link.close()
    # Close wrote every step (the held-back chunks included), each intact, none twice.
    steps = stored_steps(redis_server.url, name, cfg, U8_SMALL, streams)
    assert sorted(steps) == sorted((sid, t) for sid, s in streams.items() for t in range(len(s)))
    # The learner's priorities reached Redis: no longer all equal to the first one every step got.
    prio = np.frombuffer(redis.Redis.from_url(redis_server.url).get(f"borg:{{{name}}}:prio") or b"", dtype="<f4")
    assert len(set(prio[prio > 0].tolist())) > 2


def test_learning_goes_on_while_redis_is_away_and_its_contents_survive_a_crash(
        redis_server_aof: RedisServer) -> None:
    server, name, cfg = redis_server_aof, uuid.uuid4().hex, shape()
    streams = {s.sid: s for s in (Stream.random(sid, agent=2, total=900, max_episode=60) for sid in (20, 21))}
    chunks = chunks_of(list(streams.values()), seed=2)
    half = len(chunks) // 2
    link = open_link(server.url, name, cfg, settings=LinkSettings(stall_s=0.5, backoff_max_s=0.5))
    client = redis.Redis.from_url(server.url)
    try:
        for chunk in chunks[:half]:
            link.add(chunk)
        eventually(lambda: link.queued == 0, "the first half written")
        head_before = int(client.get(f"borg:{{{name}}}:head") or 0)
        kept_before = stored_steps(server.url, name, cfg, U8_SMALL, streams)

        server.kill()
        # Acting and learning go on: adds return, batches come from the local buffer, all of them right.
        for chunk in chunks[half:]:
            link.add(chunk)
        local = 0
        # The local buffer took every chunk in the order added (it holds them all): its batches' ages count that.
        order = insertion_order([span(chunk) for chunk in chunks])
        for _ in range(10):
            batch = link.sample(32, N, GAMMA, STACK, 0.5)
            starts = check_transitions(batch, streams, U8_SMALL, N, STACK)
            if (batch.keys < 0).all():
                local += 1
                assert batch.ages.tolist() == [len(order) - 1 - order[start] for start in starts]
            link.update_priorities(batch.keys, np.ones(32))
        assert local >= 5, "while Redis is away the learner draws from the local buffer"
        eventually(lambda: link.away, "the link noticing the outage")

        server.launch()
        # AOF (appendfsync always): every chunk acknowledged before the crash is there after the restart.
        head_after = int(client.get(f"borg:{{{name}}}:head") or 0)
        assert head_after >= head_before
        assert stored_steps(server.url, name, cfg, U8_SMALL, streams)[: len(kept_before)] == kept_before
        # The link reconnects by itself, writes what it queued, and serves Redis batches again.
        eventually(lambda: not link.away and link.queued == 0, "the queued half written", 60)
        eventually(lambda: (link.sample(32, N, GAMMA, STACK, 0.5).keys >= 0).all(), "a batch from Redis again")
        assert link.counters.outages >= 1 and link.counters.dropped_chunks == 0
    finally:
        link.close()
        client.close()
    steps = stored_steps(server.url, name, cfg, U8_SMALL, streams)
    assert sorted(steps) == sorted((sid, t) for sid, s in streams.items() for t in range(len(s)))


def test_a_full_outbox_drops_the_oldest_chunks_and_no_transition_spans_the_gap(
        redis_server_aof: RedisServer) -> None:
    server, name, cfg = redis_server_aof, uuid.uuid4().hex, shape(prioritized=False)
    stream = Stream.from_episodes(30, 3, [400], [])  # one long episode: a gap would be sampled across
    chunks = [stream.chunk(a, a + CHUNK, U8_SMALL) for a in range(0, 400, CHUNK)]
    link = open_link(server.url, name, cfg, settings=LinkSettings(outbox_chunks=4, backoff_max_s=0.5))
    try:
        for chunk in chunks[:5]:
            link.add(chunk)
            eventually(lambda: link.queued == 0, "a chunk written")
        server.kill()
        for chunk in chunks[5:15]:
            link.add(chunk)
        server.launch()
        eventually(lambda: not link.away and link.queued == 0, "the queued chunks written", 60)
        assert link.counters.dropped_chunks == 6
        for chunk in chunks[15:]:
            link.add(chunk)
            eventually(lambda: link.queued == 0, "a chunk written")
    finally:
        link.close()
    kept = {t for _, t in stored_steps(server.url, name, cfg, U8_SMALL, {30: stream})}
    # Six whole chunks went, all from those added while Redis was down: the oldest queued, bar the one the writer
    # had started on (so the lost chunks form one run, or two around that one when the writer picked it up
    # between the drops).
    lost_chunks = sorted({t // CHUNK for t in set(range(400)) - kept})
    assert len(lost_chunks) == 6 and set(lost_chunks) <= set(range(5, 15))
    assert not {t for c in lost_chunks for t in range(c * CHUNK, (c + 1) * CHUNK)} & kept
    gaps = [(c * CHUNK, (c + 1) * CHUNK) for c in lost_chunks]
    # Sampled from Redis, every transition is right (the oracle would catch frames from across a gap) and
    # none starts where its stack or n steps would need a dropped step.
    memory = RedisReplay.connect(server.url, name, cfg)
    try:
        starts: set[int] = set()
        for _ in range(60):
            starts |= {t for _, t in check_transitions(memory.sample(64, N, GAMMA, STACK, 0.5), {30: stream},
                                                       U8_SMALL, N, STACK)}
        assert not {t for t in starts for lo, hi in gaps if lo - N <= t < hi + STACK - 1}
        assert {t for t in starts if t < gaps[0][0] - N} and {t for t in starts if t >= gaps[-1][1] + STACK - 1}
    finally:
        memory.close()


def test_a_restart_that_lost_the_memory_gets_its_layout_back(redis_server_aof: RedisServer) -> None:
    server, name, cfg = redis_server_aof, uuid.uuid4().hex, shape()
    stream = Stream.random(40, agent=4, total=300, max_episode=50)
    chunks = chunks_of([stream], seed=4)
    link = open_link(server.url, name, cfg, settings=LinkSettings(backoff_max_s=0.5))
    try:
        for chunk in chunks[:5]:
            link.add(chunk)
        eventually(lambda: link.stats().inserted > 0, "a first write")
        server.kill()
        shutil.rmtree(server.workdir / "appendonlydir")  # a restart with nothing to load
        server.launch()
        for chunk in chunks[5:]:
            link.add(chunk)
        eventually(lambda: not link.away and link.queued == 0, "writes into the recreated memory", 60)
    finally:
        link.close()
    # The layout is whole again (gseq -1 where empty): what was written after the restart reads back right, once.
    steps = stored_steps(server.url, name, cfg, U8_SMALL, {40: stream})
    after = {t for c in chunks[5:] for t in U8_SMALL.decode(c.frames)[1].tolist()}
    assert len(steps) == len(set(steps)) and {t for _, t in steps} >= after


# ------------------------------------------------------------------------------------------ agent processes
def _agent(url: str, name: str, agent: int, start: Any, out: Any) -> None:
    """An agent's memory traffic: writes its two streams through a link, sampling (and checking) as it goes."""
    checked, remote, error = 0, 0, ""
    # An outbox that holds everything: this test is about concurrency, not about dropping while Redis is away.
    link = open_link(url, name, shape(capacity=131_072), seed=agent, settings=LinkSettings(outbox_chunks=10_000))
    try:
        mine = [Stream.random(agent * 1024 + e, agent, 3000) for e in range(2)]
        known = {s.sid: s for s in mine}
        rng = np.random.default_rng(agent)
        start.wait(timeout=120)
        for i, chunk in enumerate(chunks_of(mine, seed=agent)):
            link.add(chunk)
            if i % 4 != 3 or i < 64:
                continue
            try:
                batch = link.sample(32, N, GAMMA, STACK, 0.4)
            except MemoryNotReady:
                continue  # neither Redis nor the local buffer holds enough yet
            else:
                # Other agents' streams are checked too: every stream is a pure function of its id.
                for sid in set(U8_SMALL.decode(batch.obs)[0][:, -1].tolist()) - known.keys():
                    known[sid] = Stream.random(sid, sid // 1024, 3000)
                checked += len(check_transitions(batch, known, U8_SMALL, N, STACK))
                remote += int((batch.keys >= 0).all())
                link.update_priorities(batch.keys, rng.random(32) * 3)
    except Exception as err:
        error = f"{err.__class__.__name__}: {err}"
    finally:
        link.close()
        if not error and link.counters.dropped_chunks:
            error = f"dropped {link.counters.dropped_chunks} chunks"
        out.put((agent, checked, remote, error))


@pytest.mark.parametrize("agents", [2, 4])
def test_agent_processes_writing_and_sampling_at_once_lose_and_corrupt_nothing(redis_server: RedisServer,
                                                                                 agents: int) -> None:
    name = uuid.uuid4().hex
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(agents), ctx.Queue()
    procs = [ctx.Process(target=_agent, args=(redis_server.url, name, a, start, results)) for a in range(agents)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
    assert [error for *_, error in outcomes] == [""] * agents
    assert all(p.exitcode == 0 for p in procs)
    assert all(checked > 0 and remote > 0 for _, checked, remote, _ in outcomes), outcomes
    streams = {s.sid: s for a in range(agents) for s in (Stream.random(a * 1024 + e, a, 3000) for e in range(2))}
    cfg = shape(capacity=131_072)  # a slot per chunk (1..16 steps each): room for every one of them
    steps = stored_steps(redis_server.url, name, cfg, U8_SMALL, streams)
    assert sorted(steps) == sorted((sid, t) for sid in streams for t in range(3000)), "a step lost or doubled"
    memory = RedisReplay.connect(redis_server.url, name, cfg)
    try:
        stats = memory.stats()
        assert stats.inserted == stats.size == agents * 2 * 3000 and stats.rejected == 0
        assert stats.per_agent == dict.fromkeys(range(agents), 6000)
        assert stats.sampled >= sum(checked for _, checked, _, _ in outcomes if checked) // 2
    finally:
        memory.close()
