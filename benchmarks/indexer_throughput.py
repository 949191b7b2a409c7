"""Indexer throughput: telemetry events per second from Kafka into Elasticsearch (acknowledged), on this machine.

Produces ``--events`` (200k) events of one collective to fresh topics (a mix like a hive's: episodes, training
reports, memory reports with ``--agents`` per-agent shares each, drop reports), then runs the indexer (in this
process, its defaults: batches of 5,000 records, 2 in flight) from an empty consumer group and times it until
Elasticsearch acknowledged every event and the offsets are committed. Its CPU time is printed per 1,000 events.

The baseline, in the same run, is Elasticsearch's own ceiling for these documents: the same documents,
serialized up front, sent with the bulk API in requests of the same size from one client, with no Kafka and no
decoding. The ratio says how much of that ceiling the indexer reaches.

    python benchmarks/indexer_throughput.py [--events 200000] [--kafka HOST:PORT --es URL]

Without ``--kafka``/``--es`` it starts both from ``tests/harness`` (Java; Maven Central on first use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from aiokafka import AIOKafkaProducer  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402
from elasticsearch import Elasticsearch  # noqa: E402

from borgdqn.proto.borg.v1 import telemetry_pb2 as pb  # noqa: E402
from borgdqn.telemetry.documents import documents, index_templates  # noqa: E402
from borgdqn.telemetry.events import KINDS, Source, encode_event, header  # noqa: E402
from borgdqn.telemetry.indexer import Indexer, IndexerSettings  # noqa: E402

TARGET = 20_000.0  # events/s
# What a hive sends, roughly: per 100 events 45 training reports, 50 episodes, 4 memory reports, 1 drop report.
MIX = ("training",) * 45 + ("episode",) * 50 + ("memory",) * 4 + ("drops",)
# Elasticsearch as one would run it for throughput: the full JIT (the tests' harness uses C1 only, which starts
# faster and indexes slower) and a 1 GiB heap.
BENCH_JVM_OPTIONS = ("-Xms1g", "-Xmx1g", "-XX:-AlwaysPreTouch")


def make_events(collective: str, n: int, agents: int) -> list[pb.TelemetryEvent]:
    sources = [Source(collective, "agent", i, uuid.uuid4().hex[:8]) for i in range(agents)]
    memory = Source(collective, "memory", 0, uuid.uuid4().hex[:8])
    seqs = dict.fromkeys([*sources, memory], 0)
    out = []
    now = time.time()
    for i in range(n):
        kind = MIX[i % len(MIX)]
        src = memory if kind == "memory" else sources[i % agents]
        h = header(src, seqs[src], now=now + i * 1e-3)
        seqs[src] += 1
        if kind == "training":
            ev = pb.TelemetryEvent(header=h, training=pb.TrainingReport(
                agent=src.index, env_steps=i * 4, updates=i, loss=0.01, mean_q=1.5, learning_rate=1e-4,
                updates_per_s=30.0, env_steps_per_s=900.0, replay_sample_age=5000.0, epsilon=0.1,
                mean_return=-20.5, best_mean_return=-19.0, wall_seconds=i / 100))
        elif kind == "episode":
            ev = pb.TelemetryEvent(header=h, episode=pb.EpisodeEvent(
                agent=src.index, policy="epsilon_greedy", episode_return=-21.0 + i % 7, length=820,
                env_steps=i * 4, episode=i, epsilon=0.1, wall_seconds=i / 100))
        elif kind == "memory":
            ev = pb.TelemetryEvent(header=h, memory=pb.MemoryReport(
                size=400_000, capacity=1_000_000, inserted=i * 10, sampled=i * 32, rejected=0, insert_rate=900.0,
                sample_rate=2900.0, bytes_used=3 << 30, per_agent_steps={a: 400_000 // agents for a in range(agents)},
                wall_seconds=i / 100))
        else:
            ev = pb.TelemetryEvent(header=h, drops=pb.DropReport(dropped_events=3, first_dropped_seq=1,
                                                                 last_dropped_seq=3))
        out.append(ev)
    return out


async def produce(bootstrap: str, prefix: str, events: list[pb.TelemetryEvent]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(f"{prefix}{kind}", 1, 1) for kind in KINDS])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        pending = []
        for ev in events:
            pending.append(await producer.send(f"{prefix}{ev.WhichOneof('event')}", encode_event(ev)))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def run_indexer(settings: IndexerSettings, n: int) -> dict[str, float]:
    indexer = Indexer(settings)
    in_bulk = [0.0]
    bulk = indexer._bulk

    def timed_bulk(body: bytes) -> Any:
        t = time.perf_counter()
        try:
            return bulk(body)
        finally:
            in_bulk[0] += time.perf_counter() - t

    indexer._bulk = timed_bulk  # type: ignore[method-assign]
    task = asyncio.ensure_future(indexer.run())
    await indexer.ready.wait()
    t_ready, cpu0 = time.perf_counter(), time.process_time()
    t_first = None
    while indexer.stats.indexed < n or indexer.stats.batches == 0 or indexer.lag():
        if t_first is None and indexer.stats.indexed:
            t_first = time.perf_counter()
        if task.done():
            task.result()
            raise RuntimeError("the indexer stopped early")
        await asyncio.sleep(0.01)
    t_end, cpu1 = time.perf_counter(), time.process_time()
    indexer.stop()
    stats = await task
    assert stats.indexed == n and stats.malformed == stats.rejected == 0, stats
    return {"wall": t_end - t_ready, "steady": t_end - (t_first or t_ready), "cpu": cpu1 - cpu0,
            "documents": stats.documents, "batches": stats.batches, "in_bulk": in_bulk[0]}


def bulk_ceiling(es: Elasticsearch, events: list[pb.TelemetryEvent], batch: int) -> tuple[float, int]:
    """Events/s of pre-serialized bulk requests of ``batch`` events' documents, sent one after another."""
    bodies, docs = [], 0
    for start in range(0, len(events), batch):
        lines = []
        for ev in events[start:start + batch]:
            for index, doc_id, body in documents(ev):
                lines.append(json.dumps({"index": {"_index": index, "_id": "raw:" + doc_id}}))
                lines.append(json.dumps(body))
                docs += 1
        bodies.append(("\n".join(lines) + "\n").encode())
    t0 = time.perf_counter()
    for body in bodies:
        resp = es.bulk(operations=body, filter_path="errors")
        assert not resp["errors"], "the baseline's bulk request had errors"
    return len(events) / (time.perf_counter() - t0), docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--agents", type=int, default=8, help="agent sources; memory reports carry a share each")
    parser.add_argument("--pipeline", type=int, default=2, help="batches in flight (the indexer's default: 2)")
    parser.add_argument("--kafka", help="HOST:PORT of a running Kafka (default: start one)")
    parser.add_argument("--es", help="URL of a running Elasticsearch (default: start one)")
    args = parser.parse_args()

    parts: list[Any] = []
    try:
        kafka, es_url = args.kafka, args.es
        if kafka is None or es_url is None:
            from tests.harness.cache import Progress

            if kafka is None:
                from tests.harness.kafka import ensure_kafka, start_kafka

                parts.append(start_kafka(ensure_kafka(Progress())))
                kafka = parts[-1].bootstrap
            if es_url is None:
                from tests.harness.elasticsearch import ensure_elasticsearch, start_elasticsearch

                parts.append(start_elasticsearch(ensure_elasticsearch(Progress()), jvm_options=BENCH_JVM_OPTIONS))
                es_url = parts[-1].url
        tag = uuid.uuid4().hex[:8]
        prefix, collective = f"bench-{tag}.", f"bench-{tag}"
        _say(f"making {args.events:,} events")
        events = make_events(collective, args.events, args.agents)
        _say("warming Elasticsearch up (20,000 other events, bulk)")
        setup = Elasticsearch(es_url, request_timeout=120)
        for name, body in index_templates().items():  # as the indexer installs them, before any document
            setup.indices.put_index_template(name=name, index_patterns=body["index_patterns"],
                                             priority=body["priority"], template=body["template"])
        setup.close()
        bulk_ceiling(Elasticsearch(es_url, request_timeout=120), make_events(f"warm-{tag}", 20_000, args.agents),
                     5000)
        _say("producing them to Kafka")
        t0 = time.perf_counter()
        asyncio.run(produce(kafka, prefix, events))
        produce_s = time.perf_counter() - t0
        _say(f"produced in {produce_s:.1f}s; indexing")
        settings = IndexerSettings(kafka=kafka, es_url=es_url, group=f"bench-{tag}", topic_prefix=prefix,
                                   report_every_s=5.0, pipeline=args.pipeline)
        ours = asyncio.run(run_indexer(settings, args.events))
        es = Elasticsearch(es_url, request_timeout=120)
        es.indices.refresh(index="borg-*")
        stored = es.count(index="borg-*", query={"term": {"collective": collective}})["count"]
        _say("baseline: the same documents, bulk requests straight to Elasticsearch")
        ceiling, ceiling_docs = bulk_ceiling(es, events, settings.batch_max)
        es.close()
    finally:
        for part in reversed(parts):
            part.stop()

    n = args.events
    rate, steady = n / ours["wall"], n / ours["steady"]
    load = os.getloadavg()[0]
    print()
    print(f"indexer  events={n:,}  documents={int(ours['documents']):,} (stored {stored:,})  "
          f"batches={int(ours['batches'])}  cores={os.cpu_count()}  load(1m)={load:.1f}")
    header_ = f"{'':<44}{'ours':>12}{'ES ceiling':>12}{'ratio':>8}  {'target':<14}{'met':>4}"
    print(header_)
    print("-" * len(header_))
    print(f"{'events/s, Kafka -> ES acknowledged (all)':<44}{rate:>12,.0f}{ceiling:>12,.0f}{rate / ceiling:>8.2f}  "
          f"{'>= 20,000/s':<14}{'yes' if rate >= TARGET else 'no':>4}")
    print(f"{'events/s, from the first acknowledged batch':<44}{steady:>12,.0f}{ceiling:>12,.0f}"
          f"{steady / ceiling:>8.2f}")
    print(f"{'documents/s (all)':<44}{ours['documents'] / ours['wall']:>12,.0f}"
          f"{ceiling * ceiling_docs / n:>12,.0f}")
    print(f"indexer CPU: {ours['cpu']:.1f}s ({ours['cpu'] / n * 1000 * 1000:.0f} ms per 1,000 events, "
          f"{ours['cpu'] / ours['wall']:.2f} cores); waiting on bulk requests {ours['in_bulk']:.1f}s of "
          f"{ours['wall']:.1f}s; producing took {produce_s:.1f}s")


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
