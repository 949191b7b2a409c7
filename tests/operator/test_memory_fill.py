"""The memory fill the operator reports, read from a real Redis memory (the harness's redis-server)."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis

from borg_operator.memory_fill import FillError, FillReader, MemoryFill, fetch_fill, read_fill
from borgdqn.memory.redis.keys import LinkTotals
from tests.harness.process import free_port
from tests.harness.redis import RedisServer
from tests.support.redis_log import episode, open_log

pytestmark = pytest.mark.integration


def test_fill_matches_the_memory_s_own_stats(redis_server: RedisServer) -> None:
    name = f"fill-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_server.url)
    with pytest.raises(FillError, match="not created yet"):
        read_fill(client, name)

    memory = open_log(redis_server.url, name)
    try:
        assert read_fill(client, name) == MemoryFill(0.0, LinkTotals())
        episode(memory, stream=0, agent=0, steps=24)
        held = sum(int(fields[b"t"]) for _, fields in client.xrange(f"borg:{{{name}}}:log"))
        assert held == 24
        assert read_fill(client, name).fill == pytest.approx(held / 64) == 24 / 64
        # The agents' links report what they lost on the way: the status sums it up.
        now = time.time()
        client.hset(f"borg:{{{name}}}:links", mapping={
            "pong-agents-a": json.dumps({"dropped_chunks": 3, "skipped_chunks": 1, "write_errors": 2, "away_s": 4.5,
                                         "caught_up": True, "time": now}),
            "pong-agents-b": json.dumps({"dropped_chunks": 2, "skipped_chunks": 0, "away_s": 2.0, "caught_up": False,
                                         "time": now}),
            # A pod that is gone: what it lost still counts, but it is no live agent (nor one catching up).
            "pong-agents-gone": json.dumps({"dropped_chunks": 10, "write_errors": "hostile", "caught_up": False,
                                            "time": now - 600})})
        fill = fetch_fill("127.0.0.1", redis_server.port, None, redis_server.password, name, 1.0)
        assert fill.fill == 24 / 64
        assert (fill.links.links, fill.links.catching_up, fill.links.dropped_chunks, fill.links.skipped_chunks,
                fill.links.outage_s, fill.links.write_errors) == (2, 1, 15, 1, 4.5, 2)
    finally:
        memory._r.close()
        client.close()


def test_reader_gives_up_quickly_and_leaves_a_failed_memory_alone_for_a_while(redis_server: RedisServer) -> None:
    name = f"fill-{uuid.uuid4().hex[:8]}"
    memory = open_log(redis_server.url, name)
    now = [100.0]
    reader = FillReader(timeout_s=0.5, quiet_s=60.0, clock=lambda: now[0])
    try:
        assert reader.read("127.0.0.1", redis_server.port, None, redis_server.password, name) == \
            (MemoryFill(0.0, LinkTotals()), None)

        fill, why = reader.read("127.0.0.1", redis_server.port, None, "wrong-password", name)
        assert fill is None and why is not None and "password" in why.lower()
        assert reader.refusal("127.0.0.1", redis_server.port, name) == why  # a refusal: the status says it
        # Within the quiet period the same memory is not tried again (not even connected to) ...
        assert reader.read("127.0.0.1", redis_server.port, None, redis_server.password, name)[1] == \
            f"not retried yet: {why}"

        closed = free_port()
        started = time.monotonic()
        fill, why = reader.read("127.0.0.1", closed, None, None, name)
        assert fill is None and why is not None
        assert time.monotonic() - started < 1.5
        assert reader.refusal("127.0.0.1", closed, name) is None  # away is no refusal
        fill, again = reader.read("127.0.0.1", closed, None, None, name)
        assert fill is None and again == f"not retried yet: {why}"
        # ... and afterwards it is.
        now[0] += 61
        fill, why = reader.read("127.0.0.1", closed, None, None, name)
        assert fill is None and why is not None and not why.startswith("not retried yet")
        assert reader.read("127.0.0.1", redis_server.port, None, redis_server.password, name) == \
            (MemoryFill(0.0, LinkTotals()), None)
    finally:
        reader.close()
        memory._r.close()
