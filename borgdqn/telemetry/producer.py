"""The telemetry producer: events from agents and the memory monitor to Kafka, never in their way.

``emit`` is all a caller does: it numbers the event (the source's next ``seq``), wraps it in a
``TelemetryEvent`` envelope, appends the encoded bytes to a bounded buffer and returns at once. It never waits
for Kafka and never raises for Kafka's sake. A background thread runs its own asyncio loop with an
``aiokafka.AIOKafkaProducer``: every ``linger_ms`` it hands what the buffer holds to the client as one batch,
compressed (gzip). The caller never wakes that thread (a wake-up per event would cost more than the event),
except when a burst fills a batch before the timer comes round (once a second by default: dashboards refresh
every few seconds, and each round costs a wake-up, a request and its acknowledgement).

While Kafka is away the events stay in the buffer (and up to ``max_in_flight`` of them in the client, which
retries them): nothing is lost until the buffer holds ``max_buffered`` events. Then every new event drops the
oldest one still waiting; the drop is counted (``dropped``) and its seq remembered. Once Kafka takes events
again, a ``DropReport`` (cumulative count, seq range of the drops since the previous report) goes out, with a
seq of its own. So for every source: events delivered + events dropped == seqs handed out, and the gaps in a
source's seq are exactly the dropped events.

The client is idempotent (``enable_idempotence``: acks from all in-sync replicas, broker-side de-duplication
of the client's own retries), so a broker that dies after writing a batch but before acknowledging it does not
get that batch twice. Consumers still store an event once per ``source_id:seq`` (see ``events.event_id``).

Topics: on start (and after every reconnect until it succeeded) the producer creates the missing topics of
``TOPICS`` with :data:`TOPIC_SETTINGS` (partitions, retention) and replication factor ``min(3, brokers)``. A
failed creation is logged and retried later; it never holds events back (a broker that auto-creates topics
takes them anyway). Events are keyed by ``source_id``: one source's events stay in order on one partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from google.protobuf.message import Message

from borgdqn.config import parse_kafka_bootstrap as parse_bootstrap
from borgdqn.one_line import one_line
from borgdqn.proto.borg.v1 import telemetry_pb2 as pb
from borgdqn.telemetry.events import EVENT_KINDS, KIND_OF_MESSAGE, KINDS, TOPICS, Kind, Source, encode_event, header
from borgdqn.telemetry.kafka_access import KafkaAccess

if TYPE_CHECKING:
    from borgdqn.config import BorgConfig

log = logging.getLogger(__name__)

DEFAULT_BUFFER = 10_000
# gzip: every Kafka client and broker reads it without extra libraries (aiokafka 0.14 needs `cramjam` for
# lz4/zstd/snappy, on the producer AND on every consumer). Telemetry is a few events per second per source,
# so gzip's CPU cost is negligible, and batches of events that repeat the same collective and source_id
# shrink several times.
DEFAULT_COMPRESSION = "gzip"
_MAX_ATTEMPTS = 5  # sends an event may fail with a non-retriable error before it counts as dropped
_STALL_S = 5.0  # no acknowledgement for this long while events are in flight: Kafka is away
_DROP_REPORT_EVERY_S = 1.0  # at most one DropReport per second (an overloaded link would send one per ack)
_TOPIC_RETRY_S = 30.0


@dataclass(frozen=True)
class TopicSettings:
    partitions: int
    retention_ms: int


TOPIC_SETTINGS: dict[Kind, TopicSettings] = {
    row.kind: TopicSettings(partitions=row.partitions, retention_ms=row.retention_ms) for row in EVENT_KINDS
}

# aiokafka logs every reconnect attempt of an outage (several ERROR lines a second); the producer says it once
# in its own words, and lets each of aiokafka's messages through once a minute.
_CLIENT_LOGGERS = ("aiokafka", "aiokafka.conn", "aiokafka.cluster", "aiokafka.producer.sender",
                   "aiokafka.producer.producer", "aiokafka.admin.client")
_CLIENT_LOG_EVERY_S = 60.0
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


def collective_from_path(run_dir: Path) -> str:
    """A collective name from a run directory's name (only the characters an event header allows)."""
    name = _NAME_CHARS.sub("-", Path(run_dir).resolve().name).strip("-.")[:63]
    return name or "hive"


class _OncePerInterval(logging.Filter):
    """Lets a message (by its logger and format string) through at most once per ``every_s`` seconds."""

    def __init__(self, every_s: float) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -float("inf")) < self.every_s:
                return False
            if len(self._last) > 1000:
                self._last.clear()
            self._last[key] = now
            return True


_client_log_filter = _OncePerInterval(_CLIENT_LOG_EVERY_S)


def _quiet_client_logs() -> None:
    for name in _CLIENT_LOGGERS:
        logger = logging.getLogger(name)
        if _client_log_filter not in logger.filters:
            logger.addFilter(_client_log_filter)


@dataclass(frozen=True)
class ProducerStats:
    emitted: int  # seqs handed out: events and DropReports
    sent: int  # acknowledged by Kafka
    dropped: int  # dropped from the full buffer (or refused by Kafka for good): the gaps in seq
    buffered: int  # waiting in the buffer
    in_flight: int  # handed to the Kafka client, not yet acknowledged

    @property
    def unsent(self) -> int:
        return self.buffered + self.in_flight


class _Item(NamedTuple):
    seq: int
    kind: Kind
    value: bytes
    attempts: int = 0


class TelemetryProducer:
    """Sends telemetry events of one ``source`` to Kafka at ``bootstrap`` (``HOST:PORT[,HOST:PORT]``).

    ``emit`` never blocks and never raises for Kafka's sake; ``close`` flushes what it can in its time.
    """

    def __init__(
        self,
        bootstrap: str,
        source: Source,
        *,
        max_buffered: int = DEFAULT_BUFFER,
        max_in_flight: int = 500,
        linger_ms: int = 1000,
        compression: str | None = DEFAULT_COMPRESSION,
        topics: dict[Kind, TopicSettings] | None = None,
        create_topics: bool = True,
        request_timeout_ms: int = 10_000,
        backoff_s: tuple[float, float] = (0.5, 30.0),
        access: KafkaAccess | None = None,
    ) -> None:
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be >= 1, not {max_buffered}")
        self.bootstrap = ",".join(parse_bootstrap(bootstrap))
        self.source = source
        self.max_buffered = max_buffered
        # Events in the client cannot be dropped: keep most of the buffer droppable.
        self._window = max(1, min(max_in_flight, max_buffered // 2))
        self._linger_ms = linger_ms
        self._compression = compression
        self._topics = dict(topics or TOPIC_SETTINGS)
        self._topics_ready = not create_topics
        self._topics_tried = -float("inf")
        self._request_timeout_ms = request_timeout_ms
        self._backoff_min, self._backoff_max = backoff_s
        self._key = source.source_id.encode()
        self._access = access or KafkaAccess()  # TLS and the SASL login (kafka_access.py)

        self._lock = threading.Lock()
        self._queue: deque[_Item] = deque()  # new events, oldest first
        self._retry: list[_Item] = []  # heap by seq: events the client gave back
        self._in_flight = 0
        self._next_seq = 0
        self._sent = 0
        self._dropped = 0
        self._unreported: tuple[int, int] | None = None  # seq range of the drops since the last DropReport
        self._dropping_logged = False
        self._last_drop = 0.0
        self._last_ack = 0.0
        self._last_drop_report = -float("inf")
        self._progress = time.monotonic()  # last ack, or when events went in flight with none before
        self._down_since: float | None = None
        self._closed = False  # no more emits
        self._closing = False  # the loop flushes and ends
        self._wake_requested = False
        self._restart = False  # the client failed for good: replace it

        _quiet_client_logs()
        self._producer: Any = None
        self._pending: dict[int, _Item] = {}  # seq -> event the current client holds (loop thread only)
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        self._close_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._topics_task: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._thread_main, name=f"telemetry-{source.role}-{source.index}",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        log.info("telemetry producer source=%s kafka=%s buffer=%d compression=%s", source.source_id,
                 self.bootstrap, max_buffered, compression or "none")  # fmt: skip

    # ------------------------------------------------------------------------------------------ the caller
    def emit(self, payload: Message) -> int | None:
        """Queue one event (a payload message of ``EVENT_KINDS``); returns its seq (None after ``close``). Never
        blocks on Kafka.

        Raises TypeError only for a payload that is not an event kind (a bug), never for Kafka's sake.
        """
        kind = KIND_OF_MESSAGE.get(type(payload))
        if kind is None:
            raise TypeError(f"not a telemetry payload: {type(payload).__name__}")
        event = pb.TelemetryEvent()
        getattr(event, kind).CopyFrom(payload)
        with self._lock:
            if self._closed:
                return None
            seq = self._next_seq
            self._next_seq += 1
            event.header.CopyFrom(header(self.source, seq))
            self._queue.append(_Item(seq, kind, encode_event(event)))
            first_drop = self._trim()
            # A burst that fills a batch while the client has room: no need to wait for the timer.
            wake = not self._wake_requested and len(self._queue) >= self._window and self._in_flight < self._window
            self._wake_requested = self._wake_requested or wake
        if first_drop:
            log.warning("telemetry buffer full source=%s buffered=%d: dropping the oldest events (counted, "
                        "reported once Kafka takes events again)", self.source.source_id, self.max_buffered)
        if wake:
            self._signal()
        return seq

    def stats(self) -> ProducerStats:
        with self._lock:
            return ProducerStats(emitted=self._next_seq, sent=self._sent, dropped=self._dropped,
                                 buffered=len(self._queue) + len(self._retry), in_flight=self._in_flight)

    @property
    def dropped(self) -> int:
        return self.stats().dropped

    def close(self, timeout_s: float = 5.0) -> ProducerStats:
        """Flush for up to ``timeout_s`` seconds, stop the client and the thread, log the counts."""
        with self._lock:
            already = self._closed
            self._closed = True
        if not already:
            with contextlib.suppress(RuntimeError):  # the loop is already gone
                self._loop.call_soon_threadsafe(self._begin_close, max(0.0, timeout_s))
        self._thread.join(timeout_s + 5.0)
        stats = self.stats()
        if not already:
            log.info("telemetry closed source=%s emitted=%d sent=%d dropped=%d unsent=%d", self.source.source_id,
                     stats.emitted, stats.sent, stats.dropped, stats.unsent)  # fmt: skip
        return stats

    def __enter__(self) -> TelemetryProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ the buffer
    def _trim(self) -> bool:
        """Drops the oldest waiting events while over the limit (lock held); True for an outage's first drop."""
        first = False
        while len(self._queue) + len(self._retry) + self._in_flight > self.max_buffered:
            if self._retry and (not self._queue or self._retry[0].seq < self._queue[0].seq):
                item = heapq.heappop(self._retry)
            elif self._queue:
                item = self._queue.popleft()
            else:
                break  # only events in flight: they are Kafka's now
            first = self._count_drop(item.seq) or first
        return first

    def _count_drop(self, seq: int) -> bool:
        self._dropped += 1
        self._last_drop = time.monotonic()
        lo, hi = self._unreported or (seq, seq)
        self._unreported = (min(lo, seq), max(hi, seq))
        first = not self._dropping_logged
        self._dropping_logged = True
        return first

    def _take(self, n: int) -> list[_Item]:
        """Up to ``n`` events to hand to the client (given-back ones first), counted in flight."""
        with self._lock:
            self._wake_requested = False
            out: list[_Item] = []
            while len(out) < n and self._retry:
                out.append(heapq.heappop(self._retry))
            while len(out) < n and self._queue:
                out.append(self._queue.popleft())
            if out and self._in_flight == 0:
                self._progress = time.monotonic()
            self._in_flight += len(out)
            return out

    def _give_back(self, items: list[_Item], fatal: bool) -> None:
        """Events the client could not deliver: back to the buffer, to be retried (loop thread)."""
        with self._lock:
            self._in_flight -= len(items)
            for item in items:
                attempts = item.attempts + (1 if fatal else 0)
                if attempts >= _MAX_ATTEMPTS:
                    self._count_drop(item.seq)
                    log.warning("telemetry event seq=%d refused by Kafka %d times: dropped", item.seq, attempts)
                else:
                    heapq.heappush(self._retry, item._replace(attempts=attempts))
            self._trim()

    def _drained(self) -> bool:
        with self._lock:
            return not self._queue and not self._retry and self._in_flight == 0 and self._unreported is None

    # ------------------------------------------------------------------------------------------ the loop
    def _signal(self) -> None:
        with contextlib.suppress(RuntimeError):  # closed loop: the producer is gone
            self._loop.call_soon_threadsafe(self._wake.set)

    def _begin_close(self, timeout_s: float) -> None:
        self._closing = True
        self._wake.set()
        self._close_event.set()
        if self._task is not None:
            self._loop.call_later(timeout_s, self._task.cancel)

    def _thread_main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._task = self._loop.create_task(self._run())
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug: log it, never take the caller down
            log.exception("telemetry sender failed source=%s", self.source.source_id)
        finally:
            with self._lock:
                self._closed = True
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _run(self) -> None:
        try:
            await self._serve()
        finally:
            producer, self._producer = self._producer, None
            if producer is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(producer.stop()), timeout=2.0)

    async def _serve(self) -> None:
        backoff = self._backoff_min
        while True:
            self._wake.clear()
            if self._closing and self._drained():
                return
            if self._restart and self._producer is not None:
                await self._abandon_client()
            self._restart = False
            if self._producer is None:
                self._producer = await self._start_client()
                if self._producer is None:
                    if self._closing:  # one more try now and then until close's deadline
                        await asyncio.sleep(min(backoff, 0.5))
                    else:
                        with contextlib.suppress(asyncio.TimeoutError):  # only close cuts a backoff short
                            await asyncio.wait_for(self._close_event.wait(), timeout=backoff)
                    backoff = min(backoff * 2, self._backoff_max)
                    continue
                backoff = self._backoff_min
            if not self._topics_ready and time.monotonic() - self._topics_tried >= _TOPIC_RETRY_S:
                if self._topics_tried < 0:  # the first try before the first send (else the broker may auto-create)
                    await self._ensure_topics()
                elif self._topics_task is None or self._topics_task.done():  # retries beside the sending
                    self._topics_tried = time.monotonic()
                    self._topics_task = asyncio.ensure_future(self._ensure_topics())
            self._maybe_report_drops()
            self._watch_stall()
            batch = self._take(self._window - self._in_flight)
            for i, item in enumerate(batch):
                try:
                    future = await self._producer.send(TOPICS[item.kind], item.value, key=self._key)
                except Exception as err:  # not taken by the client (no metadata, full, closed): retry later
                    fatal = _fatal(err)
                    self._give_back(batch[i:], fatal)
                    self._note_trouble(err)
                    self._restart = self._restart or fatal
                    break
                self._pending[item.seq] = item
                future.add_done_callback(functools.partial(self._delivered, item))
            await self._sleep(self._linger_ms / 1000)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    async def _abandon_client(self) -> None:
        """Stops a client that failed for good; what it still held goes back to the buffer."""
        producer, self._producer = self._producer, None
        items = list(self._pending.values())
        self._pending.clear()
        if items:
            self._give_back(items, fatal=False)
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(producer.stop(), timeout=5.0)

    def _delivered(self, item: _Item, future: asyncio.Future[Any]) -> None:
        """A send's outcome (loop thread)."""
        if self._pending.pop(item.seq, None) is None:
            return  # given back when its client was abandoned
        err = None if future.cancelled() else future.exception()
        if future.cancelled() or err is not None:
            fatal = err is not None and _fatal(err)
            self._give_back([item], fatal)
            self._restart = self._restart or fatal
            if err is not None:
                self._note_trouble(err)
        else:
            now = time.monotonic()
            with self._lock:
                self._in_flight -= 1
                self._sent += 1
                self._last_ack = self._progress = now
            if self._down_since is not None:
                log.info("telemetry: kafka=%s takes events again after %.1fs source=%s", self.bootstrap,
                         now - self._down_since, self.source.source_id)  # fmt: skip
                self._down_since = None
        self._wake.set()

    def _maybe_report_drops(self) -> None:
        """Once Kafka acknowledged an event after the last drop: a DropReport, with a seq of its own."""
        now = time.monotonic()
        with self._lock:
            if self._unreported is None or self._last_ack <= self._last_drop:
                return
            if now - self._last_drop_report < _DROP_REPORT_EVERY_S and not self._closing:
                return
            first, last = self._unreported
            seq = self._next_seq
            self._next_seq += 1
            event = pb.TelemetryEvent(header=header(self.source, seq))
            event.drops.CopyFrom(pb.DropReport(dropped_events=self._dropped, first_dropped_seq=first,
                                               last_dropped_seq=last))  # fmt: skip
            heapq.heappush(self._retry, _Item(seq, "drops", encode_event(event)))
            self._unreported = None
            self._dropping_logged = False
            self._last_drop_report = now
            dropped = self._dropped
            self._trim()
        log.warning("telemetry dropped events source=%s total=%d seq=%d..%d (reported)", self.source.source_id,
                    dropped, first, last)  # fmt: skip

    def _watch_stall(self) -> None:
        with self._lock:
            stalled = self._in_flight > 0 and time.monotonic() - self._progress > _STALL_S
            held = len(self._queue) + len(self._retry) + self._in_flight
        if stalled and self._down_since is None:
            self._down_since = self._progress
            log.warning("telemetry: kafka=%s has acknowledged nothing for %.0fs; buffering up to %d events "
                        "source=%s held=%d", self.bootstrap, _STALL_S, self.max_buffered, self.source.source_id,
                        held)  # fmt: skip

    def _note_trouble(self, err: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("telemetry: sending to kafka=%s failed (%s); buffering up to %d events, retrying "
                        "source=%s", self.bootstrap, one_line(err), self.max_buffered,
                        self.source.source_id)  # fmt: skip

    async def _start_client(self) -> Any:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=f"borgdqn-{self.source.role}-{self.source.index}",
            acks="all",
            enable_idempotence=True,
            compression_type=self._compression,
            linger_ms=0,  # the batch is whatever the buffer held at this round
            partitioner=_CachedPartitioner(),
            max_batch_size=64 * 1024,
            request_timeout_ms=self._request_timeout_ms,
            retry_backoff_ms=500,
            **self._access.client_options(),
        )
        try:
            await asyncio.wait_for(producer.start(), timeout=self._request_timeout_ms / 1000 + 5)
        except Exception as err:
            self._note_trouble(err)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), timeout=2.0)
            return None
        log.debug("telemetry client started kafka=%s source=%s", self.bootstrap, self.source.source_id)
        return producer

    async def _ensure_topics(self) -> None:
        """Creates the missing topics; logs (and retries later) on failure, never raises."""
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        self._topics_tried = time.monotonic()
        timeout_s = self._request_timeout_ms / 1000
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=self._request_timeout_ms,
                                    **self._access.client_options())
        try:
            await asyncio.wait_for(admin.start(), timeout=timeout_s)
            existing = set(await asyncio.wait_for(admin.list_topics(), timeout=timeout_s))
            missing = [kind for kind in KINDS if TOPICS[kind] not in existing and kind in self._topics]
            if missing:
                cluster = await asyncio.wait_for(admin.describe_cluster(), timeout=timeout_s)
                replicas = max(1, min(3, len(cluster.get("brokers") or [])))
                new = [NewTopic(TOPICS[kind], self._topics[kind].partitions, replicas,
                                topic_configs={"retention.ms": str(self._topics[kind].retention_ms)})
                       for kind in missing]  # fmt: skip
                response = await asyncio.wait_for(admin.create_topics(new, timeout_ms=self._request_timeout_ms),
                                                  timeout=timeout_s * 2)  # fmt: skip
                for entry in response.topic_errors:
                    name, code = entry[0], entry[1]
                    if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (another source was first)
                        reason = entry[2] if len(entry) > 2 and entry[2] else f"error code {code}"
                        raise RuntimeError(f"creating {name}: {reason}")
                log.info("telemetry topics created %s partitions=%s replication=%d",
                         ",".join(TOPICS[k] for k in missing),
                         ",".join(str(self._topics[k].partitions) for k in missing), replicas)  # fmt: skip
            self._topics_ready = True
        except Exception as err:
            log.warning("telemetry: creating topics on kafka=%s failed (%s); sending anyway, retrying in %.0fs",
                        self.bootstrap, one_line(err), _TOPIC_RETRY_S)  # fmt: skip
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(admin.close(), timeout=2.0)


class _CachedPartitioner:
    """aiokafka's default partitioner (murmur2 of the key, as Kafka's Java client), computed once per key and
    partition count: every event of a source has the same key, and murmur2 in pure Python costs per event."""

    def __init__(self) -> None:
        from aiokafka.partitioner import DefaultPartitioner

        self._default = DefaultPartitioner()
        self._cache: dict[tuple[bytes | None, int], int] = {}

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return int(self._default(key, all_partitions, available))
        cached = self._cache.get((key, len(all_partitions)))
        if cached is None:
            cached = self._cache[(key, len(all_partitions))] = int(self._default(key, all_partitions, available))
        return cached


def _fatal(err: BaseException) -> bool:
    """An error that retrying with the same client will not cure (timeouts and retriable errors will)."""
    if isinstance(err, asyncio.TimeoutError) or err.__class__.__name__ == "KafkaTimeoutError":
        return False
    return not getattr(err, "retriable", False)


def producer_for(config: BorgConfig, role: str, index: int, name: str = "") -> TelemetryProducer | None:
    """The producer ``config.telemetry`` asks for (None when ``telemetry.kafka`` is empty); the collective is
    ``telemetry.collective``, else the run directory's name; ``name`` (a pod's) replaces ``role-index`` in the
    source id."""
    telemetry = config.telemetry
    if not telemetry.kafka:
        return None
    collective = telemetry.collective or collective_from_path(config.hive.out)
    source = Source.new(collective, role, index, name=name)
    access = KafkaAccess.of_telemetry(telemetry)
    return TelemetryProducer(telemetry.kafka, source, max_buffered=telemetry.buffer_events, access=access)
