"""The memory monitor against a real Redis log (the harness's redis-server) filled by ``LogWriter`` as the agents'
links write it, and read by real links.

Every figure of a reading is checked against the log itself: its entries, read back, and the links' counters.
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
from borgdqn.memory.redis.link import LinkSettings, RedisLink
from borgdqn.memory.redis.writer import LogWriter
from borgdqn.memory.shared import SharedReplay
from borgdqn.telemetry.memory_monitor import (
    MemoryMonitor,
    MemoryNotCreated,
    MemoryReading,
    MonitorError,
    connect,
    format_reading,
)
from tests.harness.process import free_port
from tests.harness.redis import RedisServer
from tests.support.conditions import eventually
from tests.support.redis_log import episode, open_log, shape
from tests.support.replay_oracle import draw

pytestmark = pytest.mark.integration

MONITOR_LOGGER = "borgdqn.telemetry.memory_monitor"
ROOT = Path(__file__).resolve().parents[2]


def open_link(url: str, name: str, label: str) -> RedisLink:
    replica = SharedReplay.create(64, (2,), np.float32, prioritized=False, alpha=0.6, priority_eps=1e-6,
                                  private=True)
    return RedisLink(lambda: redis.Redis.from_url(url), name, shape(), replica, label=label,
                     settings=LinkSettings(report_every_s=0.05))


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


def chunk_values(client: Any, name: str) -> int:
    """The stored chunks' bytes, read entry by entry (the monitor reads the log's own counter)."""
    return sum(len(fields[b"d"]) for _, fields in client.xrange(f"borg:{{{name}}}:log"))


@pytest.fixture
def memory(redis_server: RedisServer) -> Iterator[tuple[LogWriter, str]]:
    name = f"mon-{uuid.uuid4().hex[:12]}"
    log = open_log(redis_server.url, name)
    yield log, name
    log._r.close()


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[Any]:
    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


def test_a_reading_matches_the_memory_and_what_the_links_report(
        memory: tuple[LogWriter, str], client: Any, redis_server: RedisServer) -> None:
    replay, name = memory
    episode(replay, stream=0, agent=0, steps=24)
    episode(replay, stream=1, agent=1, steps=5)
    clock = Clock()
    monitor = MemoryMonitor(client, name, Collect(), clock=clock)
    first = monitor.read()
    assert (first.size, first.capacity, first.inserted, first.chunks) == (29, 64, 29, 4)
    assert first.per_agent == {0: 24, 1: 5}
    assert first.per_agent_share == pytest.approx({0: 24 / 29, 1: 5 / 29})
    assert first.fill == pytest.approx(29 / 64)
    assert first.chunk_bytes == chunk_values(client, name) > 0
    assert first.bytes_per_step == pytest.approx(first.chunk_bytes / 29)
    assert first.used_memory > first.chunk_bytes  # INFO memory: Redis holds the chunks and more
    assert first.maxmemory == int(client.config_get("maxmemory")["maxmemory"])
    assert first.insert_rate is None and first.sample_rate is None  # nothing to compare with yet
    assert (first.links, first.dropped_chunks, first.lag_p99_ms) == (0, 0, None)

    # Two agents' links: each loads the log into its replica, samples it and reports what it did.
    links = [open_link(redis_server.url, name, f"agent-{i}") for i in range(2)]
    try:
        episode(replay, stream=2, agent=1, steps=16)
        for link in links:
            link.wait_caught_up(10)
            eventually(lambda link=link: link.stats().size == 45, "the log replicated")
            draw(link, 16, 1, 0.99, 1, 0.5)
        eventually(lambda: MemoryMonitor(client, name, Collect()).read().sampled == 32, "both links reporting")
        clock.now += 2.0
        second = monitor.read()
        assert second.inserted == 45 and second.per_agent == {0: 24, 1: 21}
        assert second.insert_rate == pytest.approx(16 / 2.0)
        assert (second.links, second.catching_up, second.rejected, second.skipped_chunks) == (2, 0, 0, 0)
        assert second.lag_p99_ms is not None and 0 <= second.lag_p99_ms < 10_000
        assert second.sample_rate is not None and second.sample_rate >= 0
    finally:
        for link in links:
            link.close()


def test_a_full_log_reports_only_what_it_holds(memory: tuple[LogWriter, str], client: Any) -> None:
    replay, name = memory
    episode(replay, stream=0, agent=0, steps=24)
    episode(replay, stream=5, agent=2, steps=80)  # 10 chunks through a log of 8: agent 0's are trimmed
    reading = MemoryMonitor(client, name, Collect()).read()
    assert (reading.size, reading.fill, reading.inserted, reading.chunks) == (64, 1.0, 104, 8)
    assert reading.per_agent == {2: 64}
    assert reading.per_agent_share == {2: 1.0}
    assert reading.chunk_bytes == chunk_values(client, name)


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
        log = open_log(redis_server.url, name)
        episode(log, stream=0, agent=3, steps=8)
        # The layout is declared before the episode is appended, so a poll may land in between.
        until(lambda: any(r.per_agent == {3: 8} for r in collect.readings), "reading the new memory")
    finally:
        stop.set()
        thread.join(timeout=10)
    assert all(r.per_agent in ({}, {3: 8}) for r in collect.readings)
    absent = [r for r in caplog.records if "not created yet" in r.getMessage()]
    assert len(absent) == 1, [r.getMessage() for r in absent]  # said once, not once per poll
    log._r.close()


def test_a_failing_publisher_does_not_stop_the_monitor(memory: tuple[LogWriter, str], client: Any) -> None:
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
    memory: tuple[LogWriter, str],
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
    assert int(fields["chunk_bytes"]) == chunk_values(replay._r, name)
    out, err = capsys.readouterr()
    for text in (*[r.getMessage() for r in caplog.records], out, err):
        assert redis_server.password not in text


def test_a_reading_formats_as_key_value_pairs() -> None:
    reading = MemoryReading(name="hive", time=0.0, size=3, capacity=8, fill=0.375, chunks=1,
                            inserted=3, sampled=0, rejected=1, insert_rate=1.5, sample_rate=None, used_memory=10,
                            maxmemory=0, chunk_bytes=30, bytes_per_step=10.0, per_agent={1: 2, 0: 1},
                            per_agent_share={1: 2 / 3, 0: 1 / 3}, links=2, catching_up=1, dropped_chunks=4,
                            write_errors=6, skipped_chunks=5, outage_s=1.25, lag_p99_ms=None)  # fmt: skip
    line = format_reading(reading)
    assert line.startswith("name=hive size=3 capacity=8 fill=0.3750 chunks=1 inserted=3 sampled=0 rejected=1 ")
    assert "insert_rate=1.5 sample_rate=- " in line
    assert line.endswith("per_agent=0:1,1:2 share=0:0.3333,1:0.6667 links=2 catching_up=1 dropped_chunks=4 "
                         "write_errors=6 skipped_chunks=5 outage_s=1.2 lag_p99_ms=-")


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
    assert "refused the monitor" in capsys.readouterr().err


def test_the_monitor_survives_its_redis_going_away(
    redis_server_aof: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_aof
    name = "restarts"
    log = open_log(server.url, name)
    episode(log, stream=0, agent=0, steps=24)
    log._r.close()

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
    with pytest.raises(MonitorError, match="is not a borgdqn log shape"):
        monitor.read()
    client.set(f"borg:{{{name}}}:config", shape().to_json())
    # Hostile counters and link reports count as nothing; the reading still comes.
    client.hset(f"borg:{{{name}}}:stats", mapping={"size": "lots", "inserted": "8"})
    client.hset(f"borg:{{{name}}}:links", mapping={"x": "{not json", "y": '{"dropped_chunks": -5, "away_s": "1"}',
                                                    "z": '{"dropped_chunks": 3, "time": "now"}'})
    reading = monitor.read()
    # No valid report time: no live agent; the counters still count.
    assert (reading.size, reading.inserted, reading.links, reading.dropped_chunks, reading.outage_s) == (0, 8, 0, 3, 0)


def test_the_sidecar_process_reads_until_sigterm_with_the_password_in_no_argument(
    memory: tuple[LogWriter, str], redis_server: RedisServer, tmp_path: Path
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
