"""The indexer against a real Kafka and a real Elasticsearch: every event lands exactly once (replays, an
Elasticsearch outage, a SIGKILLed indexer), malformed messages are counted and skipped, the mappings are explicit.

Each test uses topics of its own (``--topic-prefix``) and a collective of its own, so tests that share the
session's Kafka and Elasticsearch never see each other's events.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from elasticsearch import Elasticsearch

from borgdqn.proto.borg.v1 import telemetry_pb2 as pb
from borgdqn.telemetry.documents import ALL_INDICES, FIELDS, documents, index_templates
from borgdqn.telemetry.events import INDICES, KINDS, SCHEMA_VERSION, Source, encode_event, header
from borgdqn.telemetry.indexer import Indexer, IndexerSettings, IndexerStats
from tests.support.conditions import eventually

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 2


# -- helpers ---------------------------------------------------------------------------------------------------------


def make_events(collective: str, n: int, role: str = "agent", start: int = 0) -> list[pb.TelemetryEvent]:
    """``n`` events of one source, seq start..start+n-1, cycling through the kinds."""
    source = Source(collective, role, 0, uuid.uuid4().hex[:8])
    events = []
    for seq in range(start, start + n):
        h = header(source, seq, now=1_700_000_000.0 + seq)
        kind = KINDS[seq % len(KINDS)]
        if kind == "episode":
            ev = pb.TelemetryEvent(header=h, episode=pb.EpisodeEvent(agent=seq % 3, policy="epsilon_greedy",
                                   episode_return=-21.0 + seq % 5, length=800, env_steps=seq * 10, episode=seq,
                                   epsilon=0.1, wall_seconds=seq / 10))  # fmt: skip
        elif kind == "training":
            ev = pb.TelemetryEvent(header=h, training=pb.TrainingReport(agent=1, env_steps=seq, updates=seq // 4,
                                   learning_rate=1e-4, epsilon=0.5, wall_seconds=1.0))  # fmt: skip
            if seq % 8 == 1:
                ev.training.loss, ev.training.mean_q, ev.training.mean_return = 0.25, 1.5, -20.0
        elif kind == "memory":
            ev = pb.TelemetryEvent(header=h, memory=pb.MemoryReport(size=300, capacity=1000, inserted=seq,
                                   per_agent_steps={0: 100, 1: 200}, wall_seconds=2.0))  # fmt: skip
        elif kind == "drops":
            ev = pb.TelemetryEvent(header=h, drops=pb.DropReport(dropped_events=seq, first_dropped_seq=1,
                                                                 last_dropped_seq=2))
        else:
            ev = pb.TelemetryEvent(header=h, assimilation=pb.AssimilationEvent(
                agent=seq % 3, donor=(seq + 1) % 3, env_steps=seq * 10, mean_return=-20.0, donor_mean_return=-15.0,
                donor_env_steps=seq * 10, learning_rate=1e-4, wall_seconds=seq / 10))
        events.append(ev)
    return events


def expected_docs(events: Sequence[pb.TelemetryEvent]) -> dict[str, dict[str, dict[str, Any]]]:
    """index -> id -> body."""
    out: dict[str, dict[str, dict[str, Any]]] = {index: {} for index in ALL_INDICES}
    for ev in events:
        for index, doc_id, body in documents(ev):
            out[index][doc_id] = body
    return out


def create_topics(bootstrap: str, prefix: str) -> None:
    async def go() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(f"{prefix}{kind}", PARTITIONS, 1) for kind in KINDS])
        finally:
            await admin.close()

    asyncio.run(go())


def produce(bootstrap: str, prefix: str, messages: Sequence[tuple[str, bytes]], partition: int | None = None) -> None:
    """Sends (kind, bytes) pairs in order, keyed by kind's order so that they spread over the partitions."""

    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            futures = [await producer.send(f"{prefix}{kind}", value, partition=partition if partition is not None
                                           else i % PARTITIONS) for i, (kind, value) in enumerate(messages)]
            await producer.flush()
            for fut in futures:
                await fut
        finally:
            await producer.stop()

    asyncio.run(go())


def produce_events(bootstrap: str, prefix: str, events: Sequence[pb.TelemetryEvent]) -> None:
    produce(bootstrap, prefix, [(ev.WhichOneof("event") or "", encode_event(ev)) for ev in events])


def committed(bootstrap: str, group: str) -> dict[tuple[str, int], int]:
    async def go() -> dict[tuple[str, int], int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(group)
            return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items() if meta.offset >= 0}
        finally:
            await admin.close()

    return asyncio.run(go())


def end_offsets(bootstrap: str, prefix: str) -> dict[tuple[str, int], int]:
    from aiokafka import AIOKafkaConsumer

    async def go() -> dict[tuple[str, int], int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await consumer.start()
        try:
            tps = [TopicPartition(f"{prefix}{kind}", p) for kind in KINDS for p in range(PARTITIONS)]
            ends = await consumer.end_offsets(tps)
            return {(tp.topic, tp.partition): off for tp, off in ends.items() if off > 0}
        finally:
            await consumer.stop()

    return asyncio.run(go())


def count(es: Elasticsearch, collective: str, index: str = "borg-*") -> int:
    es.indices.refresh(index=index)
    return int(es.count(index=index, query={"term": {"collective": collective}})["count"])


def stored(es: Elasticsearch, collective: str) -> dict[str, dict[str, dict[str, Any]]]:
    """index -> id -> source of the collective's documents (up to 10,000 per index)."""
    es.indices.refresh(index="borg-*")
    out: dict[str, dict[str, dict[str, Any]]] = {index: {} for index in ALL_INDICES}
    for index in ALL_INDICES:
        found = es.search(index=index, query={"term": {"collective": collective}}, size=10_000)
        for hit in found["hits"]["hits"]:
            out[index][hit["_id"]] = hit["_source"]
    return out


class IndexerThread:
    """An Indexer running in a thread of its own (its own event loop), stopped as SIGTERM would."""

    def __init__(self, settings: IndexerSettings) -> None:
        self.indexer = Indexer(settings)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.result: IndexerStats | BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="indexer", daemon=True)
        self.thread.start()
        eventually(lambda: self.indexer.ready.is_set() or self.result is not None, "indexer started", 60)
        if isinstance(self.result, BaseException):
            raise self.result

    def _run(self) -> None:
        async def main() -> IndexerStats:
            self.loop = asyncio.get_running_loop()
            return await self.indexer.run()

        try:
            self.result = asyncio.run(main())
        except BaseException as err:
            self.result = err

    @property
    def stats(self) -> IndexerStats:
        return self.indexer.stats

    def stop(self) -> IndexerStats:
        if self.loop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.indexer.stop)
        self.thread.join(60)
        assert not self.thread.is_alive(), "indexer did not stop within 60s"
        if isinstance(self.result, BaseException):
            raise self.result
        return self.stats


@pytest.fixture
def es(es_server: Any) -> Iterator[Elasticsearch]:
    client = Elasticsearch(es_server.url, request_timeout=30)
    yield client
    client.close()


@pytest.fixture
def names(kafka_server: Any) -> tuple[str, str, str]:
    """(topic prefix, collective, group) of this test; the topics exist with PARTITIONS partitions."""
    tag = uuid.uuid4().hex[:10]
    prefix = f"test-{tag}."
    create_topics(kafka_server.bootstrap, prefix)
    return prefix, f"c-{tag}", f"g-{tag}"


def settings_for(kafka_server: Any, es_url: str, prefix: str, group: str, **kw: Any) -> IndexerSettings:
    return IndexerSettings(kafka=kafka_server.bootstrap, es_url=es_url, group=group, topic_prefix=prefix,
                           report_every_s=2.0, backoff_initial_s=0.1, backoff_max_s=1.0, **kw)


# -- tests -----------------------------------------------------------------------------------------------------------


def test_every_event_lands_once_as_documents_of_the_schema(kafka_server: Any, es: Elasticsearch,
                                                           es_server: Any, names: tuple[str, str, str]) -> None:
    prefix, collective, group = names
    events = make_events(collective, 400)
    produce_events(kafka_server.bootstrap, prefix, [*events, *events[:50]])  # 50 sent twice (a producer retry)
    want = expected_docs(events)
    total = sum(map(len, want.values()))
    assert total == 560  # 400 events, 80 memory reports with 2 shares each

    first = IndexerThread(settings_for(kafka_server, es_server.url, prefix, group))
    try:
        eventually(lambda: first.stats.indexed == 450, "all 450 messages indexed", 60)
        eventually(lambda: committed(kafka_server.bootstrap, group) == end_offsets(kafka_server.bootstrap, prefix),
                   "offsets committed to the end", 30)
    finally:
        stats = first.stop()
    sent_docs = sum(len(documents(ev)) for ev in [*events, *events[:50]])
    assert (stats.malformed, stats.rejected, stats.documents) == (0, 0, sent_docs)
    assert stored(es, collective) == want  # same ids, same bodies: each event exactly once

    # A replay from the start (a new group reads everything again) overwrites; it adds nothing.
    replay = IndexerThread(settings_for(kafka_server, es_server.url, prefix, group + "-replay"))
    try:
        eventually(lambda: replay.stats.indexed == 450, "the replay indexed", 60)
    finally:
        replay.stop()
    assert count(es, collective) == total
    assert stored(es, collective) == want

    # The templates and the live indices carry the explicit, strict mappings of FIELDS.
    for index, body in index_templates().items():
        got = es.indices.get_index_template(name=index)["index_templates"][0]["index_template"]
        assert got["index_patterns"] == [index]
        mapping = es.indices.get_mapping(index=index)[index]["mappings"]
        assert mapping["dynamic"] == "strict"
        assert {name: prop["type"] for name, prop in mapping["properties"].items()} == FIELDS[index]
        for name, prop in body["template"]["mappings"]["properties"].items():  # Elasticsearch omits defaults
            assert mapping["properties"][name] == {**prop, "format": "strict_date_optional_time||epoch_millis"} \
                if prop["type"] == "date" and "format" in mapping["properties"][name] else prop


def test_malformed_messages_are_counted_logged_once_and_skipped(
        kafka_server: Any, es: Elasticsearch, es_server: Any, names: tuple[str, str, str],
        caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    prefix, collective, group = names
    good = make_events(collective, 8)
    newer = pb.TelemetryEvent()
    newer.CopyFrom(good[0])
    newer.header.schema_version = SCHEMA_VERSION + 1
    newer.header.seq = 1000
    headless = pb.TelemetryEvent(episode=pb.EpisodeEvent(agent=1))
    too_big = pb.TelemetryEvent()  # a seq beyond a long: Elasticsearch refuses the document, for good
    too_big.CopyFrom(good[3])
    too_big.header.seq = 2**64 - 1
    messages = [("episode", encode_event(good[0])), ("episode", b"\xff\x00garbage\x13"),
                ("episode", encode_event(newer)), ("episode", encode_event(headless)), ("episode", b"\x0a\xff"),
                ("episode", encode_event(good[4])), ("drops", encode_event(too_big)),
                *((ev.WhichOneof("event") or "", encode_event(ev)) for ev in good[1:4] + good[5:])]
    produce(kafka_server.bootstrap, prefix, messages, partition=0)  # one partition: one stretch of bad ones

    caplog.set_level(logging.INFO, logger="borgdqn.telemetry.indexer")
    run = IndexerThread(settings_for(kafka_server, es_server.url, prefix, group))
    try:
        eventually(lambda: run.stats.consumed == len(messages) and run.stats.batches >= 1
                   and committed(kafka_server.bootstrap, group) == end_offsets(kafka_server.bootstrap, prefix),
                   "every message consumed and committed", 60)
    finally:
        stats = run.stop()
    assert (stats.malformed, stats.rejected, stats.indexed) == (4, 1, 8)
    assert stored(es, collective) == expected_docs(good)
    topic = f"{prefix}episode"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    bad_lines = [w for w in warnings if "malformed" in w]
    # The stretch of four bad messages (offsets 1..4 on partition 0): its first logged with its offset and reason,
    # the stretch summed up when a good message follows; nothing per message beyond that.
    assert len(bad_lines) == 2, bad_lines
    assert f"topic={topic} partition=0 offset=1 " in bad_lines[0] and "not a TelemetryEvent" in bad_lines[0]
    assert f"topic={topic} partition=0 offsets=1..4 count=4" in bad_lines[1]
    rejected = [w for w in warnings if "document rejected" in w]
    assert len(rejected) == 1 and "index=borg-drops" in rejected[0] and "status=400" in rejected[0]


def test_elasticsearch_outage_loses_nothing_and_commits_nothing_meanwhile(
        kafka_server: Any, es_server_own: Any, names: tuple[str, str, str]) -> None:  # fmt: skip
    prefix, collective, group = names
    es = Elasticsearch(es_server_own.url, request_timeout=30)
    before, during = make_events(collective, 200), make_events(collective, 300, role="memory")
    run = IndexerThread(settings_for(kafka_server, es_server_own.url, prefix, group))
    try:
        produce_events(kafka_server.bootstrap, prefix, before)
        eventually(lambda: committed(kafka_server.bootstrap, group) == end_offsets(kafka_server.bootstrap, prefix),
                   "the first events committed", 60)
        acked = committed(kafka_server.bootstrap, group)

        es_server_own.halt()
        produce_events(kafka_server.bootstrap, prefix, during)
        # It reads what came during the outage (at most `pipeline` batches of it: not ahead unboundedly) and retries.
        eventually(lambda: run.stats.consumed > 200 and run.stats.retries >= 3, "bulk retried while ES is away", 60)
        assert committed(kafka_server.bootstrap, group) == acked  # nothing committed while nothing is acknowledged
        assert run.stats.indexed == 200

        es_server_own.launch()
        eventually(lambda: run.stats.indexed == 500, "the events of the outage indexed", 120)
        eventually(lambda: committed(kafka_server.bootstrap, group) == end_offsets(kafka_server.bootstrap, prefix),
                   "offsets committed to the end", 30)
    finally:
        stats = run.stop()
    assert stats.malformed == stats.rejected == 0
    want = expected_docs([*before, *during])
    assert count(es, collective) == sum(map(len, want.values()))
    assert stored(es, collective) == want
    es.close()


def test_elasticsearch_hung_during_indexing_loses_nothing_and_duplicates_nothing(
        kafka_server: Any, es_server_own: Any, names: tuple[str, str, str]) -> None:  # fmt: skip
    """Elasticsearch hangs (SIGSTOP: connections open, no answer) while the indexer sends it events: each bulk
    request times out and is retried; the ones a hung Elasticsearch received are applied when it resumes, and
    their retries must not index anything twice. Nothing is committed before Elasticsearch acknowledges it."""
    prefix, collective, group = names
    es = Elasticsearch(es_server_own.url, request_timeout=30)
    events = make_events(collective, 300)
    run = IndexerThread(settings_for(kafka_server, es_server_own.url, prefix, group, request_timeout_s=2.0))
    try:
        es_server_own.hang()
        try:
            produce_events(kafka_server.bootstrap, prefix, events)
            eventually(lambda: run.stats.consumed > 0 and run.stats.retries >= 2, "bulk requests timing out", 60)
            assert run.stats.indexed == 0 and committed(kafka_server.bootstrap, group) == {}
        finally:
            es_server_own.hang(False)
        eventually(lambda: run.stats.indexed == 300, "every event indexed once Elasticsearch answers", 120)
        eventually(lambda: committed(kafka_server.bootstrap, group) == end_offsets(kafka_server.bootstrap, prefix),
                   "offsets committed to the end", 30)
    finally:
        stats = run.stop()
    assert stats.malformed == stats.rejected == 0
    want = expected_docs(events)
    assert count(es, collective) == sum(map(len, want.values()))  # no document twice
    assert stored(es, collective) == want  # and none missing
    es.close()


def _indexer_cmd(kafka_server: Any, es_server: Any, prefix: str, group: str) -> list[str]:
    return [sys.executable, "-m", "borgdqn", "indexer", "--kafka", kafka_server.bootstrap, "--es", es_server.url,
            "--group", group, "--topic-prefix", prefix, "--batch", "100", "--report-every", "1"]


def test_indexer_killed_mid_batch_and_restarted_leaves_no_duplicates_and_no_gaps(
        kafka_server: Any, es: Elasticsearch, es_server: Any, names: tuple[str, str, str],
        tmp_path: Path) -> None:  # fmt: skip
    prefix, collective, group = names
    n = 12_000
    events = make_events(collective, n)
    produce_events(kafka_server.bootstrap, prefix, events)
    want_total = sum(map(len, expected_docs(events).values()))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log_path = tmp_path / "indexer.log"

    with log_path.open("wb") as log:
        first = subprocess.Popen(_indexer_cmd(kafka_server, es_server, prefix, group), stdout=log,
                                 stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            # Kill as soon as some batches are in Elasticsearch: later ones are read, in flight, or unread.
            at_kill = eventually(lambda: count(es, collective) or first.poll() is not None, "first documents", 60)
            first.send_signal(signal.SIGKILL)
        finally:
            first.kill()
            first.wait(10)
        assert first.returncode == -signal.SIGKILL, log_path.read_text()[-2000:]
        assert at_kill < want_total, "the indexer finished before it was killed: nothing was tested"
        count_at_kill = count(es, collective)

        second = subprocess.Popen(_indexer_cmd(kafka_server, es_server, prefix, group), stdout=log,
                                  stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            eventually(lambda: count(es, collective) == want_total, "every event indexed after the restart", 90)
            eventually(lambda: committed(kafka_server.bootstrap, group) == end_offsets(kafka_server.bootstrap, prefix),
                       "offsets committed to the end", 30)
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0, log_path.read_text()[-2000:]
        finally:
            second.kill()
            second.wait(10)
    output = log_path.read_text()
    assert "indexer stopped" in output and "Traceback" not in output, output[-3000:]
    assert count_at_kill < want_total

    # Count by id: n distinct ids ``source:seq`` of one source, seq 0..n-1, so each event is there exactly once.
    es.indices.refresh(index="borg-*")
    for index in INDICES.values():
        aggs = es.search(index=index, query={"term": {"collective": collective}}, size=0,
                         aggs={"lo": {"min": {"field": "seq"}}, "hi": {"max": {"field": "seq"}}})
        per_kind = n // len(KINDS)
        assert aggs["hits"]["total"]["value"] == per_kind
        kind_index = list(INDICES.values()).index(index)
        assert (aggs["aggregations"]["lo"]["value"], aggs["aggregations"]["hi"]["value"]) == (
            kind_index, n - len(KINDS) + kind_index)
    assert count(es, collective, "borg-memory-shares") == n // len(KINDS) * 2


def test_settings_refuse_bad_input(tmp_path: Path) -> None:
    base = IndexerSettings(kafka="127.0.0.1:9092", es_url="http://127.0.0.1:9200").validate()
    for bad in (replace(base, kafka="nohost"), replace(base, es_url="ftp://x"),
                replace(base, es_url="http://u:p@x:9200"), replace(base, es_username="u"),
                replace(base, ca_file=tmp_path / "missing.pem"), replace(base, batch_max=0)):
        with pytest.raises(ValueError):
            bad.validate()
    env = {"BORG_ES_USERNAME": "elastic", "BORG_ES_PASSWORD": "secret"}
    assert IndexerSettings.from_env("h:1", "https://es:9200", env=env).es_password == "secret"


@pytest.mark.parametrize(("argv", "env", "needle"), [
    (["--kafka", "nohost", "--es", "http://127.0.0.1:9200"], {}, "--kafka 'nohost'"),
    (["--kafka", "h:1", "--es", "http://elastic:pw@h:9200"], {}, "no credentials in the URL"),
    (["--kafka", "h:1", "--es", "http://h:9200"], {"BORG_ES_USERNAME": "elastic"}, "BORG_ES_PASSWORD"),
    (["--kafka", "h:1", "--es", "http://h:9200", "--ca-file", "/nonexistent/ca.crt"], {}, "no such file"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv: list[str], env: dict[str, str], needle: str,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from borgdqn.cli import main

    for key in ("BORG_ES_USERNAME", "BORG_ES_PASSWORD", "BORG_ES_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["indexer", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
