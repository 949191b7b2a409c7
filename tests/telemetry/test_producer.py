"""The telemetry producer against a real broker (the harness's Kafka): delivery, topics, and an outage.

The outage test stops the broker, emits more than the buffer holds, starts the broker again and then reads
everything back: delivered + dropped == emitted, the DropReport's count equals the gaps in seq, nothing twice.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from borgdqn.proto.borg.v1 import telemetry_pb2 as pb
from borgdqn.telemetry.events import KINDS, SCHEMA_VERSION, TOPICS, Source, kind_of
from borgdqn.telemetry.producer import TOPIC_SETTINGS, TelemetryProducer, collective_from_path, parse_bootstrap
from tests.harness.kafka import KafkaServer
from tests.harness.process import free_port
from tests.support.conditions import eventually
from tests.support.kafka_events import read_events

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------------------------------------- reading back


def of_source(source: Source) -> Callable[[pb.TelemetryEvent], bool]:
    return lambda event: event.header.source_id == source.source_id


def episode(i: int) -> pb.EpisodeEvent:
    return pb.EpisodeEvent(agent=1, policy="epsilon_greedy", episode_return=float(i), length=10 + i,
                           env_steps=100 * i, episode=i + 1, epsilon=0.5, wall_seconds=0.1 * i)


def unique_collective() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------------------------------------- delivery
def test_events_arrive_on_their_topics_in_seq_order_with_headers(kafka_server: KafkaServer) -> None:
    source = Source.new(unique_collective(), "agent", 1)
    producer = TelemetryProducer(kafka_server.bootstrap, source)
    try:
        before = time.time()
        seqs = []
        for i in range(20):
            seqs.append(producer.emit(episode(i)))
            if i % 5 == 0:
                seqs.append(producer.emit(pb.TrainingReport(agent=1, env_steps=100 * i, updates=i, loss=0.5,
                                                            learning_rate=1e-4, epsilon=0.5)))
        seqs.append(producer.emit(pb.MemoryReport(size=10, capacity=100, per_agent_steps={0: 4, 1: 6})))
        assert seqs == list(range(len(seqs)))
        eventually(lambda: producer.stats().sent == len(seqs), "every event acknowledged")
    finally:
        stats = producer.close()
    assert (stats.emitted, stats.sent, stats.dropped, stats.unsent) == (len(seqs), len(seqs), 0, 0)

    got = read_events(kafka_server.bootstrap, KINDS, of_source(source), lambda g: len(g) >= len(seqs))
    assert sorted(e.header.seq for _, e in got) == list(range(len(seqs))), "every seq once, no gaps"
    for topic, event in got:
        assert topic == TOPICS[kind_of(event)]
        h = event.header
        assert (h.schema_version, h.collective, h.source_id) == (SCHEMA_VERSION, source.collective, source.source_id)
        assert before - 1 <= h.time_unix <= time.time() + 1
    kinds = [kind_of(e) for _, e in sorted(got, key=lambda te: te[1].header.seq)]
    assert kinds.count("episode") == 20 and kinds.count("training") == 4 and kinds.count("memory") == 1
    # One source's events keep their order (they share a partition: the key is the source id).
    episodes = [e.episode for _, e in got if kind_of(e) == "episode"]
    assert [ep.episode for ep in episodes] == list(range(1, 21))
    assert episodes[3] == episode(3)
    memory = next(e.memory for _, e in got if kind_of(e) == "memory")
    assert dict(memory.per_agent_steps) == {0: 4, 1: 6}


def test_emit_never_blocks_and_close_keeps_its_deadline_when_kafka_is_unreachable() -> None:
    source = Source.new(unique_collective(), "agent", 0)
    producer = TelemetryProducer(f"127.0.0.1:{free_port()}", source, max_buffered=100)
    slowest = 0.0
    for i in range(1000):
        started = time.perf_counter()
        assert producer.emit(episode(i)) == i
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 0.1, f"an emit took {slowest:.3f}s"
    stats = producer.stats()
    assert stats.sent == 0 and stats.unsent == 100 and stats.dropped == 900
    started = time.monotonic()
    stats = producer.close(timeout_s=1.0)
    assert time.monotonic() - started < 4.0
    assert stats.emitted == stats.dropped + stats.unsent == 1000
    assert producer.emit(episode(0)) is None, "no events after close"
    with pytest.raises(TypeError):
        producer.emit(pb.EventHeader())  # type: ignore[arg-type]


def test_bootstrap_and_collective_names() -> None:
    assert parse_bootstrap("kafka:9092, 10.0.0.1:9093") == ["kafka:9092", "10.0.0.1:9093"]
    for bad in ("", "kafka", "kafka:0", "kafka:99999", "http://kafka:9092"):
        with pytest.raises(ValueError):
            parse_bootstrap(bad)
    assert collective_from_path(__import__("pathlib").Path("/tmp/runs/my run!")) == "my-run"


# ---------------------------------------------------------------------------------------------- the outage
async def _topic_layout(bootstrap: str) -> dict[str, tuple[int, str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([TOPICS[k] for k in KINDS])
        partitions = {t["topic"]: len(t["partitions"]) for t in described}
        configs = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, TOPICS[k]) for k in KINDS])
        retention = {}
        for response in configs:
            for resource in response.resources:
                name, entries = resource[3], resource[4]
                retention[name] = next(entry[1] for entry in entries if entry[0] == "retention.ms")
        return {name: (partitions[name], retention[name]) for name in partitions}
    finally:
        await admin.close()


def test_an_outage_drops_the_oldest_counts_them_and_reports_the_count(kafka_server_own: KafkaServer) -> None:
    server = kafka_server_own
    source = Source.new(unique_collective(), "agent", 2)
    limit = 60
    producer = TelemetryProducer(server.bootstrap, source, max_buffered=limit)
    try:
        for i in range(10):
            producer.emit(episode(i))
        eventually(lambda: producer.stats().sent == 10, "the first events acknowledged")
        # On a fresh broker the producer created the topics, with our partitions and retention.
        layout = asyncio.run(_topic_layout(server.bootstrap))
        assert layout == {TOPICS[k]: (s.partitions, str(s.retention_ms)) for k, s in TOPIC_SETTINGS.items()}

        server.kill()
        slowest = 0.0
        for i in range(10, 10 + 5 * limit):
            started = time.perf_counter()
            producer.emit(episode(i))
            slowest = max(slowest, time.perf_counter() - started)
        assert slowest < 0.1, f"an emit took {slowest:.3f}s while Kafka was away"
        during = producer.stats()
        assert during.sent == 10 and during.unsent <= limit
        assert during.dropped == during.emitted - during.sent - during.unsent >= 4 * limit

        server.launch()
        # Back: the buffer drains and a DropReport goes out (with a seq of its own).
        eventually(lambda: producer.stats().unsent == 0 and producer.stats().emitted == 10 + 5 * limit + 1,
                   "the backlog and the drop report delivered", timeout_s=60)
        for i in range(3):  # and new events flow as before
            producer.emit(episode(1000 + i))
        eventually(lambda: producer.stats().unsent == 0, "new events delivered")
    finally:
        stats = producer.close()
    emitted = 10 + 5 * limit + 1 + 3
    assert stats.emitted == emitted and stats.sent + stats.dropped == emitted and stats.unsent == 0

    got = read_events(server.bootstrap, KINDS, of_source(source), lambda g: len(g) >= stats.sent)
    seqs = [e.header.seq for _, e in got]
    assert len(seqs) == len(set(seqs)) == stats.sent, "every delivered event once: nothing duplicated, none lost"
    gaps = set(range(emitted)) - set(seqs)
    assert len(gaps) == stats.dropped
    reports = [e for _, e in got if kind_of(e) == "drops"]
    assert len(reports) == 1
    report = reports[0].drops
    assert report.dropped_events == len(gaps) == stats.dropped
    assert (report.first_dropped_seq, report.last_dropped_seq) == (min(gaps), max(gaps))
    # The oldest went (those already handed to the client excepted): the newest all survived.
    assert set(range(max(gaps) + 1, emitted)) <= set(seqs)
