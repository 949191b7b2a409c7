"""The memory monitor: reads the hive's Redis log every few seconds and publishes what it holds and how it fares.

It reads the log through ``borgdqn.memory.redis.keys.read_state`` (the log's counters, kept exact by the append
script, and every agent's link counters) without knowing the frame shape. It never writes a key, so a memory
that does not exist yet is reported as such, not created. One reading costs one MULTI (config, counters,
per-agent steps, link counters, XLEN) and INFO memory: O(agents), never a scan of the log.

A reading holds size, capacity, fill, counters and their rates per second (from the deltas between two
readings), the bytes Redis uses and the bytes of the stored chunks, each agent's share of the stored steps, and
what the agents' links report: chunks dropped while Redis was away, chunks a tail skipped (trimmed before it read
them), chunks that did not decode, outage seconds and the write-to-replica lag.
It goes to a :class:`Publisher`: the log (:class:`LogPublisher`, one ``key=value`` line per reading) and, with
``--kafka``, Kafka too (:class:`KafkaPublisher`, a ``MemoryReport`` telemetry event per reading).

The monitor outlives its Redis: a failed reading logs one line, and the monitor retries with a growing delay
(up to ``max_backoff_s``) until the server answers again, then logs one line more and goes on. The password
comes from ``BORG_REDIS_PASSWORD`` or a file (a Kubernetes Secret mounted as a file), never from process
arguments, and is never logged; the user from ``BORG_REDIS_USERNAME`` (the memory's read-only ``borg-monitor``).
A refused user, password or command ends the monitor with one line instead: no wait cures it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from borgdqn.memory.redis.client import REDIS_PASSWORD_ENV, REDIS_USERNAME_ENV, refused_access, untrusted_server
from borgdqn.memory.redis.keys import LogNotCreated, read_state
from borgdqn.one_line import one_line
from borgdqn.telemetry.kafka_access import KafkaAccess

log = logging.getLogger(__name__)

NAME_PATTERN_HELP = "letters, digits, '_', '.', '-' (1-64), as replay.redis_name"


class MonitorError(Exception):
    """A reading that cannot be made; the message is one line for a person."""


class MemoryNotCreated(MonitorError):
    """No client has created the memory yet (``borg:{name}:config`` is absent)."""


class MonitorConfigError(ValueError):
    """Bad input to the monitor (URL, name, interval, password file): the caller's mistake."""


@dataclass(frozen=True)
class MemoryReading:
    """One reading of the memory. Rates are per second since the previous reading (None on the first one,
    and where a counter went down: the memory was recreated)."""

    name: str
    time: float  # unix seconds
    size: int  # steps stored now
    capacity: int  # steps the log holds
    fill: float
    chunks: int  # entries in the log now
    inserted: int  # steps ever inserted
    sampled: int  # transitions ever sampled from the agents' replicas (as their links last reported)
    rejected: int  # log entries that did not decode (the most any agent's tail counted)
    insert_rate: float | None
    sample_rate: float | None
    used_memory: int  # INFO memory used_memory: everything Redis holds
    maxmemory: int  # 0: unlimited
    chunk_bytes: int  # the stored chunks' values (STRLEN)
    bytes_per_step: float  # chunk_bytes / size: the figure the memory image's sizing takes
    per_agent: dict[int, int] = field(default_factory=dict)  # steps stored now, by agent
    per_agent_share: dict[int, float] = field(default_factory=dict)  # of ``size``
    links: int = 0  # agents whose link reported
    catching_up: int = 0  # of them, replicas still loading the log
    dropped_chunks: int = 0  # own chunks the agents dropped while Redis was away (sum)
    write_errors: int = 0  # appends Redis refused (e.g. OOM under maxmemory), their chunks lost (sum)
    skipped_chunks: int = 0  # log entries trimmed before a tail read them (sum over tails)
    outage_s: float = 0.0  # the longest time any agent spent without Redis
    lag_p99_ms: float | None = None  # the worst agent's write-to-replica lag, 99th percentile

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Publisher(Protocol):
    """Where readings go (the log; Kafka with ``--kafka``)."""

    def publish(self, reading: MemoryReading) -> None: ...

    def close(self) -> None: ...


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_reading(reading: MemoryReading) -> str:
    """One ``key=value`` line; per-agent maps as ``agent:value`` lists, rates ``-`` when unknown."""
    agents = ",".join(f"{a}:{n}" for a, n in sorted(reading.per_agent.items())) or "-"
    shares = ",".join(f"{a}:{s:.4f}" for a, s in sorted(reading.per_agent_share.items())) or "-"
    return " ".join([
        f"name={reading.name}", f"size={reading.size}", f"capacity={reading.capacity}", f"fill={reading.fill:.4f}",
        f"chunks={reading.chunks}", f"inserted={reading.inserted}",
        f"sampled={reading.sampled}", f"rejected={reading.rejected}",
        f"insert_rate={_number(reading.insert_rate, 1)}", f"sample_rate={_number(reading.sample_rate, 1)}",
        f"used_memory={reading.used_memory}", f"maxmemory={reading.maxmemory}",
        f"chunk_bytes={reading.chunk_bytes}", f"bytes_per_step={reading.bytes_per_step:.1f}",
        f"per_agent={agents}", f"share={shares}", f"links={reading.links}", f"catching_up={reading.catching_up}",
        f"dropped_chunks={reading.dropped_chunks}", f"write_errors={reading.write_errors}",
        f"skipped_chunks={reading.skipped_chunks}",
        f"outage_s={reading.outage_s:.1f}", f"lag_p99_ms={_number(reading.lag_p99_ms, 1)}",
    ])  # fmt: skip


class LogPublisher:
    """Publishes each reading as one ``memory key=value ...`` line on this module's logger."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.INFO) -> None:
        self._log = logger or log
        self._level = level

    def publish(self, reading: MemoryReading) -> None:
        self._log.log(self._level, "memory %s", format_reading(reading))

    def close(self) -> None:
        pass


def memory_report(reading: MemoryReading, wall_seconds: float) -> Any:
    """The reading as a telemetry ``MemoryReport`` (bytes_used: Redis' used_memory)."""
    from borgdqn.proto.borg.v1 import telemetry_pb2 as pb

    report = pb.MemoryReport(
        size=reading.size, capacity=reading.capacity, inserted=reading.inserted, sampled=reading.sampled,
        rejected=reading.rejected, bytes_used=reading.used_memory, per_agent_steps=reading.per_agent,
        wall_seconds=wall_seconds, dropped_chunks=reading.dropped_chunks, skipped_chunks=reading.skipped_chunks,
        outage_seconds=reading.outage_s, write_errors=reading.write_errors,
    )  # fmt: skip
    if reading.lag_p99_ms is not None:
        report.replication_lag_p99_ms = reading.lag_p99_ms
    if reading.insert_rate is not None:
        report.insert_rate = reading.insert_rate
    if reading.sample_rate is not None:
        report.sample_rate = reading.sample_rate
    return report


class KafkaPublisher:
    """Sends each reading to Kafka as a ``MemoryReport`` event (source ``<collective>/memory-<index>/...``)
    through a :class:`~borgdqn.telemetry.producer.TelemetryProducer`: never blocks the monitor, buffers while
    Kafka is away. ``wall_seconds`` counts from the publisher's start."""

    def __init__(self, bootstrap: str, collective: str, *, index: int = 0, max_buffered: int = 10_000,
                 close_timeout_s: float = 5.0, access: KafkaAccess | None = None) -> None:  # fmt: skip
        from borgdqn.telemetry.events import Source
        from borgdqn.telemetry.producer import TelemetryProducer

        self.producer = TelemetryProducer(bootstrap, Source.new(collective, "memory", index),
                                          max_buffered=max_buffered, access=access)  # fmt: skip
        self._started = time.monotonic()
        self._close_timeout_s = close_timeout_s

    def publish(self, reading: MemoryReading) -> None:
        self.producer.emit(memory_report(reading, time.monotonic() - self._started))

    def close(self) -> None:
        self.producer.close(self._close_timeout_s)


class FanOutPublisher:
    """Publishes each reading to every publisher; one failing does not keep the reading from the others."""

    def __init__(self, *publishers: Publisher) -> None:
        self.publishers = publishers

    def publish(self, reading: MemoryReading) -> None:
        for publisher in self.publishers:
            try:
                publisher.publish(reading)
            except Exception as err:
                log.warning("memory monitor: publishing to %s failed: %s", type(publisher).__name__, one_line(err))

    def close(self) -> None:
        for publisher in self.publishers:
            try:
                publisher.close()
            except Exception as err:
                log.warning("memory monitor: closing %s failed: %s", type(publisher).__name__, one_line(err))


@dataclass
class _Previous:
    at: float  # monotonic
    inserted: int
    sampled: int


def _rate(now: int, before: int, seconds: float) -> float | None:
    if seconds <= 0 or now < before:
        return None
    return (now - before) / seconds


class MemoryMonitor:
    """Reads memory ``name`` through ``client`` (a ``redis.Redis``) and publishes each reading.

    ``where`` names the server in log lines (an address without a password). ``clock`` is the monotonic clock
    the rates are measured with.
    """

    def __init__(
        self,
        client: Any,
        name: str,
        publisher: Publisher,
        *,
        where: str = "redis",
        interval_s: float = 10.0,
        max_backoff_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval_s > 0:
            raise MonitorConfigError(f"interval must be > 0 seconds, not {interval_s}")
        self._r = client
        self.name = name
        self.publisher = publisher
        self.where = where
        self.interval_s = interval_s
        self.max_backoff_s = max(max_backoff_s, 0.01)
        self._clock = clock
        self._previous: _Previous | None = None

    # ------------------------------------------------------------------------------------------ one reading
    def read(self) -> MemoryReading:
        """One reading. Raises MemoryNotCreated, MonitorError (a config that is not ours) or redis's errors."""
        try:
            state = read_state(self._r, self.name)
        except LogNotCreated as err:
            raise MemoryNotCreated(f"{err} on {self.where}") from None
        except ValueError as err:
            raise MonitorError(str(err)) from None
        info = self._r.info("memory")
        at = self._clock()
        links = state.link_totals()
        inserted, size, capacity, sampled = state.inserted, state.size, state.shape.capacity, links.sampled
        previous = self._previous
        self._previous = _Previous(at=at, inserted=inserted, sampled=sampled)
        return MemoryReading(
            name=self.name, time=time.time(), size=size, capacity=capacity, fill=size / capacity,
            chunks=state.held_chunks, inserted=inserted, sampled=sampled, rejected=links.bad_chunks,
            insert_rate=None if previous is None else _rate(inserted, previous.inserted, at - previous.at),
            sample_rate=None if previous is None else _rate(sampled, previous.sampled, at - previous.at),
            used_memory=int(info.get("used_memory", 0)), maxmemory=int(info.get("maxmemory", 0)),
            chunk_bytes=state.bytes, bytes_per_step=state.bytes / size if size else 0.0,
            per_agent=state.per_agent,
            per_agent_share={a: n / size for a, n in state.per_agent.items()} if size else {},
            links=links.links, catching_up=links.catching_up, dropped_chunks=links.dropped_chunks,
            write_errors=links.write_errors, skipped_chunks=links.skipped_chunks, outage_s=links.outage_s,
            lag_p99_ms=links.lag_p99_ms,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event | None = None) -> None:
        """Reads and publishes every ``interval_s`` until ``stop`` is set; rides out Redis' outages, and raises
        MonitorError (one line) only when Redis refuses its user, password or a command."""
        import redis

        stop = stop or threading.Event()
        state = ""  # "" while readings succeed; else the kind of trouble last logged
        down_since = 0.0
        backoff = min(0.5, self.max_backoff_s)
        while not stop.is_set():
            wait = self.interval_s
            try:
                reading = self.read()
            except MemoryNotCreated as err:
                if state != "absent":
                    log.info("memory monitor: %s; waiting for it", err)
                state = "absent"
            except (redis.RedisError, OSError, MonitorError) as err:
                if refused_access(err) or untrusted_server(err):  # waiting cures neither
                    raise refused(self.where, err) from None
                if not state.startswith("down"):
                    down_since = self._clock()
                    log.warning(
                        "memory monitor: reading %r from %s failed (%s); retrying with backoff up to %.0fs",
                        self.name,
                        self.where,
                        one_line(err),
                        self.max_backoff_s,
                    )
                    backoff = min(0.5, self.max_backoff_s)
                state = "down"
                wait = backoff
                backoff = min(backoff * 2, self.max_backoff_s)
            else:
                if state == "down":
                    log.info("memory monitor: %s answers again after %.1fs", self.where, self._clock() - down_since)
                state = ""
                try:
                    self.publisher.publish(reading)
                except Exception as err:  # a publisher's trouble must not end the monitor
                    log.warning("memory monitor: publishing failed: %s", one_line(err))
            stop.wait(wait)


def refused(where: str, err: BaseException) -> MonitorError:
    """What no retry cures: a refused user, password or command, or a certificate that does not verify."""
    if untrusted_server(err):
        return MonitorError(f"redis at {where}: its TLS certificate did not verify ({one_line(err)}): check "
                            "--ca-file")
    return MonitorError(f"redis at {where} refused the monitor ({one_line(err)}): check {REDIS_USERNAME_ENV} and "
                        "the password")


# ---------------------------------------------------------------------------------------------- command line
def read_password(password_file: Path | None, environ: Mapping[str, str] | None = None) -> str:
    """The Redis password: the file's content, exactly (a mounted Secret), else ``BORG_REDIS_PASSWORD``."""
    if password_file is not None:
        try:
            return password_file.read_text()
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err.__class__.__name__
            raise MonitorConfigError(f"--password-file: cannot read {password_file}: {reason}") from None
    return (os.environ if environ is None else environ).get(REDIS_PASSWORD_ENV, "")


def connect(url: str, password: str, username: str = "", ca_file: Path | None = None) -> tuple[Any, str]:
    """A client of ``url`` (``redis://HOST:PORT/DB``, no password in it; ``rediss://`` over TLS, verified against
    ``ca_file``, else the system's CAs) as ``username`` (empty: Redis' default user) and the address for log lines.

    The client does not retry by itself (the monitor's loop does, with backoff) and waits at most 5 s.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError:
        raise MonitorConfigError("--memory: not a redis://HOST:PORT/DB URL") from None
    if parts.password is not None or parts.username is not None:
        # Not echoed: the URL holds a secret.
        raise MonitorConfigError(
            f"--memory: the URL holds a password; give it in {REDIS_PASSWORD_ENV} or "
            "--password-file instead (process arguments are visible to every user)"
        )
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise MonitorConfigError(f"--memory: {url!r} is not a redis://HOST:PORT/DB URL")
    if ca_file is not None and parts.scheme != "rediss":
        raise MonitorConfigError("--ca-file needs a rediss:// --memory (TLS)")
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise MonitorConfigError(f"--memory: database {db_text!r} in {url!r} is not a number")
    where = f"{parts.scheme}://{parts.hostname}:{port}/{int(db_text)}"
    client = redis.Redis(
        host=parts.hostname,
        port=port,
        db=int(db_text),
        username=username or None,
        password=password or None,
        ssl=parts.scheme == "rediss",
        ssl_ca_certs=None if ca_file is None else str(ca_file),
        ssl_check_hostname=parts.scheme == "rediss",
        socket_timeout=5,
        socket_connect_timeout=5,
        retry=Retry(NoBackoff(), 0),
    )
    return client, where


def check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise MonitorConfigError(f"--name: {name!r} is not a memory name ({NAME_PATTERN_HELP})")
    return name


def serve(
    url: str,
    name: str,
    *,
    interval_s: float = 10.0,
    once: bool = False,
    password_file: Path | None = None,
    ca_file: Path | None = None,
    publisher: Publisher | None = None,
    kafka: str = "",
    collective: str = "",
    kafka_access: KafkaAccess | None = None,
) -> int:
    """``borgdqn memory-monitor``: one reading (``once``) or readings until SIGTERM/SIGINT; returns 0.

    Raises MonitorConfigError for bad input and, with ``once``, MonitorError when no reading can be made.
    """
    import redis

    check_name(name)
    if not (math.isfinite(interval_s) and interval_s > 0):
        raise MonitorConfigError(f"--interval must be > 0 seconds, not {interval_s}")
    access = kafka_access or KafkaAccess()
    client, where = connect(url, read_password(password_file), os.environ.get(REDIS_USERNAME_ENV, ""), ca_file)
    publisher = publisher or LogPublisher()
    if kafka:
        try:
            publisher = FanOutPublisher(publisher, KafkaPublisher(kafka, collective or name, access=access))
        except ValueError as err:  # a bad address or collective name
            client.close()
            raise MonitorConfigError(f"--kafka/--collective: {err}") from None
    monitor = MemoryMonitor(client, name, publisher, where=where, interval_s=interval_s)
    try:
        if once:
            try:
                publisher.publish(monitor.read())
            except redis.RedisError as err:
                if refused_access(err) or untrusted_server(err):
                    raise refused(where, err) from None
                raise MonitorError(f"redis at {where} unreachable ({one_line(err)})") from None
            return 0
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
        log.info("memory monitor: reading %r on %s every %gs", name, where, interval_s)
        with contextlib.suppress(KeyboardInterrupt):
            monitor.run(stop)
        return 0
    finally:
        publisher.close()
        client.close()
