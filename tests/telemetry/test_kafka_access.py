"""Telemetry over TLS with a SASL/SCRAM-SHA-512 login: a hive's agents, the indexer and a Kafka that wants both
(the harness's Kafka with a SASL_SSL listener, configured as a managed one would be), all real.

Proven: the agents' producers and the indexer's consumer log in as their own users over TLS, verify the brokers
against the listener's CA, and every episode reaches Elasticsearch; a wrong password, an unknown CA or no TLS at
all get nothing through; settings that cannot work together are refused in one line before anything starts.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError
from elasticsearch import Elasticsearch

from borgdqn.config import ConfigError, build_config
from borgdqn.telemetry.events import INDICES
from borgdqn.telemetry.kafka_access import KAFKA_PASSWORD_ENV, KAFKA_USERNAME_ENV, KafkaAccess, KafkaAccessError
from tests.support.conditions import eventually

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def login(kafka: Any, user: str) -> dict[str, str]:
    return {**os.environ, KAFKA_USERNAME_ENV: user, KAFKA_PASSWORD_ENV: kafka.users[user]}


def test_a_hive_and_the_indexer_reach_a_tls_kafka_as_their_own_users(
        tmp_path: Path, kafka_server_secure: Any, es_server: Any) -> None:  # fmt: skip
    kafka, collective = kafka_server_secure, f"tls-{uuid.uuid4().hex[:8]}"
    train = subprocess.run(
        [sys.executable, "-m", "borgdqn", "train", "--config", str(ROOT / "examples" / "cartpole.yaml"),
         "--agents", "1", "--steps", "1500", "--out", str(tmp_path / "run"), "--no-live",
         "--kafka", kafka.secure_bootstrap, "--set", "telemetry.kafka_tls=true",
         "--set", f"telemetry.kafka_ca_file={kafka.ca_file}", "--set", f"telemetry.collective={collective}"],
        env=login(kafka, "borg-agent"), capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert kafka.users["borg-agent"] not in train.stdout + train.stderr

    indexer_log = tmp_path / "indexer.log"
    with indexer_log.open("w") as out:
        indexer = subprocess.Popen(
            [sys.executable, "-m", "borgdqn", "indexer", "--kafka", kafka.secure_bootstrap, "--es", es_server.url,
             "--group", f"{collective}-indexer", "--kafka-tls", "--kafka-ca-file", str(kafka.ca_file),
             "--report-every", "1"],
            env=login(kafka, "borg-indexer"), stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    es = Elasticsearch(es_server.url)
    try:
        def episodes() -> int:
            assert indexer.poll() is None, indexer_log.read_text()[-3000:]
            if not es.indices.exists(index=INDICES["episode"]):
                return 0
            es.indices.refresh(index=INDICES["episode"])
            return int(es.count(index=INDICES["episode"], query={"term": {"collective": collective}})["count"])

        done = int(re.search(r"done: .* ([\d,]+) episodes", train.stdout).group(1).replace(",", ""))  # type: ignore[union-attr]
        eventually(lambda: episodes() == done, f"the hive's {done} episodes indexed", 90)
    finally:
        indexer.send_signal(signal.SIGTERM)
        assert indexer.wait(60) == 0, indexer_log.read_text()[-3000:]
        es.close()
    assert kafka.users["borg-indexer"] not in indexer_log.read_text()


def _start_producer(kafka: Any, access: KafkaAccess) -> None:
    from aiokafka import AIOKafkaProducer

    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.secure_bootstrap, request_timeout_ms=5000,
                                    **access.client_options())  # fmt: skip
        try:
            await asyncio.wait_for(producer.start(), timeout=20)
        finally:
            await producer.stop()

    asyncio.run(go())


def test_a_wrong_password_an_unknown_ca_or_no_tls_gets_nothing_through(tmp_path: Path,
                                                                        kafka_server_secure: Any) -> None:
    kafka = kafka_server_secure
    good = KafkaAccess(tls=True, ca_file=kafka.ca_file, username="borg-agent", password=kafka.users["borg-agent"])
    _start_producer(kafka, good)  # the right login works, so the refusals below are the point
    from borg_operator.tls import CA_FILE, make_server_tls

    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_text(make_server_tls("another CA", "kafka", ["127.0.0.1"])[CA_FILE])
    for refused in (KafkaAccess(tls=True, ca_file=kafka.ca_file, username="borg-agent", password="guess"),
                    KafkaAccess(tls=True, ca_file=other_ca, username="borg-agent", password=kafka.users["borg-agent"]),
                    KafkaAccess()):  # fmt: skip
        with pytest.raises(KafkaConnectionError, match="Unable to bootstrap"):  # aiokafka hides why: the broker says
            _start_producer(kafka, refused)
    broker = (kafka.workdir / "kafka.log").read_text()
    assert "invalid credentials with SASL mechanism SCRAM-SHA-512" in broker  # the wrong password
    assert "SSL handshake failed" in broker  # the client that did not trust the broker's certificate


@pytest.mark.parametrize(("tls", "ca", "env", "message"), [
    (False, True, {}, "a Kafka CA file needs TLS"),
    (True, False, {KAFKA_USERNAME_ENV: "borg-agent"}, "set both BORG_KAFKA_USERNAME and BORG_KAFKA_PASSWORD"),
    (False, False, {KAFKA_USERNAME_ENV: "a", KAFKA_PASSWORD_ENV: "b"}, "needs TLS"),
])  # fmt: skip
def test_settings_that_cannot_work_are_refused_in_one_line(tmp_path: Path, tls: bool, ca: bool,
                                                             env: dict[str, str], message: str) -> None:
    ca_file = tmp_path / "ca.crt"
    ca_file.write_text("not read here")
    with pytest.raises(KafkaAccessError, match=message):
        KafkaAccess.of(tls=tls, ca_file=ca_file if ca else None, environ=env)


def test_the_config_and_the_indexer_refuse_a_ca_without_tls(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.crt"
    ca_file.write_text("not read here")
    with pytest.raises(ConfigError, match=r"telemetry\.kafka_ca_file needs telemetry\.kafka_tls"):
        build_config(environ={}, overrides={"telemetry.kafka": "k:9092", "telemetry.kafka_ca_file": str(ca_file)})
    refused = subprocess.run([sys.executable, "-m", "borgdqn", "indexer", "--kafka", "127.0.0.1:1", "--es",
                              "http://127.0.0.1:1", "--kafka-ca-file", str(ca_file)],
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "a Kafka CA file needs TLS" in refused.stderr
