"""The Redis replay memory against the first seed's Redis replay, on one real redis-server, in the same run.

Measured, with real Pong frames (ale-py, random play, the agents' preprocessing: 84x84 uint8), stack 4, n-step 3,
batch 32, a 500k-step prioritized memory in chunks of 64 steps:

* **insert**: transitions (steps) per second that ``RedisReplay.add`` stores, 1 and 2 writer processes, each
  adding pre-built chunks of 8 env streams as fast as it can (encoding and compression included);
* **sample**: transitions per second that ``RedisReplay.sample`` returns (batch 32, frame stacks and n-step
  returns built), 1 and 2 sampler processes, once with the default 64 MiB decoded-chunk cache and once with a
  cache that holds the whole memory (``cache_bytes``; the time to warm it is printed), no writers running;
* **memory**: Redis ``used_memory`` growth per stored step once the ring is full, against one 84x84 Pong frame
  compressed alone with LZ4 (the block format our codec uses, ``lz4.block.compress(frame, store_size=False)``);
* **bytes/s**: what the server received from our writers (``total_net_input_bytes``) and sent to our samplers
  (``total_net_output_bytes``) per second, against ``redis-benchmark -t set`` / ``-t get`` with values of our mean
  stored chunk size, as many connections as our processes and no pipelining (our clients wait for each reply),
  on the same server; its 50-connection, 16-deep pipelined rate is printed as the server's ceiling.

The baseline is the first seed's pattern: every transition is pickled as ``(state, next_state, action, reward,
done)`` with 4x84x84 uint8 stacks (56 KB), inserted with LPUSH then LTRIM (two round trips) and sampled one at a
time with LINDEX at a random index (no pipelining, as the seed did). 500k such items would need ~28 GB, more than
the machine has, so its list is capped at ``--baseline-capacity`` (20k): a shorter list only flatters it (LINDEX
walks the list, O(N)).

    python benchmarks/redis_replay_throughput.py [--capacity 500000] [--seconds 10]

Needs ale-py for real Pong frames (else synthetic Pong-like frames, said so), and apt-get to fetch Debian's
redis-server on first use (``tests/harness``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lz4.block
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import redis  # noqa: E402
from borgdqn.memory.redis_replay import RedisReplay, RedisReplayConfig  # noqa: E402
from codec_throughput import ale_pong_frames, pong_frames  # noqa: E402

from borgdqn.memory.protocol import TrajectoryChunk  # noqa: E402
from tests.harness.cache import Progress  # noqa: E402
from tests.harness.redis import RedisInstall, ensure_redis, start_redis  # noqa: E402

FRAME = (84, 84)
STACK, N_STEP, GAMMA, BATCH, BETA = 4, 3, 0.99, 32, 0.4
STREAMS_PER_WRITER = 8
NAME = "bench"
BASELINE_KEY = "seed:replay"
DEFAULT_CACHE = 64 << 20


def memory_config(capacity: int, chunk_length: int) -> RedisReplayConfig:
    return RedisReplayConfig(
        capacity=capacity,
        chunk_length=chunk_length,
        frame_shape=FRAME,
        frame_dtype="uint8",
        prioritized=True,
        alpha=0.6,
        priority_eps=1e-6,
        context=STACK - 1,
        lookahead=N_STEP,
    )


def stream_chunks(
    frames: np.ndarray, stream: int, agent: int, chunk_length: int, count: int, seed: int
) -> list[TrajectoryChunk]:
    """``count`` consecutive chunks of one env stream: consecutive Pong frames, episodes of 800-1200 steps."""
    rng = np.random.default_rng(seed)
    span = len(frames) - chunk_length
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
            at = 0
        out.append(
            TrajectoryChunk(
                stream_id=stream,
                agent_id=agent,
                frames=frames[at : at + chunk_length],
                actions=rng.integers(0, 6, chunk_length),
                rewards=rng.choice(np.array([-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], np.float32), chunk_length),
                first=first,
                last=last,
                terminated=last.copy(),
            )
        )
        at += chunk_length
    return out


# ---------------------------------------------------------------------------------------------------- workers
# Each worker is a process that waits for ("run", seconds) orders and answers (units done, seconds taken), so that
# a sampler's cache stays warm from one measurement to the next. Orders go through a pipe; "stop" ends it.


def _serve(conn: Any, setup: Callable[[], Callable[[float], tuple[int, float]]]) -> None:
    try:
        run = setup()
        conn.send(("ready", 0, 0.0))
        while True:
            order, arg = conn.recv()
            if order == "stop":
                break
            done, took = run(arg)
            conn.send(("done", done, took))
    except BaseException as exc:  # report, so that the parent does not wait forever
        conn.send(("error", f"{type(exc).__name__}: {exc}", 0.0))
        raise


def _timed(step: Callable[[], int]) -> Callable[[float], tuple[int, float]]:
    def run(seconds: float) -> tuple[int, float]:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            done += step()
        return done, time.perf_counter() - start

    return run


def writer_worker(conn: Any, url: str, capacity: int, chunk_length: int, frames: np.ndarray, rank: int) -> None:
    def setup() -> Callable[[float], tuple[int, float]]:
        memory = RedisReplay.connect(url, NAME, memory_config(capacity, chunk_length), seed=rank)
        streams = [
            stream_chunks(frames, rank * 1024 + e, rank, chunk_length, 64, 100 * rank + e)
            for e in range(STREAMS_PER_WRITER)
        ]
        order = [c for i in range(64) for c in (s[i] for s in streams)]  # the envs' chunks interleaved
        i = 0

        def step() -> int:
            nonlocal i
            memory.add(order[i % len(order)])
            i += 1
            return chunk_length

        return _timed(step)

    _serve(conn, setup)


def sampler_worker(conn: Any, url: str, capacity: int, chunk_length: int, cache_bytes: int, rank: int) -> None:
    def setup() -> Callable[[float], tuple[int, float]]:
        config = memory_config(capacity, chunk_length)
        memory = RedisReplay(
            redis.Redis.from_url(url, socket_timeout=60), NAME, config, seed=1000 + rank, cache_bytes=cache_bytes
        )

        def step() -> int:
            memory.sample(BATCH, N_STEP, GAMMA, STACK, BETA)
            return BATCH

        timed = _timed(step)

        def run(seconds: float) -> tuple[int, float]:
            if seconds >= 0:
                return timed(seconds)
            # Warm-up order: sample until the cache holds every slot's chunk (or -seconds pass); reports the slots
            # cached. (Reads the memory's private cache: a benchmark may.)
            start = time.perf_counter()
            while len(memory._cache) < config.slots and time.perf_counter() - start < -seconds:
                step()
            return len(memory._cache), time.perf_counter() - start

        return run

    _serve(conn, setup)


def seed_writer_worker(conn: Any, url: str, capacity: int, frames: np.ndarray, rank: int) -> None:
    def setup() -> Callable[[float], tuple[int, float]]:
        client = redis.Redis.from_url(url)
        rng = np.random.default_rng(rank)
        # Pre-built stacks of consecutive Pong frames (the seed's actors built them as they played).
        starts = rng.integers(0, len(frames) - STACK - 1, 256)
        pairs = [(frames[s : s + STACK].copy(), frames[s + 1 : s + 1 + STACK].copy()) for s in starts]
        i = 0

        def step() -> int:
            nonlocal i
            state, next_state = pairs[i % len(pairs)]
            item = pickle.dumps((state, next_state, int(i % 6), float(i % 3 - 1), bool(i % 997 == 0)))
            client.lpush(BASELINE_KEY, item)
            client.ltrim(BASELINE_KEY, 0, capacity - 1)
            i += 1
            return 1

        return _timed(step)

    _serve(conn, setup)


def seed_sampler_worker(conn: Any, url: str, rank: int) -> None:
    def setup() -> Callable[[float], tuple[int, float]]:
        client = redis.Redis.from_url(url, socket_timeout=60)
        rng = np.random.default_rng(2000 + rank)
        size = int(client.llen(BASELINE_KEY))

        def step() -> int:
            rows = [pickle.loads(client.lindex(BASELINE_KEY, int(k))) for k in rng.integers(0, size, BATCH)]
            states, next_states, actions, rewards, dones = zip(*rows, strict=True)
            np.stack(states), np.stack(next_states), np.array(actions), np.array(rewards), np.array(dones)
            return BATCH

        return _timed(step)

    _serve(conn, setup)


class Workers:
    """Processes started with ``target(conn, *args, rank)``; ``run`` orders some of them to work for a time."""

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...], count: int) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(child, *args, rank), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            self._answer(conn, timeout=600)

    @staticmethod
    def _answer(conn: Any, timeout: float) -> tuple[int, float]:
        if not conn.poll(timeout):
            raise RuntimeError(f"a worker did not answer within {timeout:.0f}s")
        status, done, took = conn.recv()
        if status == "error":
            raise RuntimeError(f"a worker failed: {done}")
        return done, took

    def run(self, seconds: float, count: int | None = None, timeout: float = 600) -> list[tuple[int, float]]:
        conns = self.conns[: count or len(self.conns)]
        for conn in conns:
            conn.send(("run", seconds))
        return [self._answer(conn, timeout=abs(seconds) + timeout) for conn in conns]

    def stop(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop", 0))
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()


def rate(results: list[tuple[int, float]]) -> float:
    """Units per second of processes that ran side by side: their counts add up over the longest one's time."""
    return sum(done for done, _ in results) / max(took for _, took in results)


@dataclass
class Measured:
    rate: float  # transitions per second, all processes together
    bytes_in: float  # bytes per second the server received
    bytes_out: float  # bytes per second the server sent
    server_cpu: float  # redis-server's CPU seconds per second


def server_counters(client: Any) -> tuple[int, int, float]:
    stats, cpu = client.info("stats"), client.info("cpu")
    busy = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"]), busy


def measure(client: Any, workers: Workers, seconds: float, processes: int) -> Measured:
    """``processes`` of the workers work for ``seconds``; with what the server saw meanwhile."""
    in0, out0, cpu0 = server_counters(client)
    start = time.perf_counter()
    done = rate(workers.run(seconds, processes))
    wall = time.perf_counter() - start
    in1, out1, cpu1 = server_counters(client)
    return Measured(done, (in1 - in0) / wall, (out1 - out0) / wall, (cpu1 - cpu0) / wall)


# ---------------------------------------------------------------------------------------------------- phases
def redis_benchmark(
    install: RedisInstall, port: int, password: str, test: str, size: int, clients: int, pipeline: int, requests: int
) -> float:
    """Requests/s of ``redis-benchmark -t test`` (from its CSV output)."""
    # The password is the throwaway one of this run's own loopback server: redis-benchmark takes it only on its
    # command line.
    cmd = [
        install.root / "usr" / "bin" / "redis-benchmark",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-a",
        password,
        "-t",
        test,
        "-d",
        str(size),
        "-n",
        str(requests),
        "-c",
        str(clients),
        "-P",
        str(pipeline),
        "--csv",
    ]
    out = subprocess.run(
        list(map(str, cmd)), env=install.env(), capture_output=True, text=True, check=True, timeout=600
    ).stdout
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells[0] == test.upper():
            return float(cells[1])
    raise RuntimeError(f"redis-benchmark printed no {test.upper()} rate:\n{out}")


def plural(p: int) -> str:
    return f"{p} process{'es' if p > 1 else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, default=500_000, help="steps our memory holds")
    parser.add_argument("--chunk-length", type=int, default=64, help="steps per chunk our writers add")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per row")
    parser.add_argument("--processes", type=int, default=2, help="most writer / sampler processes in a row")
    parser.add_argument("--frames", type=int, default=4096, help="distinct Pong frames to collect")
    parser.add_argument("--baseline-capacity", type=int, default=20_000, help="items the seed's list keeps")
    parser.add_argument(
        "--cache-bytes",
        type=int,
        default=0,
        help="decoded-chunk cache of the warm samplers (0: enough for the whole memory)",
    )
    parser.add_argument("--warmup", type=float, default=300.0, help="the longest a sampler may take to warm up")
    parser.add_argument("--requests", type=int, default=100_000, help="requests per redis-benchmark test")
    args = parser.parse_args()
    procs = list(range(1, args.processes + 1))
    started, load_before = time.monotonic(), os.getloadavg()

    frames = ale_pong_frames(args.frames)
    source = "real Pong frames (ale-py, random play)"
    if frames is None:
        frames, source = pong_frames(args.frames), "synthetic Pong-like frames (ale-py is not installed)"
    frame_lz4 = float(np.mean([len(lz4.block.compress(f.tobytes(), store_size=False)) for f in frames]))

    install = ensure_redis(Progress())
    server = start_redis(install)
    ours: dict[str, Measured] = {}
    seed: dict[str, Measured] = {}
    bench: dict[tuple[str, int, int], float] = {}
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=120)
        version = client.info("server")["redis_version"]
        config = memory_config(args.capacity, args.chunk_length)
        stored_length = config.chunk_length + STACK - 1 + N_STEP  # own steps and borrowed context / lookahead
        cache_bytes = args.cache_bytes or int(1.1 * config.slots * stored_length * FRAME[0] * FRAME[1])

        # ours: insert, then fill the ring, then its memory per step
        empty = int(client.info("memory")["used_memory"])
        RedisReplay(redis.Redis.from_url(server.url), NAME, config)  # declares the layout
        say(f"ours: {args.processes} writer processes starting")
        writers = Workers(writer_worker, (server.url, args.capacity, args.chunk_length, frames), args.processes)
        try:
            for p in procs:
                ours[f"insert{p}"] = measure(client, writers, args.seconds, p)
                say(f"ours: insert, {plural(p)}: {ours[f'insert{p}'].rate:,.0f} steps/s")
            while int(client.get(f"borg:{{{NAME}}}:head") or 0) < config.slots + args.processes * STREAMS_PER_WRITER:
                writers.run(2.0)
        finally:
            writers.stop()
        stored = int(np.frombuffer(client.get(f"borg:{{{NAME}}}:steps") or b"", dtype="<u2").sum())
        per_step = (int(client.info("memory")["used_memory"]) - empty) / stored
        chunk_bytes = int(np.mean([client.strlen(f"borg:{{{NAME}}}:c:{s}") for s in range(0, config.slots, 7)]))
        say(f"ours: {stored:,} steps stored, {per_step:.0f} B/step in Redis, chunks of {chunk_bytes:,} B")

        # ours: sample, with the default cache and with one that holds the whole memory
        warm_note = ""
        for cache, label in ((DEFAULT_CACHE, "default"), (cache_bytes, "whole")):
            count = 1 if label == "default" else args.processes
            say(f"ours: {plural(count)} sampling with a {cache / 2**20:,.0f} MiB cache starting")
            samplers = Workers(sampler_worker, (server.url, args.capacity, args.chunk_length, cache), count)
            try:
                if label == "whole":
                    warm = samplers.run(-args.warmup)
                    warm_note = (
                        f"warming a sampler's cache ({min(d for d, _ in warm):,} of {config.slots:,} "
                        f"chunks, {cache / 2**30:.1f} GiB) took {max(t for _, t in warm):.0f} s"
                    )
                    say(f"ours: {warm_note}")
                else:
                    samplers.run(2.0)
                for p in procs[:count]:
                    ours[f"{label}{p}"] = measure(client, samplers, args.seconds, p)
                    say(f"ours: sample, {plural(p)}, {label} cache: {ours[f'{label}{p}'].rate:,.0f} transitions/s")
            finally:
                samplers.stop()

        # the seed's list
        say(f"seed: {args.processes} writer processes, list capped at {args.baseline_capacity:,}")
        empty = int(client.info("memory")["used_memory"])
        seeders = Workers(seed_writer_worker, (server.url, args.baseline_capacity, frames), args.processes)
        try:
            for p in procs:
                seed[f"insert{p}"] = measure(client, seeders, args.seconds, p)
                say(f"seed: insert, {plural(p)}: {seed[f'insert{p}'].rate:,.0f} transitions/s")
            while client.llen(BASELINE_KEY) < args.baseline_capacity:
                seeders.run(2.0)
        finally:
            seeders.stop()
        seed_items = int(client.llen(BASELINE_KEY))
        seed_per_item = (int(client.info("memory")["used_memory"]) - empty) / seed_items
        seed_samplers = Workers(seed_sampler_worker, (server.url,), args.processes)
        try:
            for p in procs:
                seed[f"sample{p}"] = measure(client, seed_samplers, args.seconds, p)
                say(f"seed: sample, {plural(p)}: {seed[f'sample{p}'].rate:,.0f} transitions/s")
        finally:
            seed_samplers.stop()
        client.delete(BASELINE_KEY)

        # redis-benchmark, values of our chunks' size
        say(f"redis-benchmark: SET and GET of {chunk_bytes:,} B values")
        for test in ("set", "get"):
            for clients, pipeline in [(p, 1) for p in procs] + [(50, 16)]:
                rps = redis_benchmark(
                    install, server.port, server.password, test, chunk_bytes, clients, pipeline, args.requests
                )
                bench[(test, clients, pipeline)] = rps * chunk_bytes
    finally:
        server.stop()

    # ------------------------------------------------------------------------------------------------ report
    rows: list[tuple[str, float, float, str, bool]] = []  # measure, ours, baseline, target, met
    for p in procs:
        o, b = ours[f"insert{p}"].rate, seed[f"insert{p}"].rate
        rows.append((f"insert transitions/s, {plural(p)}", o, b, ">= 60,000 and >= 30x", o >= 60_000 and o >= 30 * b))
    for key, p, what in [("default1", 1, "default 64 MiB cache")] + [(f"whole{p}", p, "warm cache") for p in procs]:
        o, b = ours[key].rate, seed[f"sample{p}"].rate
        rows.append(
            (f"sample transitions/s, {plural(p)}, {what}", o, b, ">= 200,000 and >= 30x", o >= 200_000 and o >= 30 * b)
        )
    for p in procs:
        o, b = ours[f"insert{p}"].bytes_in, bench[("set", p, 1)]
        rows.append((f"write bytes/s, {plural(p)} (vs SET -c {p} -P 1)", o, b, ">= 0.5x", o >= 0.5 * b))
    for key, p, what in [("default1", 1, "default cache")] + [(f"whole{p}", p, "warm cache") for p in procs]:
        o, b = ours[key].bytes_out, bench[("get", p, 1)]
        rows.append((f"read bytes/s, {plural(p)}, {what} (vs GET -c {p} -P 1)", o, b, ">= 0.5x", o >= 0.5 * b))
    rows.append(
        ("Redis bytes per stored step (vs one LZ4 frame)", per_step, frame_lz4, "<= 1.2x", per_step <= 1.2 * frame_lz4)
    )

    load_after = os.getloadavg()
    print()
    print(
        f"redis {version}; {source}; our memory: {args.capacity:,} steps in chunks of {args.chunk_length}, "
        f"prioritized, stack {STACK}, n-step {N_STEP}, batch {BATCH}; {args.seconds:g} s per row"
    )
    print(
        f"cores {os.cpu_count()}, load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
        f"{time.monotonic() - started:.0f} s in all"
    )
    print(
        f"seed baseline: pickled (s, s') 4x84x84 stacks, LPUSH + LTRIM, one LINDEX per transition; list of "
        f"{seed_items:,} items, {seed_per_item:,.0f} B each in Redis"
    )
    print(
        f"our stored chunk: {chunk_bytes:,} B on average ({chunk_bytes / args.chunk_length:.0f} B per own step); "
        f"one 84x84 Pong frame LZ4-compressed alone: {frame_lz4:.0f} B"
    )
    print(warm_note)
    header = f"{'measure':<58}{'ours':>14}{'baseline':>14}{'ratio':>8}  {'target':<22}{'met':>4}"
    print(header)
    print("-" * len(header))
    for label, o, b, target, met in rows:
        print(f"{label:<58}{o:>14,.0f}{b:>14,.0f}{o / b:>8.3g}  {target:<22}{'yes' if met else 'no':>4}")
    print(
        "baseline: the seed's pattern for transitions/s; redis-benchmark with values of our chunks' size for "
        "bytes/s; one frame for bytes per step."
    )
    print(
        f"redis-benchmark -c 50 -P 16 (the server's ceiling): SET {bench[('set', 50, 16)]:,.0f} B/s, "
        f"GET {bench[('get', 50, 16)]:,.0f} B/s"
    )
    print(
        "redis-server CPU (s per s) during each row: "
        + ", ".join(f"ours {k} {m.server_cpu:.2f}" for k, m in ours.items())
        + ", "
        + ", ".join(f"seed {k} {m.server_cpu:.2f}" for k, m in seed.items())
    )
    print("seed bytes/s: " + ", ".join(f"{k} {max(m.bytes_in, m.bytes_out):,.0f}" for k, m in seed.items()))


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
