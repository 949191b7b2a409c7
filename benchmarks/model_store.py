"""What the hive's model store costs per agent: the bytes of one checkpoint and the time to put it in Redis.

An Atari agent's checkpoint (Nature CNN, dueling, 6 actions: online and target networks, Adam's two moments,
counters and policy state) is built the way an agent builds it (``checkpoint_bytes``), put in a real redis-server
on loopback with AOF on (``appendfsync everysec``, as the memory image runs it), read back, and parsed. The
baseline, in the same run: writing the same bytes to the run dir the way the agent does (temp file + rename).

    python benchmarks/model_store.py [--puts 10]

Needs apt-get to fetch Debian's redis-server on first use (``tests/harness``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import redis  # noqa: E402
import torch  # noqa: E402

from borgdqn.config import BorgConfig  # noqa: E402
from borgdqn.memory.redis.model_store import ModelEntry, RedisModelStore  # noqa: E402
from borgdqn.rl.checkpoint import AgentCheckpoint, checkpoint_bytes, parse_checkpoint, write_checkpoint  # noqa: E402
from borgdqn.rl.learner import Learner  # noqa: E402
from tests.harness.cache import Progress  # noqa: E402
from tests.harness.redis import ensure_redis, start_redis  # noqa: E402


@dataclass(frozen=True)
class Spec:
    frame_shape: tuple[int, ...] = (84, 84)
    is_image: bool = True
    num_actions: int = 6


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--puts", type=int, default=10, help="puts (and file writes) timed; the median is reported")
    args = parser.parse_args()
    config = BorgConfig()
    learner = Learner(config.network, config.learner, Spec(), config.env.frame_stack, seed=0, threads=1)
    for param in learner.online.parameters():  # Adam's moments exist after a first step, as in any saved agent
        param.grad = torch.zeros_like(param)
    learner.optimizer.step()
    state = AgentCheckpoint(agent=0, env_steps=1_000_000, learner=learner.state_dict())
    data = checkpoint_bytes(state, config)
    params = sum(p.numel() for p in learner.online.parameters())

    server = start_redis(ensure_redis(Progress()), aof=True)
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=60)
        store = RedisModelStore(client, "bench", budget_bytes=1 << 30)
        puts, gets, writes = [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "checkpoints" / "agent-0.pt"
            for i in range(args.puts):
                entry = ModelEntry(agent=0, env_steps=i, best_mean=float(i), size_bytes=len(data),
                                   saved_unix=time.time())
                started = time.perf_counter()
                store.put(entry, data)
                puts.append(time.perf_counter() - started)
                started = time.perf_counter()
                back = store.get(0)
                gets.append(time.perf_counter() - started)
                started = time.perf_counter()
                write_checkpoint(path, data)
                writes.append(time.perf_counter() - started)
        assert back == data
        parse_checkpoint(back, "the store")
        used = int(client.info("memory")["used_memory"])
    finally:
        server.stop()
    print(f"Atari agent (Nature CNN, dueling): {params:,} parameters; checkpoint {len(data):,} B "
          f"({len(data) / params:.1f} B per parameter); redis used_memory with it stored: {used / 2**20:.1f} MiB")
    print("| measure | ours | baseline (run-dir file write, same bytes) | ratio |")
    print("| --- | ---: | ---: | ---: |")
    put, write = median_ms(puts), median_ms(writes)
    print(f"| put one checkpoint in the model store (median of {args.puts}) | {put:.0f} ms | {write:.0f} ms | "
          f"{put / write:.2f} |")
    print(f"| get it back (median of {args.puts}) | {median_ms(gets):.0f} ms | | |")
    print(f"model store put: {len(data) / 1e6:.1f} MB in {put:.0f} ms")


if __name__ == "__main__":
    main()
