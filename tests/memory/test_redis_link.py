"""The hive's log in Redis and each agent's replica of it (writer and tail threads, outbox, reconnects), against
a real redis-server that the tests kill (SIGKILL) and restart. Every sampled batch is checked by the embedded
memory's oracle (frames encode stream and step); what the log holds is read back entry by entry and compared
with what every replica holds.
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

from borgdqn.memory.codec import decode_chunk, encode_chunk
from borgdqn.memory.protocol import MemoryNotReady, SamplingSpec
from borgdqn.memory.redis.keys import LogShape, read_state
from borgdqn.memory.redis.link import LinkSettings, RedisLink
from borgdqn.memory.redis.tail import LogTail
from borgdqn.memory.redis.writer import LogShapeMismatch, LogWriter
from borgdqn.memory.shared import SharedReplay
from tests.harness.redis import RedisServer
from tests.support.conditions import eventually
from tests.support.replay_oracle import (
    GAMMA,
    U8_SMALL,
    Codec,
    Stream,
    check_sequences,
    check_transitions,
    draw,
    draw_sequences,
)

pytestmark = pytest.mark.integration

N, STACK, CHUNK = 3, 4, 16


def shape(capacity: int = 8192, recurrent_hidden: int = 0) -> LogShape:
    return LogShape(capacity=capacity, chunk_length=CHUNK, frame_shape=U8_SMALL.shape,
                    frame_dtype=np.dtype(U8_SMALL.dtype).str, recurrent_hidden=recurrent_hidden)


def open_link(url: str, name: str, log_shape: LogShape, *, seed: int = 0, prioritized: bool = True,
              settings: LinkSettings | None = None) -> RedisLink:
    replica = SharedReplay.create(log_shape.capacity, U8_SMALL.shape, np.dtype(U8_SMALL.dtype),
                                  prioritized=prioritized, alpha=0.6, priority_eps=1e-6,
                                  recurrent_hidden=log_shape.recurrent_hidden or None, seed=seed, private=True)
    return RedisLink(lambda: redis.Redis.from_url(url), name, log_shape, replica, label=f"agent-{seed}",
                     settings=settings or LinkSettings(backoff_max_s=0.5))


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


def log_steps(url: str, name: str, codec: Codec, streams: dict[int, Stream]) -> list[tuple[int, int]]:
    """Every step the log holds, each checked against its stream (frame intact, action, reward, flags and agent
    right); returns their (stream, step) in log order."""
    client = redis.Redis.from_url(url)
    try:
        out = []
        for _, fields in client.xrange(f"borg:{{{name}}}:log"):
            decoded = decode_chunk(fields[b"d"], codec.shape, np.dtype(codec.dtype))
            c = decoded.chunk
            assert decoded.context_steps == decoded.lookahead_steps == 0, "no borrowed steps in the log"
            assert codec.intact(c.frames).all(), "corrupt frame"
            sids, idx = codec.decode(c.frames)
            assert (sids == c.stream_id).all() and (np.diff(idx) == 1).all(), "steps not consecutive"
            s = streams[c.stream_id]
            assert (c.actions == s.actions[idx]).all() and (c.rewards == s.rewards[idx]).all()
            assert (c.first == s.first[idx]).all() and (c.last == s.last[idx]).all()
            assert (c.terminated == s.terminated[idx]).all() and c.agent_id == s.agent
            out += [(c.stream_id, int(i)) for i in idx]
        return out
    finally:
        client.close()


def replica_steps(link: RedisLink) -> list[tuple[int, int]]:
    """The (stream, step) of every step the link's replica holds, in the order the replica took them in."""
    return replica_steps_of(link.replica)


def replica_steps_of(replica: SharedReplay) -> list[tuple[int, int]]:
    x = replica._x  # the test reads the replica's arrays directly: no sampling luck involved
    live = np.flatnonzero(x.seq >= 0)
    order = live[np.argsort(x.seq[live])]
    sids, idx = U8_SMALL.decode(x.frames[order])
    return list(zip(sids.tolist(), idx.tolist(), strict=True))


def replicated(link: RedisLink, url: str, name: str) -> bool:
    """The link has nothing queued and its tail has read the whole log."""
    return link.queued == 0 and link.cursor == read_state(redis.Redis.from_url(url), name).chunks


def test_every_replica_holds_exactly_the_log_after_writes_stop_even_once_it_has_lapped(
        redis_server: RedisServer) -> None:
    name, log_shape = uuid.uuid4().hex, shape(capacity=2048)
    streams = {s.sid: s for s in (Stream.random(sid, agent=sid // 10, total=1500, max_episode=60)
                                  for sid in (10, 11, 20, 21))}
    links = [open_link(redis_server.url, name, log_shape, seed=i) for i in (1, 2)]
    try:
        for chunk in chunks_of(list(streams.values()), seed=1):
            link = links[chunk.agent_id - 1]
            link.add(chunk)
            # Appended before the next chunk: the log keeps the chunks' interleaving. Left to two writer threads
            # on a busy machine, one agent's chunks may all land before the other's, and the lapped log holds
            # only the other agent.
            eventually(lambda link=link: link.queued == 0, "the chunk appended", 30, 0.001)
        for link in links:
            eventually(lambda link=link: replicated(link, redis_server.url, name), "the log replicated", 60)
        held = log_steps(redis_server.url, name, U8_SMALL, streams)
        state = read_state(redis.Redis.from_url(redis_server.url), name)
        assert state.trimmed > 0 and state.inserted == 6000, "the log lapped"
        assert len(held) == state.size and log_shape.capacity - CHUNK < state.size <= log_shape.capacity
        assert state.per_agent == {a: sum(1 for sid, _ in held if sid // 10 == a) for a in (1, 2)}
        for link in links:
            # Same steps, same order (per stream and overall); the replica may keep the tail of one older chunk.
            steps = replica_steps(link)
            assert steps[-len(held):] == held and len(steps) - len(held) < CHUNK
            assert link.counters.dropped_chunks == 0 and link.snapshot().bad_chunks == 0
            # What the learner samples is right (frames, returns, stacks, episode cuts) and from both agents.
            agents: set[int] = set()
            for _ in range(20):
                batch = draw(link, 32, N, GAMMA, STACK, 0.5)
                check_transitions(batch, streams, U8_SMALL, N, STACK)
                link.update_priorities(batch.keys, np.arange(32, dtype=np.float64))
                agents |= set(batch.agent_ids.tolist())
            assert agents == {1, 2}
    finally:
        for link in links:
            link.close()


def test_hostile_bytes_in_the_log_are_counted_skipped_and_cut_their_stream(redis_server: RedisServer) -> None:
    name, log_shape = uuid.uuid4().hex, shape()
    stream = Stream.from_episodes(30, 3, [400], [])  # one long episode: a gap would be sampled across
    chunks = [stream.chunk(a, a + CHUNK, U8_SMALL) for a in range(0, 400, CHUNK)]
    client = redis.Redis.from_url(redis_server.url)
    writer = LogWriter(client, name, log_shape)
    writer.declare()
    good = [encode_chunk(c, chunk_seq=i) for i, c in enumerate(chunks)]
    hostile = [b"", b"\x00" * 40, good[11][: len(good[11]) // 2], good[12][:-3] + b"\xff\xff\xff"]
    # Chunks 11 and 12 reach the log only as hostile bytes: truncated, corrupted; two more are pure noise.
    writer.append([(data, 3, CHUNK) for data in good[:11]])
    writer.append([(data, 3, CHUNK) for data in hostile])
    writer.append([(data, 3, CHUNK) for data in good[13:]])
    link = open_link(redis_server.url, name, log_shape, prioritized=False)
    try:
        eventually(lambda: replicated(link, redis_server.url, name), "the log replicated")
        assert link.snapshot().bad_chunks == len(hostile)
        kept = {t for _, t in replica_steps(link)}
        assert kept == set(range(400)) - set(range(11 * CHUNK, 13 * CHUNK)), "only the good chunks, all of them"
        starts: set[int] = set()
        for _ in range(60):
            starts |= {t for _, t in check_transitions(draw(link, 64, N, GAMMA, STACK, 0.5), {30: stream},
                                                       U8_SMALL, N, STACK)}
        # The stream was cut at the gap: no transition's n steps or stack reach across it.
        assert not {t for t in starts if 11 * CHUNK - N <= t < 13 * CHUNK + STACK - 1}
        assert {t for t in starts if t < 11 * CHUNK - N} and {t for t in starts if t >= 13 * CHUNK + STACK - 1}
        assert link.stats().rejected == 0, "nothing hostile reached the replica"
    finally:
        link.close()
        client.close()


def test_a_tail_that_falls_behind_the_log_counts_exactly_what_it_skipped(redis_server: RedisServer) -> None:
    name, log_shape = uuid.uuid4().hex, shape(capacity=8 * CHUNK)
    stream = Stream.from_episodes(60, 6, [24 * CHUNK], [])
    chunks = [stream.chunk(a, a + CHUNK, U8_SMALL) for a in range(0, 24 * CHUNK, CHUNK)]
    client = redis.Redis.from_url(redis_server.url)
    writer = LogWriter(client, name, log_shape)
    writer.declare()
    # A replica larger than the log here, so that it still holds the steps before the gap.
    replica = SharedReplay.create(4 * log_shape.capacity, U8_SMALL.shape, np.dtype(U8_SMALL.dtype),
                                  prioritized=False, alpha=0.6, priority_eps=1e-6, private=True,
                                  spec=SamplingSpec(n_step=N, gamma=GAMMA, stack=STACK))
    tail = LogTail(redis.Redis.from_url(redis_server.url), name, log_shape, replica)
    try:
        writer.append([(encode_chunk(c, chunk_seq=i), 6, CHUNK) for i, c in enumerate(chunks[:4])])
        assert tail.catch_up() == 4 and tail.cursor == 4
        # 20 more chunks while the tail does not read: the log keeps the newest 8 (chunks 16..23, g 17..24).
        writer.append([(encode_chunk(c, chunk_seq=i + 4), 6, CHUNK) for i, c in enumerate(chunks[4:])])
        assert tail.poll(100) == 8
        assert tail.counters.skipped_chunks == 12 and tail.counters.cuts == 1 and tail.counters.bad_chunks == 0
        # The stream was cut at the gap: no transition reaches back from chunk 16 into chunk 3.
        held = sorted(t for _, t in replica_steps_of(replica))
        assert held == list(range(4 * CHUNK)) + list(range(16 * CHUNK, 24 * CHUNK))
        starts = {t for _ in range(40) for _, t in check_transitions(replica.sample(32, 0.4), {60: stream},
                                                                       U8_SMALL, N, STACK)}
        assert not {t for t in starts if 4 * CHUNK - N <= t < 16 * CHUNK + STACK - 1}
    finally:
        replica.close()
        client.close()


def test_learning_goes_on_while_redis_is_away_and_the_log_survives_a_crash(redis_server_aof: RedisServer) -> None:
    server, name, log_shape = redis_server_aof, uuid.uuid4().hex, shape()
    streams = {s.sid: s for s in (Stream.random(sid, agent=2, total=900, max_episode=60) for sid in (20, 21))}
    chunks = chunks_of(list(streams.values()), seed=2)
    half = len(chunks) // 2
    link = open_link(server.url, name, log_shape)
    try:
        for chunk in chunks[:half]:
            link.add(chunk)
        eventually(lambda: replicated(link, server.url, name), "the first half replicated")
        before = log_steps(server.url, name, U8_SMALL, streams)
        sampled_before = link.stats().sampled

        server.kill()
        # Acting and learning go on: adds return, batches come from the replica, all of them right.
        for chunk in chunks[half:]:
            link.add(chunk)
        for _ in range(10):
            batch = draw(link, 32, N, GAMMA, STACK, 0.5)
            check_transitions(batch, streams, U8_SMALL, N, STACK)
            link.update_priorities(batch.keys, np.ones(32))
        assert link.stats().sampled == sampled_before + 320
        eventually(lambda: link.away, "the link noticing the outage")

        server.launch()
        # AOF: every chunk acknowledged before the crash is in the log after the restart.
        assert log_steps(server.url, name, U8_SMALL, streams)[: len(before)] == before
        # The link reconnects by itself, appends what it queued, and its tail brings it into the replica.
        eventually(lambda: not link.away and replicated(link, server.url, name), "the queued half replicated", 60)
        counters = link.snapshot()
        assert counters.outages >= 1 and counters.away_s > 0
        assert counters.dropped_chunks == counters.skipped_chunks == counters.bad_chunks == 0
    finally:
        link.close()
    held = log_steps(server.url, name, U8_SMALL, streams)
    assert sorted(held) == sorted((sid, t) for sid, s in streams.items() for t in range(len(s)))


def test_a_full_outbox_drops_the_oldest_chunks_and_no_transition_spans_the_gap(
        redis_server_aof: RedisServer) -> None:
    server, name, log_shape = redis_server_aof, uuid.uuid4().hex, shape()
    stream = Stream.from_episodes(30, 3, [400], [])  # one long episode: a gap would be sampled across
    chunks = [stream.chunk(a, a + CHUNK, U8_SMALL) for a in range(0, 400, CHUNK)]
    link = open_link(server.url, name, log_shape, prioritized=False,
                     settings=LinkSettings(outbox_chunks=4, backoff_max_s=0.5))
    try:
        for chunk in chunks[:5]:
            link.add(chunk)
            eventually(lambda: link.queued == 0, "a chunk written")
        server.kill()
        for chunk in chunks[5:15]:
            link.add(chunk)
        server.launch()
        eventually(lambda: not link.away and link.queued == 0, "the queued chunks written", 60)
        assert link.counters.dropped_chunks == 6, "ten chunks into an outbox of four"
        for chunk in chunks[15:]:
            link.add(chunk)
            eventually(lambda: link.queued == 0, "a chunk written")
        eventually(lambda: replicated(link, server.url, name), "the log replicated")
        kept = {t for _, t in log_steps(server.url, name, U8_SMALL, {30: stream})}
        assert kept == {t for _, t in replica_steps(link)}
        lost_chunks = sorted({t // CHUNK for t in set(range(400)) - kept})
        assert len(lost_chunks) == 6 and set(lost_chunks) <= set(range(5, 15))
        gaps = [(c * CHUNK, (c + 1) * CHUNK) for c in lost_chunks]
        starts: set[int] = set()
        for _ in range(60):
            starts |= {t for _, t in check_transitions(draw(link, 64, N, GAMMA, STACK, 0.5), {30: stream},
                                                       U8_SMALL, N, STACK)}
        assert not {t for t in starts for lo, hi in gaps if lo - N <= t < hi + STACK - 1}
        assert {t for t in starts if t < gaps[0][0] - N} and {t for t in starts if t >= gaps[-1][1] + STACK - 1}
        assert link.snapshot().cuts >= 1
    finally:
        link.close()


def test_a_restart_that_lost_the_log_gets_it_back_and_every_tail_reads_it_again(
        redis_server_aof: RedisServer) -> None:
    server, name, log_shape = redis_server_aof, uuid.uuid4().hex, shape()
    stream = Stream.random(40, agent=4, total=300, max_episode=50)
    chunks = chunks_of([stream], seed=4)
    link = open_link(server.url, name, log_shape)
    try:
        for chunk in chunks[:5]:
            link.add(chunk)
        eventually(lambda: replicated(link, server.url, name), "a first write replicated")
        server.kill()
        shutil.rmtree(server.workdir / "appendonlydir")  # a restart with nothing to load
        server.launch()
        for chunk in chunks[5:]:
            link.add(chunk)
        eventually(lambda: not link.away and replicated(link, server.url, name), "the recreated log replicated", 60)
        after = {t for c in chunks[5:] for t in U8_SMALL.decode(c.frames)[1].tolist()}
        held = log_steps(server.url, name, U8_SMALL, {40: stream})
        assert {t for _, t in held} == after and len(held) == len(after)
        assert set(replica_steps(link)) >= set(held)
        assert link._tail.counters.resets == 1
    finally:
        link.close()


def test_lstm_sequences_sample_through_a_replica(redis_server: RedisServer) -> None:
    name, log_shape = uuid.uuid4().hex, shape(recurrent_hidden=3)
    streams = {sid: Stream.random(sid, 1, 118, max_episode=14) for sid in (7, 8)}
    link = open_link(redis_server.url, name, log_shape)
    try:
        for start in range(0, 118, 5):
            for s in streams.values():
                link.add(s.chunk(start, min(start + 5, 118), U8_SMALL, state=True))
        eventually(lambda: replicated(link, redis_server.url, name), "the log replicated")
        seen: set[tuple[int, int]] = set()
        for _ in range(20):
            batch = draw_sequences(link, 16, 8, 1, 0.5)
            seen |= set(check_sequences(batch, streams, U8_SMALL, 8, 1, {7: (118, 118), 8: (118, 118)}))
            link.update_priorities(batch.keys, np.ones(16))
        assert all(t % 5 == 0 for _, t in seen) and len(seen) >= 0.8 * 2 * 24
    finally:
        link.close()


def test_a_log_of_another_shape_is_refused_in_one_line(redis_server: RedisServer) -> None:
    name = uuid.uuid4().hex
    link = open_link(redis_server.url, name, shape())
    link.close()
    with pytest.raises(LogShapeMismatch, match="holds a log of another shape") as err:
        open_link(redis_server.url, name, shape(capacity=4096))
    assert "\n" not in str(err.value)


def test_the_learner_waits_for_its_replica_to_load_the_log(redis_server: RedisServer) -> None:
    name, log_shape = uuid.uuid4().hex, shape()
    stream = Stream.random(50, agent=5, total=4000, max_episode=100)
    writer = open_link(redis_server.url, name, log_shape, seed=5)
    try:
        for chunk in chunks_of([stream], seed=5):
            writer.add(chunk)
        eventually(lambda: replicated(writer, redis_server.url, name), "the log written")
    finally:
        writer.close()
    joiner = open_link(redis_server.url, name, log_shape, seed=6)
    try:
        # Until its replica holds the whole log, a joining learner gets MemoryNotReady (and acts on meanwhile).
        try:
            draw(joiner, 32, N, GAMMA, STACK, 0.5)
            assert joiner.caught_up, "a batch before the catch-up ended"
        except MemoryNotReady:
            pass
        loading = joiner.loading
        assert loading is None or 0.0 <= loading <= 1.0  # what the live view shows while it loads
        assert joiner.wait_caught_up(30)
        assert joiner.loading is None
        assert joiner.stats().size == 4000 and joiner.snapshot().catch_up_s > 0
        check_transitions(draw(joiner, 32, N, GAMMA, STACK, 0.5), {50: stream}, U8_SMALL, N, STACK)
    finally:
        joiner.close()


# ------------------------------------------------------------------------------------------ agent processes
STEPS = 3000


def _agent(url: str, name: str, agent: int, agents: int, start: Any, out: Any) -> None:
    """An agent's memory traffic: writes its two streams through a link, sampling (and checking) as it goes;
    at the end, waits for its replica to hold the whole log and reports what it holds and what it sampled."""
    checked, error, held, drawn = 0, "", [], np.zeros(agents, np.int64)
    # Uniform replicas: a learner's shares then follow what each agent wrote, not the priorities it set. An outbox
    # that holds everything: this test is about concurrency, not about drops.
    link = open_link(url, name, shape(capacity=65_536), seed=agent, prioritized=False,
                     settings=LinkSettings(outbox_chunks=10_000))
    try:
        mine = [Stream.random(agent * 1024 + e, agent, STEPS) for e in range(2)]
        known = {s.sid: s for a in range(agents) for s in (Stream.random(a * 1024 + e, a, STEPS) for e in range(2))}
        rng = np.random.default_rng(agent)
        start.wait(timeout=120)
        for i, chunk in enumerate(chunks_of(mine, seed=agent)):
            link.add(chunk)
            if i % 4 != 3 or i < 64:
                continue
            try:
                batch = draw(link, 32, N, GAMMA, STACK, 0.4)
            except MemoryNotReady:
                continue
            checked += len(check_transitions(batch, known, U8_SMALL, N, STACK))
            link.update_priorities(batch.keys, rng.random(32) * 3)
        eventually(lambda: link.queued == 0, "own chunks written", 120)
        start.wait(timeout=120)  # every agent has written everything
        eventually(lambda: replicated(link, url, name), "the log replicated", 120)
        held = replica_steps(link)
        for _ in range(50):  # after warm-up, what this learner draws, by agent
            drawn += np.bincount(draw(link, 64, N, GAMMA, STACK, 0.4).agent_ids, minlength=agents)
    except Exception as err:
        error = f"{err.__class__.__name__}: {err}"
    finally:
        link.close()
        out.put((agent, checked, error, held, drawn.tolist()))


@pytest.mark.parametrize("agents", [2, 4])
def test_agent_processes_share_one_log_and_every_learner_samples_every_agent(redis_server: RedisServer,
                                                                              agents: int) -> None:
    name = uuid.uuid4().hex
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(agents), ctx.Queue()
    procs = [ctx.Process(target=_agent, args=(redis_server.url, name, a, agents, start, results))
             for a in range(agents)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
    assert [error for _, _, error, _, _ in outcomes] == [""] * agents
    assert all(p.exitcode == 0 for p in procs) and all(checked > 0 for _, checked, *_ in outcomes)
    streams = {s.sid: s for a in range(agents) for s in (Stream.random(a * 1024 + e, a, STEPS) for e in range(2))}
    held = log_steps(redis_server.url, name, U8_SMALL, streams)
    assert sorted(held) == sorted((sid, t) for sid in streams for t in range(STEPS)), "a step lost or doubled"
    for _, _, _, replica, drawn in outcomes:
        assert replica == held, "every replica holds the log, in its order"
        shares = np.array(drawn) / sum(drawn)  # every agent wrote the same number of steps
        assert np.abs(shares - 1 / agents).max() < 0.05, shares
    state = read_state(redis.Redis.from_url(redis_server.url), name)
    assert state.inserted == state.size == agents * 2 * STEPS
    assert state.per_agent == dict.fromkeys(range(agents), 2 * STEPS)
