"""The harness's Redis: a real redis-server on loopback that demands its password and, with AOF, survives a crash."""

from __future__ import annotations

import ipaddress

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.harness.process import group_pids
from tests.harness.redis import RedisServer

pytestmark = pytest.mark.integration


def test_set_get_with_auth(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.set("borg:harness", b"\x00resistance is futile")
    assert client.get("borg:harness") == b"\x00resistance is futile"


def test_client_without_password_is_refused(redis_server: RedisServer) -> None:
    # No retries: redis-py would otherwise retry the refused handshake with backoff for seconds.
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.AuthenticationError):
        client.get("borg:harness")


def test_password_is_not_on_the_command_line(redis_server: RedisServer) -> None:
    for pid in group_pids(redis_server.processes[0].pgid):
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            assert redis_server.password.encode() not in cmdline.read()


def test_listens_on_loopback_only(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    assert client.config_get("bind")["bind"] == "127.0.0.1"
    assert redis_server.listening() == {(ipaddress.ip_address("127.0.0.1"), redis_server.port)}


def test_aof_keeps_writes_across_a_sigkill(redis_server_aof: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server_aof.url)
    client.mset({f"chunk:{i}": i for i in range(100)})
    old_pgid = redis_server_aof.processes[0].pgid
    redis_server_aof.kill()
    assert not group_pids(old_pgid)
    with pytest.raises(redis.ConnectionError):
        client.ping()
    redis_server_aof.launch()
    client = redis.Redis.from_url(redis_server_aof.url)
    assert client.dbsize() == 100
    assert client.get("chunk:99") == b"99"

