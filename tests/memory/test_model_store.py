"""The hive's model store in a real Redis: what a put stores, its bound, hostile values, a crash with AOF; and a
new pod of agent k (an empty run dir) resuming from it through ``borgdqn.hive.train(member=...)``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from borgdqn.config import BorgConfig, build_config
from borgdqn.hive import train
from borgdqn.memory.redis.client import REDIS_PASSWORD_ENV
from borgdqn.memory.redis.keys import StoreKeys
from borgdqn.memory.redis.model_store import MAX_MODEL_BYTES, ModelEntry, RedisModelStore, StoreFull
from borgdqn.metrics import read_records
from borgdqn.rl.checkpoint import agent_checkpoint_path, parse_checkpoint, read_checkpoint
from tests.harness.redis import RedisServer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[Any]:
    r = redis.Redis.from_url(redis_server.url)
    yield r
    r.close()


def entry(agent: int, steps: int, best: float | None = None) -> ModelEntry:
    return ModelEntry(agent=agent, env_steps=steps, best_mean=best, size_bytes=0, saved_unix=1.0)


def test_a_put_replaces_the_agents_checkpoint_with_its_entry_and_moves_the_best_pointer(client: Any) -> None:
    store = RedisModelStore(client, uuid.uuid4().hex, budget_bytes=1 << 20)
    assert (store.get(0), store.entries(), store.best()) == (None, {}, None)
    assert store.put(entry(0, 100), b"a" * 1000) == 1000
    assert store.best() is None  # no mean yet (fewer than 20 episodes)
    assert store.put(entry(1, 100, best=5.0), b"b" * 300) == 1300
    assert store.put(entry(0, 200, best=3.0), b"c" * 500) == 800  # agent 0's second checkpoint replaces its first
    assert store.get(0) == b"c" * 500 and store.get(1) == b"b" * 300
    entries = store.entries()
    assert sorted(entries) == [0, 1]
    assert (entries[0].env_steps, entries[0].best_mean, entries[0].size_bytes) == (200, 3.0, 500)
    assert store.best() == (1, 5.0)
    store.put(entry(0, 300, best=7.5), b"d" * 10)
    assert store.best() == (0, 7.5)
    store.put(entry(1, 200, best=6.0), b"e" * 10)  # better than it was, not better than agent 0
    assert store.best() == (0, 7.5)


def test_a_put_past_the_bound_is_refused_and_writes_nothing(client: Any) -> None:
    store = RedisModelStore(client, uuid.uuid4().hex, budget_bytes=1000)
    store.put(entry(0, 100, best=1.0), b"a" * 600)
    with pytest.raises(StoreFull, match="past its budget of 1000"):
        store.put(entry(1, 100, best=9.0), b"b" * 500)
    assert store.get(1) is None and sorted(store.entries()) == [0] and store.best() == (0, 1.0)
    assert store.put(entry(0, 200), b"c" * 1000) == 1000  # its own replacement fits: the old one goes
    with pytest.raises(StoreFull, match="larger than the store takes"):
        RedisModelStore(client, uuid.uuid4().hex, budget_bytes=1 << 40).put(entry(0, 1), b"x" * (MAX_MODEL_BYTES + 1))


def test_hostile_entries_and_best_pointers_are_skipped_not_trusted(client: Any) -> None:
    name = uuid.uuid4().hex
    store = RedisModelStore(client, name, budget_bytes=1 << 20)
    store.put(entry(2, 100, best=1.0), b"ok")
    keys = StoreKeys.of(name)
    client.hset(keys.models, mapping={"7": b"\xff\x00 not json", "8": json.dumps({"agent": -3}),
                                      "9": json.dumps({"agent": 9, "env_steps": 1, "best_mean": "NaN",
                                                       "size_bytes": 1, "saved_unix": 0})})
    assert sorted(store.entries()) == [2]
    client.set(keys.best, b"{broken")
    assert store.best() is None
    store.put(entry(2, 200, best=2.0), b"ok2")  # a broken pointer is replaced by the next put with a mean
    assert store.best() == (2, 2.0)


def test_the_store_survives_a_redis_crash_with_aof(redis_server_aof: RedisServer) -> None:
    name = uuid.uuid4().hex
    client = redis.Redis.from_url(redis_server_aof.url)
    store = RedisModelStore(client, name, budget_bytes=1 << 24)
    blob = bytes(range(256)) * 4096  # 1 MiB
    store.put(entry(3, 1234, best=4.25), blob)
    client.close()
    redis_server_aof.kill()
    redis_server_aof.launch()
    client = redis.Redis.from_url(redis_server_aof.url)
    try:
        store = RedisModelStore(client, name, budget_bytes=1 << 24)
        assert store.get(3) == blob
        assert store.entries()[3].env_steps == 1234 and store.best() == (3, 4.25)
    finally:
        client.close()


def member_config(server: RedisServer, name: str, out: Path, steps: int, **extra: object) -> BorgConfig:
    overrides = {"hive.agents": 1, "hive.steps": steps, "hive.out": str(out), "hive.live": "off",
                 "hive.checkpoint_every": 300, "replay.backend": "redis",
                 "replay.redis_url": f"redis://127.0.0.1:{server.port}/0", "replay.redis_name": name,
                 "replay.capacity": 4000, "learner.learning_starts": 100, "network.mlp_hidden": [16],
                 "env.num_envs": 2, "epsilon_ladder.enabled": True, **extra}
    return build_config(yaml_path=EXAMPLES / "cartpole.yaml", environ={}, overrides=overrides)


@pytest.mark.integration
def test_a_new_pod_of_agent_k_resumes_from_the_store_and_another_agent_starts_anew(
        redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REDIS_PASSWORD_ENV, redis_server.password)
    name = f"cp-{uuid.uuid4().hex[:8]}"
    first = tmp_path / "pod-a"
    train(member_config(redis_server, name, first, 600), member=f"{name}-agents-0")
    client = redis.Redis.from_url(redis_server.url)
    store = RedisModelStore(client, name, budget_bytes=1 << 30)
    try:
        stored = store.entries()[0]
        assert stored.env_steps == 600
        data = store.get(0)
        assert data is not None and data == agent_checkpoint_path(first, 0).read_bytes()
        assert parse_checkpoint(data, "the store")[1].env_steps == 600
        puts = list(read_records(first, "store"))
        assert puts and all(r["stored"] for r in puts) and puts[-1]["size_bytes"] == len(data)

        # A new pod of agent 0 (rescheduled: its emptyDir is gone) raises the budget and goes on from 600.
        second = tmp_path / "pod-b"
        train(member_config(redis_server, name, second, 1000), member=f"{name}-agents-0")
        assert read_checkpoint(agent_checkpoint_path(second, 0))[1].env_steps == 1000
        episodes = list(read_records(second, "episode"))
        assert episodes and min(r["env_steps"] for r in episodes) > 600  # nothing before 600 was played again
        assert store.entries()[0].env_steps == 1000

        # Agent 1 has nothing in the store: it starts at 0.
        third = tmp_path / "pod-c"
        train(member_config(redis_server, name, third, 300), member=f"{name}-agents-1")
        assert min(r["env_steps"] for r in read_records(third, "episode")) < 300
        assert sorted(store.entries()) == [0, 1]

        # A stored checkpoint of another network (the user changed it): the pod starts anew instead of looping.
        fourth = tmp_path / "pod-d"
        train(member_config(redis_server, name, fourth, 1300, **{"network.mlp_hidden": [24]}),
              member=f"{name}-agents-0")
        assert min(r["env_steps"] for r in read_records(fourth, "episode")) < 600
    finally:
        store.close()
