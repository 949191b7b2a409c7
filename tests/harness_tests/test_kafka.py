"""The Kafka harness part: a real broker that round-trips a record and is reachable only on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.harness.kafka import KafkaServer

pytestmark = pytest.mark.integration

async def _round_trip(bootstrap: str, topic: str, key: bytes, value: bytes) -> tuple[bytes | None, bytes | None]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        # The topic does not exist yet: the broker auto-creates it and the producer retries until it has a leader.
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"g-{topic}",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=20)
        await consumer.commit()
        return record.key, record.value
    finally:
        await consumer.stop()


def test_produce_then_consume_round_trips_a_record(kafka_server: KafkaServer) -> None:
    topic = f"harness-{uuid.uuid4().hex[:12]}"
    value = b"\x00borg\xffdqn" + os.urandom(16)
    assert kafka_server.exports == {"KAFKA_BOOTSTRAP": kafka_server.bootstrap}
    got = asyncio.run(_round_trip(kafka_server.bootstrap, topic, b"agent-7", value))
    assert got == (b"agent-7", value)


def test_listens_only_on_loopback(kafka_server: KafkaServer) -> None:
    listening = kafka_server.listening()
    assert {port for _, port in listening} >= {kafka_server.port, kafka_server.controller_port}
    assert {address for address, _ in listening} == {ipaddress.ip_address("127.0.0.1")}, listening
