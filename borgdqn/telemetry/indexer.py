"""The indexer: a Kafka consumer group that writes telemetry events to Elasticsearch with the bulk API.

Delivery is at-least-once with an exactly-once effect:

- every document has an id derived from its event (``source_id:seq``, see :mod:`borgdqn.telemetry.documents`)
  and is written with the bulk ``index`` op, so an event indexed twice (a replay after a crash, a rebalance) is
  overwritten with the same content, never stored twice;
- a batch's Kafka offsets are committed only after Elasticsearch acknowledged every document of the batch (or
  rejected it for good), and batches commit in the order they were read, so a crash at any point replays from
  the last acknowledged batch: no gaps.

Failures:

- a message that is no event (:class:`~borgdqn.telemetry.events.BadEvent`) is counted, logged once per stretch
  of bad messages on its partition (topic, partition, offset, reason), and skipped;
- a document Elasticsearch refuses for its content (a 4xx item status other than 429: a mapping conflict, a
  number out of range) is counted, logged once per (index, error type), and skipped;
- Elasticsearch unreachable, overloaded (429) or failing (5xx), for the whole request or for some items: the
  indexer retries those with capped exponential backoff, commits nothing meanwhile, and reads at most
  ``pipeline`` batches ahead, so an outage costs bounded memory and nothing else.

It stops on SIGTERM/SIGINT: no new batches; batches in flight finish if Elasticsearch acknowledges them
(they are not retried any more), what was acknowledged is committed, and the consumer leaves its group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from borgdqn.one_line import one_line_text
from borgdqn.telemetry.documents import ALL_INDICES, index_templates
from borgdqn.telemetry.documents import documents as event_documents
from borgdqn.telemetry.events import KINDS, BadEvent, decode_event
from borgdqn.telemetry.kafka_access import KafkaAccess

log = logging.getLogger(__name__)

DEFAULT_GROUP = "borg-indexer"
DEFAULT_TOPIC_PREFIX = "borg.telemetry."
ES_USERNAME_ENV = "BORG_ES_USERNAME"
ES_PASSWORD_ENV = "BORG_ES_PASSWORD"
ES_API_KEY_ENV = "BORG_ES_API_KEY"
# Only what the indexer reads of a bulk response: a 5,000-item answer parses in a fraction of the time.
BULK_FILTER = "errors,items.*.status,items.*.error.type,items.*.error.reason"


class IndexerConfigError(ValueError):
    """Bad input to the indexer (an address, a credential setting, a number): one line for a person."""


@dataclass(frozen=True)
class IndexerSettings:
    kafka: str  # bootstrap HOST:PORT[,HOST:PORT...]
    es_url: str
    group: str = DEFAULT_GROUP
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    es_username: str | None = None
    es_password: str | None = field(default=None, repr=False)  # never in a repr
    es_api_key: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    replicas: int = 0
    batch_max: int = 5000  # Kafka records per bulk request
    batch_wait_ms: int = 200  # how long a poll waits for records
    pipeline: int = 2  # batches read but not yet acknowledged, at most
    report_every_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    request_timeout_s: float = 60.0
    max_poll_interval_ms: int = 600_000  # an Elasticsearch outage longer than this costs a rebalance (and replay)
    kafka_access: KafkaAccess = field(default_factory=KafkaAccess)  # TLS and the SASL login to Kafka

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(f"{self.topic_prefix}{kind}" for kind in KINDS)

    def validate(self) -> IndexerSettings:
        for part in self.kafka.split(","):
            host, _, port = part.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise IndexerConfigError(f"--kafka {self.kafka!r}: use HOST:PORT[,HOST:PORT...]")
        url = urlsplit(self.es_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise IndexerConfigError(f"--es {self.es_url!r}: use http(s)://HOST:PORT")
        if url.username or url.password:
            raise IndexerConfigError(f"--es: put no credentials in the URL; use {ES_USERNAME_ENV}/"
                                     f"{ES_PASSWORD_ENV} or {ES_API_KEY_ENV}")  # fmt: skip
        if (self.es_username is None) != (self.es_password is None):
            raise IndexerConfigError(f"set both {ES_USERNAME_ENV} and {ES_PASSWORD_ENV}, or neither")
        if self.es_api_key and self.es_username:
            raise IndexerConfigError(f"set {ES_API_KEY_ENV} or {ES_USERNAME_ENV}/{ES_PASSWORD_ENV}, not both")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise IndexerConfigError(f"--ca-file {self.ca_file}: no such file")
        if not self.group or not self.topic_prefix:
            raise IndexerConfigError("--group and --topic-prefix must not be empty")
        if self.replicas < 0 or self.batch_max < 1 or self.pipeline < 1:
            raise IndexerConfigError("--replicas must be >= 0, --batch and --pipeline >= 1")
        return self

    @classmethod
    def from_env(cls, kafka: str, es_url: str, env: Mapping[str, str] | None = None, **kwargs: Any) -> IndexerSettings:
        """Settings with the Elasticsearch credentials from the environment (never from argv); ``kafka_access``
        (kafka_access.py) says how to reach Kafka."""
        env = os.environ if env is None else env
        return cls(kafka=kafka, es_url=es_url, es_username=env.get(ES_USERNAME_ENV) or None,
                   es_password=env.get(ES_PASSWORD_ENV) or None, es_api_key=env.get(ES_API_KEY_ENV) or None,
                   **kwargs).validate()  # fmt: skip


@dataclass
class IndexerStats:
    consumed: int = 0  # Kafka records read
    indexed: int = 0  # events whose documents Elasticsearch acknowledged (all of them)
    documents: int = 0  # documents acknowledged
    malformed: int = 0  # records that are no event (skipped)
    rejected: int = 0  # documents Elasticsearch refused for their content (skipped)
    retries: int = 0  # bulk requests (or parts) sent again
    batches: int = 0  # batches committed
    commit_failures: int = 0
    committed: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, partition) -> next offset


@dataclass
class _Batch:
    actions: list[bytes]  # one action line + one source line per document, each ending in a newline
    doc_events: list[int]  # per document: the number of the event (in this batch) it belongs to
    events: int
    offsets: dict[Any, int]  # TopicPartition -> the offset after the batch's last record


class _Stopped(Exception):
    """The indexer is stopping while a batch still waits for Elasticsearch: it is left uncommitted."""


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


class Indexer:
    def __init__(self, settings: IndexerSettings) -> None:
        self.settings = settings.validate()
        self.stats = IndexerStats()
        self._stop = asyncio.Event()
        self._es: Any = None
        self._consumer: Any = None
        self._bad_stretch: dict[Any, list[int]] = {}  # tp -> [first offset, last offset, count]
        self._rejected_seen: set[tuple[str, str]] = set()
        self._next_offset: dict[Any, int] = {}
        self._es_down_since: float | None = None
        self.ready = asyncio.Event()  # set once templates are installed and the consumer has started

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Asks the indexer to stop (safe from a signal handler): commit what was acknowledged, then leave."""
        if not self._stop.is_set():
            log.info("indexer stopping")
        self._stop.set()

    def _make_es(self) -> Any:
        from elasticsearch import Elasticsearch

        s = self.settings
        kwargs: dict[str, Any] = {"request_timeout": s.request_timeout_s, "max_retries": 0,
                                  "retry_on_timeout": False}  # fmt: skip  # the indexer retries itself
        if s.es_api_key:
            kwargs["api_key"] = s.es_api_key
        elif s.es_username is not None and s.es_password is not None:
            kwargs["basic_auth"] = (s.es_username, s.es_password)
        if s.ca_file is not None:
            kwargs["ca_certs"] = str(s.ca_file)
        return Elasticsearch(s.es_url, **kwargs)

    async def run(self) -> IndexerStats:
        """Runs until :meth:`stop`; returns the counters."""
        from aiokafka import AIOKafkaConsumer

        s = self.settings
        self._es = self._make_es()
        self._consumer = AIOKafkaConsumer(
            *s.topics, bootstrap_servers=s.kafka, group_id=s.group, enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_records=s.batch_max, max_poll_interval_ms=s.max_poll_interval_ms,
            client_id=f"{s.group}-{os.getpid()}", **s.kafka_access.client_options())  # fmt: skip
        try:
            if not await self._retrying("install index templates", self._install_templates):
                return self.stats
            if not await self._retrying("connect to Kafka", self._consumer.start):
                return self.stats
            log.info("indexer started group=%s topics=%s es=%s", s.group, ",".join(s.topics), s.es_url)
            self.ready.set()
            await self._loop()
        finally:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._es.close()
            self._log_progress(0.0, final=True)
        return self.stats

    async def _retrying(self, what: str, action: Any) -> bool:
        """Runs ``action`` (sync or async) until it succeeds; False when stopped first."""
        attempt = 0
        while not self._stop.is_set():
            try:
                result = action()
                if asyncio.iscoroutine(result):
                    await result
                if attempt:
                    log.info("%s: succeeded after %d retries", what, attempt)
                return True
            except Exception as err:  # unreachable server, refused credentials: retry, never give up
                delay = self._backoff_s(attempt)
                log.warning("cannot %s: %s; retrying in %.1fs", what, one_line_text(err), delay)
                attempt += 1
                await self._sleep(delay)
        return False

    def _install_templates(self) -> None:
        """Index templates (idempotent PUT), then every index created, or its mapping brought up to the
        template's (new fields are added; a conflicting one is logged: that index keeps its old type)."""
        from elasticsearch import BadRequestError

        es = self._es
        for name, body in index_templates(replicas=self.settings.replicas).items():
            es.indices.put_index_template(name=name, index_patterns=body["index_patterns"],
                                          priority=body["priority"], template=body["template"], meta=body["_meta"])
            mappings = body["template"]["mappings"]
            if es.indices.exists(index=name):
                try:
                    es.indices.put_mapping(index=name, properties=mappings["properties"],
                                           dynamic=mappings["dynamic"])
                except BadRequestError as err:
                    log.error("index %s: its mapping conflicts with the template (%s); documents may be rejected",
                              name, one_line_text(err))
            else:
                try:
                    es.indices.create(index=name)
                except BadRequestError as err:
                    if "resource_already_exists" not in str(err):
                        raise
        log.info("index templates installed: %s", ",".join(ALL_INDICES))

    # -- the loop -------------------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        s = self.settings
        inflight: deque[tuple[asyncio.Task[None], _Batch]] = deque()
        last_report, reported_events = time.monotonic(), 0
        stop_wait = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stop.is_set():
                while inflight and inflight[0][0].done():
                    task, batch = inflight.popleft()
                    if task.exception() is not None and isinstance(task.exception(), _Stopped):
                        inflight.clear()  # given up while stopping: neither it nor a later batch is committed
                        return
                    task.result()
                    await self._commit(batch)
                now = time.monotonic()
                if now - last_report >= s.report_every_s:
                    self._log_progress((self.stats.indexed - reported_events) / (now - last_report))
                    last_report, reported_events = now, self.stats.indexed
                if len(inflight) >= s.pipeline:
                    await asyncio.wait({inflight[0][0], stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                    continue
                records = await self._consumer.getmany(timeout_ms=s.batch_wait_ms, max_records=s.batch_max)
                if records:
                    batch = self._build(records)
                    inflight.append((asyncio.ensure_future(self._deliver(batch)), batch))
        finally:
            stop_wait.cancel()
            # Stopping: what is in flight finishes or gives up (no more retries); commit in order what finished.
            for task, batch in inflight:
                with contextlib.suppress(_Stopped, asyncio.CancelledError):
                    await task
                if task.cancelled() or task.exception() is not None:
                    break
                await self._commit(batch)

    def _build(self, records: Mapping[Any, list[Any]]) -> _Batch:
        actions: list[bytes] = []
        doc_events: list[int] = []
        events = 0
        offsets: dict[Any, int] = {}
        for tp, recs in records.items():
            for rec in recs:
                self.stats.consumed += 1
                try:
                    docs = event_documents(decode_event(rec.value))
                except BadEvent as err:
                    self._malformed(tp, rec.offset, str(err))
                    continue
                self._end_stretch(tp)
                for index, doc_id, body in docs:
                    try:
                        source = _dumps(body)
                    except ValueError as err:  # cannot happen for documents() output; hostile input is counted
                        self._malformed(tp, rec.offset, f"unserializable document: {err}")
                        break
                    actions.append(_dumps({"index": {"_index": index, "_id": doc_id}}) + b"\n" + source + b"\n")
                    doc_events.append(events)
                events += 1
            if recs:
                offsets[tp] = recs[-1].offset + 1
                self._next_offset[tp] = offsets[tp]
        return _Batch(actions, doc_events, events, offsets)

    def _malformed(self, tp: Any, offset: int, reason: str) -> None:
        self.stats.malformed += 1
        stretch = self._bad_stretch.get(tp)
        if stretch is None:
            log.warning("malformed message skipped topic=%s partition=%d offset=%d reason=%r "
                        "(further bad messages in a row on this partition are counted, not logged)",
                        tp.topic, tp.partition, offset, reason)  # fmt: skip
            self._bad_stretch[tp] = [offset, offset, 1]
        else:
            stretch[1], stretch[2] = offset, stretch[2] + 1

    def _end_stretch(self, tp: Any) -> None:
        stretch = self._bad_stretch.pop(tp, None)
        if stretch is not None and stretch[2] > 1:
            log.warning("malformed messages skipped topic=%s partition=%d offsets=%d..%d count=%d",
                        tp.topic, tp.partition, stretch[0], stretch[1], stretch[2])

    async def _deliver(self, batch: _Batch) -> None:
        """Sends the batch's documents until each is acknowledged or rejected for good."""
        pending = list(range(len(batch.actions)))
        attempt = 0
        rejected: set[int] = set()
        while pending:
            if attempt:
                if self._stop.is_set():
                    raise _Stopped
                self.stats.retries += 1
                await self._sleep(self._backoff_s(attempt - 1))
                if self._stop.is_set():
                    raise _Stopped
            attempt += 1
            body = b"".join(batch.actions[i] for i in pending)
            try:
                resp = await asyncio.to_thread(self._bulk, body)
            except Exception as err:  # unreachable, timed out, 429/5xx or a refused request: retry
                self._es_failed(err, attempt)
                continue
            self._es_recovered()
            items = resp.get("items") or []
            if len(items) != len(pending):
                log.warning("bulk answer has %d items for %d documents; sending again", len(items), len(pending))
                continue
            if not resp.get("errors"):
                pending = []
                break
            retry = []
            for i, item in zip(pending, items, strict=True):
                result: Mapping[str, Any] = next(iter(item.values()), {})
                status = int(result.get("status", 500))
                if status < 300:
                    continue
                if status == 429 or status >= 500:
                    retry.append(i)
                else:
                    rejected.add(i)
                    self._rejected(batch.actions[i], result.get("error") or {}, status)
            pending = retry
        self.stats.documents += len(batch.actions) - len(rejected)
        self.stats.indexed += batch.events - len({batch.doc_events[i] for i in rejected})

    def _bulk(self, body: bytes) -> Any:
        return self._es.bulk(operations=body, filter_path=BULK_FILTER)

    def _rejected(self, action: bytes, error: Mapping[str, Any], status: int) -> None:
        self.stats.rejected += 1
        meta = json.loads(action.split(b"\n", 1)[0])["index"]
        key = (meta["_index"], str(error.get("type", status)))
        if key not in self._rejected_seen:
            self._rejected_seen.add(key)
            log.warning("document rejected index=%s id=%s status=%d error=%s reason=%r (further %s rejections "
                        "in this index are counted, not logged)", meta["_index"], meta["_id"], status, key[1],
                        one_line_text(error.get("reason", "")), key[1])  # fmt: skip

    def _es_failed(self, err: BaseException, attempt: int) -> None:
        if self._es_down_since is None:
            self._es_down_since = time.monotonic()
        # Logged on the first failure and at every doubling of the backoff (at most once per backoff_max_s after).
        if attempt == 1 or self._backoff_s(attempt - 1) < self.settings.backoff_max_s or attempt % 10 == 0:
            log.warning("elasticsearch bulk failed: %s; retrying (attempt %d), nothing committed meanwhile",
                        one_line_text(err), attempt)

    def _es_recovered(self) -> None:
        if self._es_down_since is not None:
            log.info("elasticsearch answers again after %.1fs", time.monotonic() - self._es_down_since)
            self._es_down_since = None

    async def _commit(self, batch: _Batch) -> None:
        if not batch.offsets:
            return
        from aiokafka import TopicPartition
        from aiokafka.errors import KafkaError

        try:
            await self._consumer.commit(batch.offsets)
        except (KafkaError, AssertionError) as err:
            # Usually a rebalance (the partitions went elsewhere, or this member was dropped): the batch is in
            # Elasticsearch, and whoever replays it overwrites the same ids.
            self.stats.commit_failures += 1
            log.warning("offset commit failed: %s; the batch is indexed and a replay overwrites it", one_line_text(err))
            return
        self.stats.batches += 1
        for tp, offset in batch.offsets.items():
            assert isinstance(tp, TopicPartition)
            self.stats.committed[(tp.topic, tp.partition)] = offset

    # -- helpers --------------------------------------------------------------------------------------------------

    def _backoff_s(self, attempt: int) -> float:
        s = self.settings
        return min(s.backoff_max_s, s.backoff_initial_s * math.pow(2, min(attempt, 30)))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    def lag(self) -> int | None:
        consumer = self._consumer
        if consumer is None:
            return None
        total, known = 0, False
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None:
                continue
            known = True
            total += max(0, high - self._next_offset.get(tp, high))
        return total if known else None

    def _log_progress(self, rate: float, final: bool = False) -> None:
        st = self.stats
        lag = self.lag()
        log.info("indexer %s events_per_s=%.0f consumed=%d indexed=%d documents=%d malformed=%d rejected=%d "
                 "retries=%d batches=%d lag=%s es=%s", "stopped" if final else "progress", rate, st.consumed,
                 st.indexed, st.documents, st.malformed, st.rejected, st.retries, st.batches,
                 "?" if lag is None else lag, "down" if self._es_down_since is not None else "up")  # fmt: skip


def run_indexer(settings: IndexerSettings) -> IndexerStats:
    """Runs an indexer until SIGTERM/SIGINT (the ``borgdqn indexer`` command)."""

    # The client logs every request (INFO) and every failure of its one node (WARNING); the indexer says both
    # once, in its own words.
    logging.getLogger("elastic_transport.transport").setLevel(logging.WARNING)
    logging.getLogger("elastic_transport.node_pool").setLevel(logging.ERROR)

    async def main() -> IndexerStats:
        indexer = Indexer(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, indexer.stop)
        try:
            return await indexer.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    return asyncio.run(main())
