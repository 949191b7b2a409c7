"""Throughput and footprint of the shared replay memory, against the classic (state, next_state) replay.

Each worker runs the issue's loop on Pong-sized frames: add a chunk of 32 steps, sample a batch of 32 n-step
transitions (stack 4, n 3, prioritized). It prints adds/s (steps written), samples/s (transitions drawn) and their
sum, for 1 process and for 2 processes sharing one memory (one writer+sampler each), then the cost of sending a
batch's priorities back (timed apart: the issue's target counts adds and samples). The naive baseline, measured
in the same run, is a numpy ring of the same capacity that stores both frame stacks of every transition, as most
DQN code does.

    python benchmarks/replay_throughput.py --capacity 50000 --seconds 5
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from borgdqn.memory.protocol import SamplingSpec, TrajectoryChunk
from borgdqn.memory.shared import SharedReplay, SharedReplayHandle
from borgdqn.memory.sumtree import SumTree, tree_buffer_size

FRAME = (84, 84)
FRAME_BYTES = FRAME[0] * FRAME[1]
STACK, N_STEP, GAMMA, BATCH, CHUNK = 4, 3, 0.99, 32, 32
ALPHA, BETA = 0.6, 0.4
SPEC = SamplingSpec(n_step=N_STEP, gamma=GAMMA, stack=STACK)


@dataclass
class Rates:
    added: int
    sampled: int
    seconds: float
    add_s: float  # time spent adding
    sample_s: float  # time spent sampling and updating priorities

    def __add__(self, other: Rates) -> Rates:
        # Processes run side by side: rates add up, the wall time is the longest one's.
        return Rates(
            self.added + other.added,
            self.sampled + other.sampled,
            max(self.seconds, other.seconds),
            self.add_s + other.add_s,
            self.sample_s + other.sample_s,
        )


class StreamMaker:
    """Chunks of a fake Pong stream: random frames, episodes of 800-1200 steps."""

    def __init__(self, stream: int, agent: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.integers(0, 256, size=(64, *FRAME), dtype=np.uint8)
        self.stream, self.agent = stream, agent
        self.left = 0

    def chunk(self) -> TrajectoryChunk:
        first = np.zeros(CHUNK, bool)
        last = np.zeros(CHUNK, bool)
        for i in range(CHUNK):
            if self.left == 0:
                first[i] = True
                self.left = int(self.rng.integers(800, 1200))
            self.left -= 1
            last[i] = self.left == 0
        return TrajectoryChunk(
            stream_id=self.stream,
            agent_id=self.agent,
            frames=self.pool[self.rng.integers(0, 64, CHUNK)],
            actions=self.rng.integers(0, 6, CHUNK),
            rewards=self.rng.choice(np.array([-1.0, 0.0, 0.0, 0.0, 1.0], np.float32), CHUNK),
            first=first,
            last=last,
            terminated=last.copy(),
        )


def run_loop(memory: Any, maker: StreamMaker, seconds: float) -> Rates:
    chunks = [maker.chunk() for _ in range(64)]
    added = sampled = 0
    add_s = sample_s = 0.0
    start = time.perf_counter()
    i = 0
    while True:
        t0 = time.perf_counter()
        if t0 - start >= seconds:
            break
        memory.add(chunks[i % len(chunks)])
        t1 = time.perf_counter()
        memory.sample(BATCH, BETA)
        t2 = time.perf_counter()
        add_s += t1 - t0
        sample_s += t2 - t1
        added += CHUNK
        sampled += BATCH
        i += 1
    return Rates(added, sampled, time.perf_counter() - start, add_s, sample_s)


def update_cost(memory: Any, rounds: int = 300) -> float:
    """Microseconds per update_priorities of one batch's keys."""
    rng = np.random.default_rng(0)
    batches = [memory.sample(BATCH, BETA).keys for _ in range(16)]
    start = time.perf_counter()
    for i in range(rounds):
        memory.update_priorities(batches[i % len(batches)], rng.random(BATCH))
    return 1e6 * (time.perf_counter() - start) / rounds


def prefill(memory: Any, capacity: int, streams: int = 8) -> None:
    makers = [StreamMaker(100 + s, 0, s) for s in range(streams)]
    for i in range(capacity // CHUNK + 1):
        memory.add(makers[i % streams].chunk())


def _worker(handle: SharedReplayHandle, rank: int, seconds: float, barrier: Any, results: Any) -> None:
    memory = SharedReplay.attach(handle, seed=rank, spec=SPEC)
    try:
        maker = StreamMaker(rank, rank, 1000 + rank)
        barrier.wait()
        results.put(run_loop(memory, maker, seconds))
    finally:
        memory.close()


def measure_shared(capacity: int, seconds: float, processes: int) -> tuple[Rates, float, float]:
    memory = SharedReplay.create(
        capacity, FRAME, np.uint8, prioritized=True, alpha=ALPHA, priority_eps=1e-6, max_streams=2048, spec=SPEC
    )
    try:
        prefill(memory, capacity)
        if processes == 1:
            rates = run_loop(memory, StreamMaker(0, 0, 1000), seconds)
        else:
            ctx = mp.get_context("spawn")
            barrier, results = ctx.Barrier(processes), ctx.Queue()
            procs = [
                ctx.Process(target=_worker, args=(memory.handle(), rank, seconds, barrier, results))
                for rank in range(processes)
            ]
            for p in procs:
                p.start()
            parts = [results.get(timeout=seconds + 120) for _ in procs]
            for p in procs:
                p.join()
            rates = parts[0]
            for part in parts[1:]:
                rates = rates + part
        return rates, memory.bytes_per_step(), update_cost(memory)
    finally:
        memory.close()
        memory.unlink()


class NaiveReplay:
    """The classic design: every n-step transition stores its own obs and next_obs stacks (prioritized)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.obs = np.zeros((capacity, STACK, *FRAME), np.uint8)
        self.next_obs = np.zeros((capacity, STACK, *FRAME), np.uint8)
        self.actions = np.zeros(capacity, np.int64)
        self.returns = np.zeros(capacity, np.float32)
        self.discounts = np.zeros(capacity, np.float32)
        self.tree = SumTree(np.zeros(tree_buffer_size(capacity)), capacity)
        self.max_priority = 1.0
        self.head = 0
        self.size = 0
        self.rng = np.random.default_rng(0)
        self.streams: dict[int, tuple[deque[np.ndarray], deque[tuple[np.ndarray, int, float]]]] = {}

    @property
    def nbytes(self) -> int:
        arrays = (self.obs, self.next_obs, self.actions, self.returns, self.discounts)
        return sum(a.nbytes for a in arrays) + tree_buffer_size(self.capacity) * 8

    def _store(self, obs: np.ndarray, action: int, ret: float, discount: float, next_obs: np.ndarray) -> None:
        i = self.head % self.capacity
        self.obs[i], self.next_obs[i] = obs, next_obs
        self.actions[i], self.returns[i], self.discounts[i] = action, ret, discount
        self.tree.set(np.array([i]), self.max_priority**ALPHA)
        self.head += 1
        self.size = min(self.size + 1, self.capacity)

    def add(self, chunk: TrajectoryChunk) -> None:
        frames, pending = self.streams.setdefault(chunk.stream_id, (deque(maxlen=STACK), deque()))
        for t in range(len(chunk)):
            if chunk.first[t] or not frames:
                frames.clear()
                frames.extend([chunk.frames[t]] * STACK)
            else:
                frames.append(chunk.frames[t])
            stack = np.stack(frames)
            # Transitions waiting for their n-th next state get it now (or end with the episode).
            if len(pending) == N_STEP or chunk.last[t]:
                while pending:
                    obs, action, _ = pending[0]
                    ret = sum(GAMMA**k * r for k, (_, _, r) in enumerate(pending))
                    m = len(pending)
                    discount = 0.0 if chunk.terminated[t] else GAMMA**m
                    self._store(obs, action, ret, discount, stack)
                    pending.popleft()
                    if not chunk.last[t]:
                        break
            if not chunk.last[t]:
                pending.append((stack, int(chunk.actions[t]), float(chunk.rewards[t])))

    def sample(self, batch: int, n_step: int, gamma: float, stack: int, beta: float) -> Any:
        total = self.tree.total()
        idx, values = self.tree.find((np.arange(batch) + self.rng.random(batch)) / batch * total)
        weights = (self.size * values / total) ** -beta
        return _NaiveBatch(
            self.obs[idx], self.actions[idx], self.returns[idx], self.discounts[idx], self.next_obs[idx],
            (weights / weights.max()).astype(np.float32), idx,
        )  # fmt: skip

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        p = np.abs(priorities) + 1e-6
        self.tree.set(keys, p**ALPHA)
        self.max_priority = max(self.max_priority, float(p.max()))


@dataclass
class _NaiveBatch:
    obs: np.ndarray
    actions: np.ndarray
    returns: np.ndarray
    discounts: np.ndarray
    next_obs: np.ndarray
    weights: np.ndarray
    keys: np.ndarray


def measure_naive(capacity: int, seconds: float) -> tuple[Rates, float, float]:
    memory = NaiveReplay(capacity)
    prefill(memory, capacity)
    return run_loop(memory, StreamMaker(0, 0, 1000), seconds), memory.nbytes / capacity, update_cost(memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--capacity", type=int, default=50_000, help="steps (naive: transitions) stored")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per row")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive baseline (it needs ~57 KB/step)")
    args = parser.parse_args()

    rows: list[tuple[str, Rates, float, float]] = []
    for procs in (1, 2):
        rates, per_step, update_us = measure_shared(args.capacity, args.seconds, procs)
        rows.append((f"shared, {procs} process{'es' if procs > 1 else ''}", rates, per_step, update_us))
    if not args.no_naive:
        rates, per_step, update_us = measure_naive(args.capacity, args.seconds)
        rows.append(("naive (s, s') ring, 1 process", rates, per_step, update_us))

    print(
        f"capacity {args.capacity}, frames {FRAME} uint8, stack {STACK}, n {N_STEP}, batch {BATCH}, "
        f"chunk {CHUNK}, prioritized, {args.seconds:g} s per row"
    )
    header = f"{'memory':<32}{'adds/s':>10}{'samples/s':>11}{'combined/s':>12}{'us/add':>9}{'us/sample':>11}"
    header += f"{'us/update':>11}{'B/step':>9}{'vs frame':>10}"
    print(header)
    print("-" * len(header))
    for label, r, per_step, update_us in rows:
        print(
            f"{label:<32}{r.added / r.seconds:>10.0f}{r.sampled / r.seconds:>11.0f}"
            f"{(r.added + r.sampled) / r.seconds:>12.0f}{1e6 * r.add_s / (r.added / CHUNK):>9.0f}"
            f"{1e6 * r.sample_s / (r.sampled / BATCH):>11.0f}{update_us:>11.0f}{per_step:>9.0f}"
            f"{per_step / FRAME_BYTES:>10.3f}"
        )
    if not args.no_naive:
        ours, naive = rows[0], rows[-1]
        speed = ((ours[1].added + ours[1].sampled) / ours[1].seconds) / (
            (naive[1].added + naive[1].sampled) / naive[1].seconds
        )
        print(f"ours/naive (1 process): throughput x{speed:.2f}, bytes per step x{ours[2] / naive[2]:.3f}")


if __name__ == "__main__":
    main()
