"""Reading telemetry events back from Kafka, from the beginning of their topics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from borgdqn.proto.borg.v1 import telemetry_pb2 as pb
from borgdqn.telemetry.events import TOPICS, Kind, decode_event


async def _read(bootstrap: str, kinds: Iterable[Kind], keep: Callable[[pb.TelemetryEvent], bool],
                done: Callable[[list[tuple[str, pb.TelemetryEvent]]], bool],
                timeout_s: float) -> list[tuple[str, pb.TelemetryEvent]]:
    """Every event of ``kinds`` that ``keep`` accepts, from the beginning of the topics, until ``done`` says
    so (then one more short poll, so that an extra event would show) or ``timeout_s`` passes."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    got: list[tuple[str, pb.TelemetryEvent]] = []
    try:
        topics = [TOPICS[k] for k in kinds]
        parts = []
        for topic in topics:
            partitions = await eventually_async(lambda t=topic: _partitions(bootstrap, t), f"{topic} known")
            parts += [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        deadline = time.monotonic() + timeout_s
        finished_at: float | None = None
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=300)
            for tp, records in batches.items():
                for record in records:
                    event = decode_event(record.value)
                    if keep(event):
                        got.append((tp.topic, event))
            if finished_at is None and done(got):
                finished_at = time.monotonic()
            if finished_at is not None and not batches and time.monotonic() - finished_at > 0.5:
                break
        return got
    finally:
        await consumer.stop()


async def _partitions(bootstrap: str, topic: str) -> set[int] | None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if not described or described[0]["error_code"] != 0:
        return None
    return {p["partition"] for p in described[0]["partitions"]}


async def eventually_async(check: Callable[[], Awaitable[set[int] | None]], what: str,
                           timeout_s: float = 20.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout_s:.0f}s")
        await asyncio.sleep(0.1)


def read_events(bootstrap: str, kinds: Iterable[Kind], keep: Callable[[pb.TelemetryEvent], bool],
                done: Callable[[list[tuple[str, pb.TelemetryEvent]]], bool],
                timeout_s: float = 30.0) -> list[tuple[str, pb.TelemetryEvent]]:
    return asyncio.run(_read(bootstrap, list(kinds), keep, done, timeout_s))
