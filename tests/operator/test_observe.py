"""What the status reads of a render (`observe.Rendered`): the workloads of the spec's modes, by the component
that names their `Observed` field, and the monitor's login for the memory's fill."""

from __future__ import annotations

from typing import Any

from borg_operator.builders import Material, build_children
from borg_operator.observe import Rendered
from borg_operator.spec import parse_spec
from borg_operator.status import Observed
from borg_operator.tls import CA_FILE, CERT_FILE, KAFKA_TLS_KEYS, KEY_FILE
from borgdqn.memory.redis.acl import MONITOR, USERS

NAMESPACE = "borg"
MATERIAL = Material(passwords={user.secret_key: f"pw-{user.name}" for user in USERS},
                    memory_tls={key: f"memory-{key}" for key in (CA_FILE, CERT_FILE, KEY_FILE)},
                    kafka_tls={key: f"kafka-{key}" for key in KAFKA_TLS_KEYS})


def parts(spec: dict[str, Any]) -> set[tuple[str, str, str]]:
    rendered = Rendered.of(build_children("hive", NAMESPACE, parse_spec(spec), MATERIAL), MATERIAL)
    return {(part.role, part.kind, part.name) for part in rendered.parts}


def test_the_default_spec_reads_the_memory_the_managed_kafka_and_the_eck_stack() -> None:
    assert parts({}) == {("memory", "StatefulSet", "hive-memory"), ("kafka", "StatefulSet", "hive-kafka"),
                         ("elasticsearch", "Elasticsearch", "hive-es"), ("kibana", "Kibana", "hive-kibana"),
                         ("indexer", "Deployment", "hive-indexer")}


def test_strimzi_mode_reads_strimzis_kafka_and_not_its_node_pool_or_user() -> None:
    strimzi = parts({"kafka": {"mode": "strimzi"}})
    assert {part for part in strimzi if part[0] == "kafka"} == {("kafka", "Kafka", "hive-kafka")}


def test_external_kafka_and_no_elastic_read_the_memory_only() -> None:
    spec = {"kafka": {"mode": "external", "bootstrapServers": "kafka.example:9092"}, "elastic": {"mode": "disabled"}}
    assert parts(spec) == {("memory", "StatefulSet", "hive-memory")}


def test_every_role_is_a_field_of_observed_and_the_fill_is_read_as_the_monitor() -> None:
    rendered = Rendered.of(build_children("hive", NAMESPACE, parse_spec({}), MATERIAL), MATERIAL)
    assert {part.role for part in rendered.parts} <= set(Observed.__dataclass_fields__)
    assert rendered.monitor_password == f"pw-{MONITOR.name}" and rendered.memory_ca == f"memory-{CA_FILE}"
    assert "pw-" not in repr(rendered)
