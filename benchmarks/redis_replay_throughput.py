"""The hive's Redis log and each agent's replica of it, measured on one real redis-server, in one run.

With real Pong frames (ale-py, random play, the agents' preprocessing: 84x84 uint8), stack 4, n-step 3, batch 32:

* **bytes**: a stored step in a chunk of the log (own steps only) against a chunk that also carries the
  ``stack - 1`` steps before it and the ``n`` after it, as the first Redis memory stored them;
* **insert**: steps per second that writer processes append to the log (encoding and LZ4 included, batches of
  ``--batch-chunks`` chunks per script call), 1 and 2 processes; against the slot ring the log replaced (one
  script per chunk: SET the chunk's key, SETRANGE its slot's metadata), written the same way, in the same run;
* **catch-up**: a fresh replica loading the whole full log (``--capacity`` steps): seconds and steps/s; against
  reading the ring's slots (MGET in batches) into a replica the same way;
* **tail cost**: redis-server CPU seconds per second and bytes per second sent while 1, 2 and 4 tail processes
  follow the log as one writer appends ``--tail-rate`` steps/s, and the extrapolation to 64 and 1,000 agents;
* **sampling**: transitions per second a learner samples from its replica (one agent process with a ``RedisLink``)
  while 2 writer processes append to the log at full speed, against the embedded memory sampled by one process
  while 2 writer processes add to it at full speed, in the same run; ends with
  ``replica/embedded sampling ratio: X``;
* **lag**: from one agent's ``add`` to the chunk's arrival in every replica, with 4 agent processes each adding
  ``--agent-rate`` steps/s through their links: p50 and p99.

    python benchmarks/redis_replay_throughput.py [--capacity 500000] [--seconds 10]

Needs ale-py for real Pong frames (else synthetic Pong-like frames, said so), and apt-get to fetch Debian's
redis-server on first use (``tests/harness``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import redis  # noqa: E402
from codec_throughput import ale_pong_frames, pong_frames  # noqa: E402

from borgdqn.memory.codec import encode_chunk  # noqa: E402
from borgdqn.memory.protocol import SamplingSpec, TrajectoryChunk  # noqa: E402
from borgdqn.memory.redis.keys import LogKeys, LogShape, read_state  # noqa: E402
from borgdqn.memory.redis.link import LinkSettings, RedisLink  # noqa: E402
from borgdqn.memory.redis.tail import LogTail  # noqa: E402
from borgdqn.memory.redis.writer import LogWriter  # noqa: E402
from borgdqn.memory.shared import SharedReplay, SharedReplayHandle  # noqa: E402
from tests.harness.cache import Progress  # noqa: E402
from tests.harness.redis import ensure_redis, start_redis  # noqa: E402

FRAME = (84, 84)
STACK, N_STEP, GAMMA, BATCH, BETA = 4, 3, 0.99, 32, 0.4
STREAMS_PER_WRITER = 8
NAME, RING = "bench", "ring"

# The slot ring the log replaced, reduced to what a write and a read of it cost: chunk g in key c:<g % slots>,
# its g in a per-slot array, a counter. KEYS: head, gseq, chunk-key prefix. ARGV: slots, chunk bytes.
_RING_WRITE = """
local g = redis.call('INCR', KEYS[1]) - 1
local slot = g % tonumber(ARGV[1])
redis.call('SET', KEYS[3] .. slot, ARGV[2])
redis.call('SETRANGE', KEYS[2], slot * 8, struct.pack('<i8', g))
return g
"""


def log_shape(capacity: int, chunk_length: int) -> LogShape:
    return LogShape(capacity=capacity, chunk_length=chunk_length, frame_shape=FRAME, frame_dtype="|u1")


def stream_chunks(frames: np.ndarray, stream: int, agent: int, chunk_length: int, count: int,
                  seed: int) -> list[TrajectoryChunk]:
    """``count`` consecutive chunks of one env stream: consecutive Pong frames, episodes of 800-1200 steps."""
    rng = np.random.default_rng(seed)
    span = len(frames) - chunk_length - STACK - N_STEP
    at = int(rng.integers(0, span))
    left = 0
    out = []
    for _ in range(count):
        first = np.zeros(chunk_length, bool)
        last = np.zeros(chunk_length, bool)
        for i in range(chunk_length):
            if left == 0:
                first[i] = True
                left = int(rng.integers(800, 1200))
            left -= 1
            last[i] = left == 0
        if at > span:
            at = STACK
        out.append(TrajectoryChunk(
            stream_id=stream, agent_id=agent, frames=frames[at : at + chunk_length],
            actions=rng.integers(0, 6, chunk_length),
            rewards=rng.choice(np.array([-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], np.float32), chunk_length),
            first=first, last=last, terminated=last.copy()))  # fmt: skip
        at += chunk_length
    return out


def agent_chunks(frames: np.ndarray, agent: int, chunk_length: int, per_stream: int = 64) -> list[TrajectoryChunk]:
    """An agent's chunks as its adder writes them: its envs' streams interleaved."""
    streams = [stream_chunks(frames, agent * 1024 + e, agent, chunk_length, per_stream, 100 * agent + e)
               for e in range(STREAMS_PER_WRITER)]
    return [s[i] for i in range(per_stream) for s in streams]


SPEC = SamplingSpec(n_step=N_STEP, gamma=GAMMA, stack=STACK)


def replica_for(capacity: int, seed: int) -> SharedReplay:
    return SharedReplay.create(capacity, FRAME, np.uint8, prioritized=True, alpha=0.6, priority_eps=1e-6,
                               max_streams=1 << 16, seed=seed, private=True, spec=SPEC)


# ---------------------------------------------------------------------------------------------------- processes
# Each runs for a given time (or until told to stop) and puts its result on a queue.


def log_writer(url: str, shape: LogShape, frames: np.ndarray, rank: int, batch: int, seconds: float,
               rate: float, out: Any) -> None:
    """Appends chunks (encoded here, numbered per stream) for ``seconds``, at ``rate`` steps/s (0: full speed)."""
    writer = LogWriter(redis.Redis.from_url(url), NAME, shape)
    chunks = agent_chunks(frames, 10 + rank, shape.chunk_length)
    numbers: dict[int, int] = {}
    steps, i, start = 0, 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        if rate and steps > rate * elapsed:
            time.sleep(min(0.005, steps / rate - elapsed))
            continue
        entries = []
        for _ in range(batch):
            chunk = chunks[i % len(chunks)]
            number = numbers.get(chunk.stream_id, 0)
            numbers[chunk.stream_id] = number + 1
            entries.append((encode_chunk(chunk, chunk_seq=number), chunk.agent_id, len(chunk)))
            i += 1
        writer.append(entries)
        steps += batch * shape.chunk_length
    out.put(("writer", steps, time.perf_counter() - start))


def ring_writer(url: str, slots: int, frames: np.ndarray, chunk_length: int, rank: int, seconds: float,
                out: Any) -> None:
    """The slot ring's writes: one script per chunk (encoding included), as the first Redis memory did."""
    client = redis.Redis.from_url(url)
    write = client.register_script(_RING_WRITE)
    keys = [f"{RING}:head", f"{RING}:gseq", f"{RING}:c:"]
    chunks = agent_chunks(frames, 10 + rank, chunk_length)
    steps, i, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        write(keys=keys, args=[slots, encode_chunk(chunks[i % len(chunks)], chunk_seq=i)])
        steps += chunk_length
        i += 1
    out.put(("ring", steps, time.perf_counter() - start))


def tail_follower(url: str, shape: LogShape, stop: Any, out: Any) -> None:
    """A tail following the log into a replica until ``stop``."""
    tail = LogTail(redis.Redis.from_url(url), NAME, shape, replica_for(shape.capacity, 0))
    tail.cursor = int(redis.Redis.from_url(url).hget(LogKeys.of(NAME).stats, "chunks") or 0)
    while not stop.is_set():
        tail.poll(100)
    out.put(("tail", tail.counters.steps, 0.0))


def embedded_writer(handle: SharedReplayHandle, frames: np.ndarray, chunk_length: int, rank: int, rate: float,
                    stop: Any, out: Any) -> None:
    memory = SharedReplay.attach(handle, seed=rank)
    chunks = agent_chunks(frames, 10 + rank, chunk_length)
    steps = i = 0
    start = time.perf_counter()
    while not stop.is_set():
        if rate and steps > rate * (time.perf_counter() - start):
            time.sleep(0.002)
            continue
        memory.add(chunks[i % len(chunks)])
        steps += chunk_length
        i += 1
    memory.close()
    out.put(("writer", steps, 0.0))


def embedded_sampler(handle: SharedReplayHandle, seconds: float, out: Any) -> None:
    memory = SharedReplay.attach(handle, seed=99, spec=SPEC)
    out.put(("sampler", *_sample_for(lambda: memory.sample(BATCH, BETA), seconds)))
    memory.close()


def replica_sampler(url: str, shape: LogShape, ready: Any, go: Any, seconds: float, out: Any) -> None:
    """One agent's link: loads the log into its replica, then samples it for ``seconds`` once told to."""
    link = RedisLink(lambda: redis.Redis.from_url(url), NAME, shape, replica_for(shape.capacity, 7),
                     label="sampler")
    link.wait_caught_up(600)
    ready.set()
    go.wait()
    sampled, took = _sample_for(lambda: link.sample(BATCH, BETA), seconds)
    tail = link.snapshot()
    link.close()
    out.put(("sampler", sampled, took, tail.replica_chunks))


def _sample_for(draw: Callable[[], Any], seconds: float) -> tuple[int, float]:
    sampled, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = draw()
        sampled += len(batch.keys)
    return sampled, time.perf_counter() - start


def lag_agent(url: str, shape: LogShape, frames: np.ndarray, rank: int, rate: float, seconds: float,
              barrier: Any, out: Any) -> None:
    """An agent that adds ``rate`` steps/s through its link for ``seconds``; reports its replica's lags."""
    link = RedisLink(lambda: redis.Redis.from_url(url), NAME, shape, replica_for(shape.capacity, rank),
                     label=f"agent-{rank}", settings=LinkSettings(poll_ms=100))
    link.wait_caught_up(600)
    chunks = agent_chunks(frames, 20 + rank, shape.chunk_length)
    barrier.wait()
    start = time.perf_counter()
    link._tail._lags_ms.clear()  # this phase's chunks only (a benchmark may read a private figure)
    i = 0
    while (elapsed := time.perf_counter() - start) < seconds:
        if i * shape.chunk_length > rate * elapsed:
            time.sleep(0.002)
            continue
        link.add(chunks[i % len(chunks)])
        i += 1
    time.sleep(1.0)  # the last chunks' way through the log
    lags = list(link._tail._lags_ms)
    link.close()
    out.put(("lag", lags))


def spawn(target: Callable[..., None], *args: Any) -> Any:
    proc = mp.get_context("spawn").Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def collect(out: Any, count: int, timeout: float = 900) -> list[tuple[Any, ...]]:
    return [out.get(timeout=timeout) for _ in range(count)]


def server_counters(client: Any) -> tuple[int, float]:
    stats, cpu = client.info("stats"), client.info("cpu")
    return int(stats["total_net_output_bytes"]), float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


# ---------------------------------------------------------------------------------------------------- phases
def bytes_per_step(frames: np.ndarray, chunk_length: int) -> tuple[float, float]:
    """Bytes per own step of a log chunk, and of the same chunk with the steps the first Redis memory borrowed."""
    chunks = stream_chunks(frames, 1, 1, chunk_length + STACK - 1 + N_STEP, 64, 5)
    own = [encode_chunk(TrajectoryChunk(
        stream_id=1, agent_id=1, frames=c.frames[STACK - 1 : STACK - 1 + chunk_length],
        actions=c.actions[:chunk_length], rewards=c.rewards[:chunk_length], first=c.first[:chunk_length],
        last=c.last[:chunk_length], terminated=c.terminated[:chunk_length])) for c in chunks]  # fmt: skip
    borrowed = [encode_chunk(c, context_steps=STACK - 1, lookahead_steps=N_STEP) for c in chunks]
    per_step = [float(np.mean([len(b) for b in encoded])) / chunk_length for encoded in (own, borrowed)]
    return per_step[0], per_step[1]


def insert_phase(url: str, shape: LogShape, frames: np.ndarray, batch: int, seconds: float,
                 processes: int) -> float:
    out = mp.get_context("spawn").Queue()
    procs = [spawn(log_writer, url, shape, frames, rank, batch, seconds, 0.0, out) for rank in range(processes)]
    results = collect(out, processes)
    for p in procs:
        p.join()
    return sum(r[1] for r in results) / max(r[2] for r in results)


def ring_phase(url: str, slots: int, frames: np.ndarray, chunk_length: int, seconds: float, processes: int) -> float:
    out = mp.get_context("spawn").Queue()
    procs = [spawn(ring_writer, url, slots, frames, chunk_length, rank, seconds, out) for rank in range(processes)]
    results = collect(out, processes)
    for p in procs:
        p.join()
    return sum(r[1] for r in results) / max(r[2] for r in results)


def fill_log(url: str, shape: LogShape, frames: np.ndarray, batch: int) -> None:
    client = redis.Redis.from_url(url)
    while int(client.hget(LogKeys.of(NAME).stats, "trimmed") or 0) < STREAMS_PER_WRITER:
        insert_phase(url, shape, frames, batch, 2.0, 2)


def catch_up_log(url: str, shape: LogShape) -> tuple[float, int, float]:
    """(seconds, steps, redis CPU s) for a fresh replica to load the whole log."""
    client = redis.Redis.from_url(url)
    tail = LogTail(redis.Redis.from_url(url), NAME, shape, replica_for(shape.capacity, 1), batch=256)
    _, cpu0 = server_counters(client)
    start = time.perf_counter()
    tail.catch_up()
    took = time.perf_counter() - start
    _, cpu1 = server_counters(client)
    tail.replica.close()
    return took, tail.counters.steps, cpu1 - cpu0


def catch_up_ring(url: str, slots: int, shape: LogShape) -> tuple[float, int, float]:
    """The same for the ring: MGET the slots in batches, decode, add (linking streams by chunk order)."""
    from borgdqn.memory.codec import decode_chunk

    client = redis.Redis.from_url(url)
    replica = replica_for(shape.capacity, 2)
    _, cpu0 = server_counters(client)
    start = time.perf_counter()
    steps = 0
    for lo in range(0, slots, 256):
        for data in client.mget([f"{RING}:c:{s}" for s in range(lo, min(lo + 256, slots))]):
            if data is not None:
                chunk = decode_chunk(data, FRAME, np.dtype(np.uint8)).chunk
                replica.add(chunk)
                steps += len(chunk)
    took = time.perf_counter() - start
    _, cpu1 = server_counters(client)
    replica.close()
    return took, steps, cpu1 - cpu0


def tail_cost_phase(url: str, shape: LogShape, frames: np.ndarray, tails: int, rate: float,
                    seconds: float) -> tuple[float, float, float]:
    """(redis CPU s/s, bytes/s sent, steps appended/s) while ``tails`` follow one writer at ``rate`` steps/s."""
    client = redis.Redis.from_url(url)
    ctx = mp.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    followers = [spawn(tail_follower, url, shape, stop, out) for _ in range(tails)]
    time.sleep(3.0)  # the followers' imports and first reads
    out0, cpu0 = server_counters(client)
    start = time.perf_counter()
    writer = spawn(log_writer, url, shape, frames, 0, 8, seconds, rate, out)
    (result,) = collect(out, 1)
    writer.join()
    wall = time.perf_counter() - start
    out1, cpu1 = server_counters(client)
    stop.set()
    collect(out, tails)
    for p in followers:
        p.join()
    return (cpu1 - cpu0) / wall, (out1 - out0) / wall, result[1] / wall


def sampling_phase(url: str, shape: LogShape, frames: np.ndarray, batch: int, seconds: float,
                   rate: float) -> tuple[float, int]:
    """Transitions/s a learner samples its replica while 2 writers append, each at ``rate`` steps/s (0: full
    speed); and the chunks its tail added meanwhile."""
    ctx = mp.get_context("spawn")
    out, ready, go = ctx.Queue(), ctx.Event(), ctx.Event()
    sampler = spawn(replica_sampler, url, shape, ready, go, seconds, out)
    ready.wait(900)
    writers = [spawn(log_writer, url, shape, frames, rank, batch, seconds + 3.0, rate, out) for rank in range(2)]
    time.sleep(2.0)  # the writers' imports: they write at full speed before the sampler starts
    go.set()
    results = collect(out, 3)
    for p in (sampler, *writers):
        p.join()
    ((_, sampled, took, tail_chunks),) = [r for r in results if r[0] == "sampler"]
    return sampled / took, tail_chunks


def embedded_phase(capacity: int, frames: np.ndarray, chunk_length: int, seconds: float, rate: float) -> float:
    """Transitions/s one process samples the embedded memory while 2 writer processes add, each at ``rate``
    steps/s (0: full speed)."""
    memory = SharedReplay.create(capacity, FRAME, np.uint8, prioritized=True, alpha=0.6, priority_eps=1e-6,
                                 max_streams=1 << 16, seed=0)
    try:
        for chunk in agent_chunks(frames, 1, chunk_length, per_stream=-(-capacity // chunk_length) // 8 + 8):
            memory.add(chunk)
        ctx = mp.get_context("spawn")
        out, stop = ctx.Queue(), ctx.Event()
        writers = [spawn(embedded_writer, memory.handle(), frames, chunk_length, rank, rate, stop, out)
                   for rank in range(2)]
        time.sleep(2.0)
        sampler = spawn(embedded_sampler, memory.handle(), seconds, out)
        (result,) = collect(out, 1)
        stop.set()
        collect(out, 2)
        for p in (sampler, *writers):
            p.join()
        return result[1] / result[2]
    finally:
        memory.close()
        memory.unlink()


def lag_phase(url: str, shape: LogShape, frames: np.ndarray, agents: int, rate: float,
              seconds: float) -> tuple[float, float, int]:
    ctx = mp.get_context("spawn")
    out, barrier = ctx.Queue(), ctx.Barrier(agents)
    procs = [spawn(lag_agent, url, shape, frames, rank, rate, seconds, barrier, out) for rank in range(agents)]
    lags = np.concatenate([np.asarray(r[1]) for r in collect(out, agents)])
    for p in procs:
        p.join()
    return float(np.quantile(lags, 0.5)), float(np.quantile(lags, 0.99)), int(lags.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, default=500_000, help="steps the log (and each replica) holds")
    parser.add_argument("--chunk-length", type=int, default=64, help="steps per chunk")
    parser.add_argument("--batch-chunks", type=int, default=64, help="chunks per append (the link's batch)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per row")
    parser.add_argument("--frames", type=int, default=4096, help="distinct Pong frames to collect")
    parser.add_argument("--tail-rate", type=float, default=20_000, help="steps/s the writer appends while tails follow")
    parser.add_argument("--agent-rate", type=float, default=2_000, help="steps/s each agent adds in the lag row")
    parser.add_argument("--hive-rate", type=float, default=32_000,
                        help="steps/s the 2 writers append together in the second sampling row (32 GPU agents)")
    args = parser.parse_args()
    started, load_before = time.monotonic(), os.getloadavg()

    frames = ale_pong_frames(args.frames)
    source = "real Pong frames (ale-py, random play)"
    if frames is None:
        frames, source = pong_frames(args.frames), "synthetic Pong-like frames (ale-py is not installed)"
    shape = log_shape(args.capacity, args.chunk_length)
    lag_shape = log_shape(min(args.capacity, 100_000), 32)  # the agents' default chunks
    slots = -(-args.capacity // args.chunk_length)

    say("bytes per step")
    own_b, borrowed_b = bytes_per_step(frames, args.chunk_length)
    install = ensure_redis(Progress())
    server = start_redis(install)
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=120)
        version = client.info("server")["redis_version"]
        LogWriter(client, NAME, shape).declare()
        inserts = {p: insert_phase(server.url, shape, frames, args.batch_chunks, args.seconds, p) for p in (1, 2)}
        say(f"log inserts: {inserts}")
        rings = {p: ring_phase(server.url, slots, frames, args.chunk_length, args.seconds, p) for p in (1, 2)}
        say(f"ring inserts: {rings}")
        while int(client.get(f"{RING}:head") or 0) < slots:
            ring_phase(server.url, slots, frames, args.chunk_length, 2.0, 2)
        fill_log(server.url, shape, frames, args.batch_chunks)
        log_catch = catch_up_log(server.url, shape)
        ring_catch = catch_up_ring(server.url, slots, shape)
        say(f"catch-up log {log_catch}, ring {ring_catch}")
        client.delete(*[f"{RING}:c:{s}" for s in range(slots)], f"{RING}:head", f"{RING}:gseq")
        state = read_state(client, NAME)
        memory_per_step = int(client.info("memory")["used_memory"]) / state.size
        stored_per_step = state.bytes / state.size
        costs = {n: tail_cost_phase(server.url, shape, frames, n, args.tail_rate, args.seconds) for n in (1, 2, 4)}
        say(f"tail costs {costs}")
        sampling = {rate: sampling_phase(server.url, shape, frames, args.batch_chunks, args.seconds, rate)
                    for rate in (0.0, args.hive_rate / 2)}
        say(f"replica sampling {sampling}")
        client.delete(*LogKeys.of(NAME).all())
        LogWriter(client, NAME, lag_shape).declare()
        lag50, lag99, lag_n = lag_phase(server.url, lag_shape, frames, 4, args.agent_rate, args.seconds)
        say(f"lag p50 {lag50:.1f} ms p99 {lag99:.1f} ms ({lag_n} chunks)")
    finally:
        server.stop()
    embedded = {rate: embedded_phase(args.capacity, frames, args.chunk_length, args.seconds, rate)
                for rate in (0.0, args.hive_rate / 2)}
    say(f"embedded sampling {embedded}")
    replica_rate, tail_chunks = sampling[0.0]
    embedded_rate = embedded[0.0]

    # ------------------------------------------------------------------------------------------------ report
    load_after = os.getloadavg()
    print()
    print(f"redis {version}; {source}; log of {args.capacity:,} steps in chunks of {args.chunk_length} "
          f"({args.batch_chunks} per append); stack {STACK}, n-step {N_STEP}, batch {BATCH}; "
          f"{args.seconds:g} s per row")
    print(f"cores {os.cpu_count()}, load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
          f"{time.monotonic() - started:.0f} s in all")
    header = f"{'measure':<66}{'ours':>14}{'baseline':>14}{'ratio':>8}  {'target':<16}{'met':>4}"
    print(header)
    print("-" * len(header))

    def row(label: str, ours: float, base: float, target: str = "", met: bool | None = None) -> None:
        verdict = "" if met is None else ("yes" if met else "no")
        print(f"{label:<66}{ours:>14,.1f}{base:>14,.1f}{ours / base:>8.3g}  {target:<16}{verdict:>4}")

    row("bytes per stored step: own steps only (vs + borrowed 3 before, 3 after)", own_b, borrowed_b)
    for p in (1, 2):
        row(f"insert steps/s, {p} writer process{'es' if p > 1 else ''} (vs the slot ring)", inserts[p], rings[p],
            ">= 97,000/proc" if p == 1 else "", inserts[p] >= 97_000 if p == 1 else None)
    row(f"catch-up steps/s, a fresh replica loads {log_catch[1]:,} steps (vs the ring)",
        log_catch[1] / log_catch[0], ring_catch[1] / ring_catch[0])
    row("catch-up seconds (vs the ring)", log_catch[0], ring_catch[0],
        "<= 15 s / 500k", log_catch[0] * 500_000 / max(log_catch[1], 1) <= 15)
    row("catch-up redis CPU ms per 100k steps (vs the ring)", log_catch[2] * 1e8 / log_catch[1],
        ring_catch[2] * 1e8 / ring_catch[1])
    base_cpu, base_out, appended = costs[1]
    for n, (cpu, egress, _) in costs.items():
        row(f"tail cost, {n} tail{'s' if n > 1 else ''} following {appended:,.0f} steps/s: redis CPU ms/s (vs 1)",
            cpu * 1000, base_cpu * 1000)
        row(f"tail cost, {n} tail{'s' if n > 1 else ''}: redis bytes/s sent (vs 1)", egress, base_out)
    row("sampling transitions/s, replica while 2 writers append at full speed (vs embedded)", replica_rate,
        embedded_rate, ">= 0.9x", replica_rate >= 0.9 * embedded_rate)
    hive_replica, hive_embedded = sampling[args.hive_rate / 2][0], embedded[args.hive_rate / 2]
    row(f"sampling transitions/s, replica while 2 writers append {args.hive_rate:,.0f} steps/s (vs embedded)",
        hive_replica, hive_embedded, ">= 0.9x", hive_replica >= 0.9 * hive_embedded)
    row(f"lag ms, add -> replicas, 4 agents x {args.agent_rate:,.0f} steps/s: p50 (vs 50 ms)", lag50, 50.0,
        "<= 50 ms", lag50 <= 50)
    row("lag ms, p99 (vs 250 ms)", lag99, 250.0, "<= 250 ms", lag99 <= 250)
    # Per tail, the server's CPU and egress grow with the hive's insert rate; extrapolated linearly in tails.
    per_tail_cpu = (costs[4][0] - costs[1][0]) / 3
    per_tail_out = (costs[4][1] - costs[1][1]) / 3
    for agents, rate in ((64, 1_000), (1_000, 1_000)):
        inserts_per_s = agents * rate
        cpu = base_cpu + per_tail_cpu * (agents - 1)
        egress = (base_out + per_tail_out * (agents - 1)) * inserts_per_s / appended
        print(f"extrapolated: {agents} agents x {rate:,} steps/s -> redis CPU {cpu * inserts_per_s / appended:,.1f} "
              f"s/s, egress {egress / 1e9:,.2f} GB/s")
    print(f"full log: {stored_per_step:,.1f} B of chunk per stored step (the monitor's bytes_per_step), redis "
          f"used_memory {memory_per_step:,.0f} B per stored step")
    print(f"chunks the replica ingested while its learner sampled (full-speed writers): {tail_chunks:,}")
    print(f"replica/embedded sampling ratio: {replica_rate / embedded_rate:.2f}")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
