"""The memory monitor against a real Redis memory (the harness's redis-server) filled by ``RedisReplay``.

Every figure of a reading is checked against the memory itself: ``RedisReplay.stats()`` and the stored values.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from borgdqn.cli import main
from borgdqn.memory.monitor import (
    MemoryMonitor,
    MemoryNotCreated,
    MemoryReading,
    MonitorError,
    connect,
    format_reading,
)
from borgdqn.memory.protocol import TrajectoryChunk
from borgdqn.memory.redis_replay import RedisReplay, RedisReplayConfig
from tests.harness.process import free_port
from tests.harness.redis import RedisServer

pytestmark = pytest.mark.integration

MONITOR_LOGGER = "borgdqn.memory.monitor"
ROOT = Path(__file__).resolve().parents[1]


def config(capacity: int = 64, chunk_length: int = 8) -> RedisReplayConfig:
    return RedisReplayConfig(
        capacity=capacity,
        chunk_length=chunk_length,
        frame_shape=(2,),
        frame_dtype="<f4",
        prioritized=False,
        alpha=0.6,
        priority_eps=1e-6,
        context=0,
        lookahead=1,
    )


def episode(memory: RedisReplay, stream: int, agent: int, steps: int, chunk_length: int = 8) -> None:
    """One whole episode of ``steps`` steps, added in chunks (every chunk is stored: the episode ends)."""
    for lo in range(0, steps, chunk_length):
        t = min(chunk_length, steps - lo)
        first = np.zeros(t, dtype=bool)
        first[0] = lo == 0
        last = np.zeros(t, dtype=bool)
        last[-1] = lo + t == steps
        memory.add(TrajectoryChunk(
            stream_id=stream, agent_id=agent, frames=np.arange(lo, lo + t, dtype=np.float32)[:, None].repeat(2, 1),
            actions=np.zeros(t, dtype=np.int64), rewards=np.ones(t, dtype=np.float32), first=first, last=last,
            terminated=last.copy()))  # fmt: skip


class Clock:
    """A monotonic clock the test moves by hand, so that rates are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Collect:
    """A publisher that keeps what it is given (the monitor's Publisher interface)."""

    def __init__(self) -> None:
        self.readings: list[MemoryReading] = []

    def publish(self, reading: MemoryReading) -> None:
        self.readings.append(reading)

    def close(self) -> None:
        pass


def until(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    """Polls ``condition`` (a thread's progress: no server process to watch, so not the harness's wait_until)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout_s:.0f}s")
        time.sleep(0.02)


def count_reads(client: Any) -> Callable[[], int]:
    """Counts the pipelines ``client`` opens (one per reading attempt of the monitor); returns the counter."""
    opened = 0
    pipeline = client.pipeline

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal opened
        opened += 1
        return pipeline(*args, **kwargs)

    client.pipeline = counted
    return lambda: opened


def chunk_values(client: Any, name: str, slots: int) -> int:
    """The stored chunks' bytes, read value by value (the monitor uses STRLEN)."""
    return sum(len(client.get(f"borg:{{{name}}}:c:{slot}") or b"") for slot in range(slots))


@pytest.fixture
def memory(redis_server: RedisServer) -> Iterator[tuple[RedisReplay, str]]:
    name = f"mon-{uuid.uuid4().hex[:12]}"
    replay = RedisReplay.connect(redis_server.url, name, config())
    yield replay, name
    replay.close()


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[Any]:
    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


def test_a_reading_matches_the_memory(memory: tuple[RedisReplay, str], client: Any) -> None:
    replay, name = memory
    episode(replay, stream=0, agent=0, steps=24)
    episode(replay, stream=1, agent=1, steps=5)
    clock = Clock()
    monitor = MemoryMonitor(client, name, Collect(), clock=clock)
    first = monitor.read()
    stats = replay.stats()
    assert (first.size, first.capacity, first.inserted) == (stats.size, stats.capacity, stats.inserted) == (29, 64, 29)
    assert first.per_agent == stats.per_agent == {0: 24, 1: 5}
    assert first.per_agent_share == pytest.approx({0: 24 / 29, 1: 5 / 29})
    assert (first.slots, first.filled_slots, first.fill) == (8, 4, pytest.approx(29 / 64))
    assert first.chunk_bytes == chunk_values(client, name, 8) > 0
    assert first.bytes_per_step == pytest.approx(first.chunk_bytes / 29)
    assert first.used_memory > first.chunk_bytes  # INFO memory: Redis holds the chunks and more
    assert first.maxmemory == int(client.config_get("maxmemory")["maxmemory"])
    assert first.insert_rate is None and first.sample_rate is None  # nothing to compare with yet

    episode(replay, stream=2, agent=1, steps=16)
    batch = replay.sample(16, 1, 0.99, 1, 0.5)
    replay.stats()  # samplers report their counts in batches; this sends them
    clock.now += 2.0
    second = monitor.read()
    assert second.inserted == replay.stats().inserted == 45
    assert second.insert_rate == pytest.approx(16 / 2.0)
    assert second.sample_rate == pytest.approx(len(batch.keys) / 2.0)
    assert second.per_agent == {0: 24, 1: 21}


def test_a_full_ring_reports_only_what_it_holds(memory: tuple[RedisReplay, str], client: Any) -> None:
    replay, name = memory
    episode(replay, stream=0, agent=0, steps=24)
    episode(replay, stream=5, agent=2, steps=80)  # 10 chunks through 8 slots: agent 0's are overwritten
    reading = MemoryMonitor(client, name, Collect()).read()
    stats = replay.stats()
    assert (reading.size, reading.fill, reading.inserted) == (stats.size, 1.0, 104) == (64, 1.0, 104)
    assert reading.per_agent == stats.per_agent == {2: 64}
    assert reading.per_agent_share == {2: 1.0}
    assert reading.chunk_bytes == chunk_values(client, name, 8)


def test_a_memory_that_does_not_exist_is_reported_not_created(
    redis_server: RedisServer, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"absent-{uuid.uuid4().hex[:12]}"
    collect = Collect()
    reads = count_reads(client)
    monitor = MemoryMonitor(client, name, collect, interval_s=0.02)
    with pytest.raises(MemoryNotCreated, match="not created yet"):
        monitor.read()
    stop = threading.Event()
    thread = threading.Thread(target=monitor.run, args=(stop,), daemon=True)
    caplog.set_level(logging.INFO, logger=MONITOR_LOGGER)
    thread.start()
    try:
        until(lambda: any("not created yet" in r.getMessage() for r in caplog.records), "reported absent")
        polled = reads()
        until(lambda: reads() >= polled + 3, "polling a few more times")
        assert list(client.scan_iter(match=f"borg:{{{name}}}*")) == []  # reading never creates the layout
        replay = RedisReplay.connect(redis_server.url, name, config())
        episode(replay, stream=0, agent=3, steps=8)
        until(lambda: bool(collect.readings), "reading the new memory")
    finally:
        stop.set()
        thread.join(timeout=10)
    assert collect.readings[0].per_agent == {3: 8}
    absent = [r for r in caplog.records if "not created yet" in r.getMessage()]
    assert len(absent) == 1, [r.getMessage() for r in absent]  # said once, not once per poll
    replay.close()


def test_a_failing_publisher_does_not_stop_the_monitor(memory: tuple[RedisReplay, str], client: Any) -> None:
    replay, name = memory
    episode(replay, stream=0, agent=0, steps=8)

    class Flaky(Collect):
        calls = 0

        def publish(self, reading: MemoryReading) -> None:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("broker away")
            super().publish(reading)

    flaky = Flaky()
    stop = threading.Event()
    thread = threading.Thread(target=MemoryMonitor(client, name, flaky, interval_s=0.02).run, args=(stop,))
    thread.start()
    try:
        until(lambda: len(flaky.readings) >= 2, "publishing after a failed publish")
    finally:
        stop.set()
        thread.join(timeout=10)
    assert flaky.calls >= 3


def test_the_cli_logs_one_line_per_reading_without_the_password(
    memory: tuple[RedisReplay, str],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    replay, name = memory
    episode(replay, stream=0, agent=0, steps=24)
    episode(replay, stream=1, agent=1, steps=8)
    caplog.set_level(logging.INFO, logger=MONITOR_LOGGER)
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    monkeypatch.setenv("BORG_REDIS_PASSWORD", redis_server.password)
    assert main(["memory-monitor", "--memory", url, "--name", name, "--once"]) == 0
    monkeypatch.delenv("BORG_REDIS_PASSWORD")
    secret = tmp_path / "redis-password"
    secret.write_text(redis_server.password)
    assert main(["memory-monitor", "--memory", url, "--name", name, "--once", "--password-file", str(secret)]) == 0
    lines = [
        r.getMessage() for r in caplog.records if r.name == MONITOR_LOGGER and r.getMessage().startswith("memory ")
    ]
    assert len(lines) == 2
    fields = dict(item.split("=", 1) for item in lines[0].split()[1:])
    assert fields["name"] == name
    assert (fields["size"], fields["capacity"], fields["per_agent"]) == ("32", "64", "0:24,1:8")
    assert fields["share"] == "0:0.7500,1:0.2500"
    assert fields["insert_rate"] == "-"
    assert int(fields["chunk_bytes"]) == chunk_values(replay._r, name, 8)
    out, err = capsys.readouterr()
    for text in (*[r.getMessage() for r in caplog.records], out, err):
        assert redis_server.password not in text


def test_a_reading_formats_as_key_value_pairs() -> None:
    reading = MemoryReading(name="hive", time=0.0, size=3, capacity=8, fill=0.375, slots=2, filled_slots=1,
                            inserted=3, sampled=0, rejected=1, insert_rate=1.5, sample_rate=None, used_memory=10,
                            maxmemory=0, chunk_bytes=30, bytes_per_step=10.0, per_agent={1: 2, 0: 1},
                            per_agent_share={1: 2 / 3, 0: 1 / 3})  # fmt: skip
    line = format_reading(reading)
    assert line.startswith("name=hive size=3 capacity=8 fill=0.3750 slots=1/2 inserted=3 sampled=0 rejected=1 ")
    assert "insert_rate=1.5 sample_rate=- " in line
    assert line.endswith("per_agent=0:1,1:2 share=0:0.3333,1:0.6667")


def test_the_cli_refuses_bad_input_in_one_line(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BORG_REDIS_PASSWORD", redis_server.password)
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    cases = [
        (["--memory", f"redis://:{redis_server.password}@127.0.0.1:{redis_server.port}/0"], 2, "holds a password"),
        (["--memory", "http://127.0.0.1:1/0"], 2, "not a redis://HOST:PORT/DB URL"),
        (["--memory", url, "--name", "no spaces"], 2, "is not a memory name"),
        (["--memory", url, "--interval", "0"], 2, "--interval must be > 0"),
        (["--memory", url, "--password-file", "/nonexistent/pw"], 2, "cannot read /nonexistent/pw"),
        (["--memory", url, "--name", f"none-{uuid.uuid4().hex[:8]}", "--once"], 1, "not created yet"),
        (["--memory", f"redis://127.0.0.1:{free_port()}/0", "--once"], 1, "unreachable"),
    ]
    for args, code, message in cases:
        assert main(["memory-monitor", *args]) == code, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (args, err)
        assert redis_server.password not in err
    monkeypatch.setenv("BORG_REDIS_PASSWORD", "guess")
    assert main(["memory-monitor", "--memory", url, "--once"]) == 1
    assert "refused the password" in capsys.readouterr().err


def test_the_monitor_survives_its_redis_going_away(
    redis_server_aof: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_aof
    name = "restarts"
    replay = RedisReplay.connect(server.url, name, config())
    episode(replay, stream=0, agent=0, steps=24)
    replay.close()

    client, where = connect(f"redis://127.0.0.1:{server.port}/0", server.password)
    attempts = count_reads(client)
    collect = Collect()
    monitor = MemoryMonitor(client, name, collect, where=where, interval_s=0.05, max_backoff_s=0.2)
    caplog.set_level(logging.INFO, logger=MONITOR_LOGGER)
    stop = threading.Event()
    thread = threading.Thread(target=monitor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        until(lambda: len(collect.readings) >= 1, "a first reading")
        server.kill()
        published = len(collect.readings)
        until(lambda: any(r.levelno == logging.WARNING for r in caplog.records), "saying the server is gone")
        tried = attempts()
        until(lambda: attempts() >= tried + 3, "retrying while the server is down")
        assert len(collect.readings) <= published + 1  # a reading in flight at the kill may still land
        down = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(down) == 1 and where in down[0] and server.password not in down[0]  # one line, not one per try
        restarted = time.time()
        server.launch()
        until(lambda: any(r.time > restarted for r in collect.readings), "reading again after the restart")
    finally:
        stop.set()
        thread.join(timeout=10)
        client.close()
    assert not thread.is_alive()
    after = next(r for r in collect.readings if r.time > restarted)
    assert (after.size, after.per_agent, after.inserted) == (24, {0: 24}, 24)  # the AOF kept the memory
    back = [r.getMessage() for r in caplog.records if "answers again" in r.getMessage()]
    assert len(back) == 1


def test_a_broken_layout_is_an_error_not_a_crash(redis_server: RedisServer, client: Any) -> None:
    name = f"broken-{uuid.uuid4().hex[:12]}"
    client.set(f"borg:{{{name}}}:config", b"{not json")
    monitor = MemoryMonitor(client, name, Collect())
    with pytest.raises(MonitorError, match="is not a memory config"):
        monitor.read()
    client.set(f"borg:{{{name}}}:config", b'{"capacity": 64, "chunk_length": 8}')
    with pytest.raises(MemoryNotCreated, match="config without arrays"):  # a client between its two writes
        monitor.read()
    client.set(f"borg:{{{name}}}:steps", b"\x00" * 16)
    client.set(f"borg:{{{name}}}:agent", b"\x00" * 16)
    client.set(f"borg:{{{name}}}:gseq", b"\x00" * 5)
    with pytest.raises(MonitorError, match="gseq is 5 bytes, not 64 bytes"):
        monitor.read()


def test_the_sidecar_process_reads_until_sigterm_with_the_password_in_no_argument(
    memory: tuple[RedisReplay, str], redis_server: RedisServer, tmp_path: Path
) -> None:
    replay, name = memory
    episode(replay, stream=0, agent=0, steps=16)
    secret = tmp_path / "redis-password"
    secret.write_text(redis_server.password)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BORG_")}
    env["PYTHONPATH"] = str(ROOT)
    args = ["--memory", f"redis://127.0.0.1:{redis_server.port}/0", "--name", name, "--interval", "0.1"]
    log = tmp_path / "monitor.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "borgdqn", "memory-monitor", *args, "--password-file", str(secret)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)  # fmt: skip
    try:
        until(lambda: log.read_text().count(" memory name=") >= 2, "logging readings")
        assert redis_server.password.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert redis_server.password.encode() not in Path(f"/proc/{proc.pid}/environ").read_bytes()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert f"name={name} size=16 capacity=64" in text
    assert redis_server.password not in text and "Traceback" not in text
