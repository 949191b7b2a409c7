"""Elasticsearch documents from telemetry events, and the templates' explicit mappings (no server needed)."""

from __future__ import annotations

import math

import pytest

from borgdqn.proto.borg.v1 import telemetry_pb2 as pb
from borgdqn.telemetry.documents import ALL_INDICES, FIELDS, SHARES_INDEX, documents, index_templates
from borgdqn.telemetry.events import INDICES, BadEvent, Source, header

SOURCE = Source("pong", "agent", 3, "abcd1234")
COMMON = {"@timestamp": 1_700_000_000_250, "collective": "pong", "source_id": "pong/agent-3/abcd1234", "seq": 7,
          "schema_version": 1}


def _event(**payload: object) -> pb.TelemetryEvent:
    return pb.TelemetryEvent(header=header(SOURCE, 7, now=1_700_000_000.25), **payload)  # type: ignore[arg-type]


def test_episode_document() -> None:
    ev = _event(episode=pb.EpisodeEvent(agent=3, policy="epsilon_greedy", episode_return=-20.0, length=812,
                                        env_steps=40_000, episode=12, epsilon=0.5, wall_seconds=61.5))
    assert documents(ev) == [("borg-episode", "pong/agent-3/abcd1234:7", {
        **COMMON, "kind": "episode", "agent": 3, "policy": "epsilon_greedy", "episode_return": -20.0, "length": 812,
        "env_steps": 40_000, "episode": 12, "epsilon": 0.5, "wall_seconds": 61.5})]


def test_training_document_omits_absent_and_non_finite_values() -> None:
    ev = _event(training=pb.TrainingReport(agent=1, env_steps=10, updates=2, loss=math.nan, mean_q=1.5,
                                           learning_rate=1e-4, updates_per_s=3.0, env_steps_per_s=math.inf,
                                           epsilon=0.9, wall_seconds=2.0))
    [(index, _, body)] = documents(ev)
    assert index == "borg-training"
    assert body == {**COMMON, "kind": "training", "agent": 1, "env_steps": 10, "updates": 2, "mean_q": 1.5,
                    "learning_rate": 1e-4, "updates_per_s": 3.0, "epsilon": 0.9, "wall_seconds": 2.0}
    full = _event(training=pb.TrainingReport(loss=0.5, mean_q=1.0, replay_sample_age=9.0, mean_return=-3.0,
                                             best_mean_return=0.0))
    assert set(documents(full)[0][2]) == set(FIELDS["borg-training"])


def test_memory_document_and_one_share_document_per_agent() -> None:
    ev = _event(memory=pb.MemoryReport(size=300, capacity=1000, inserted=500, sampled=64, rejected=1,
                                       bytes_used=4096, per_agent_steps={2: 100, 0: 200}, wall_seconds=5.0,
                                       insert_rate=12.5, dropped_chunks=3, skipped_chunks=2, outage_seconds=1.5,
                                       replication_lag_p99_ms=42.0, write_errors=4))
    docs = documents(ev)
    assert [(index, doc_id) for index, doc_id, _ in docs] == [
        ("borg-memory", "pong/agent-3/abcd1234:7"), (SHARES_INDEX, "pong/agent-3/abcd1234:7:0"),
        (SHARES_INDEX, "pong/agent-3/abcd1234:7:2")]
    assert docs[0][2] == {**COMMON, "kind": "memory", "size": 300, "capacity": 1000, "inserted": 500, "sampled": 64,
                          "rejected": 1, "bytes_used": 4096, "fill": 0.3, "insert_rate": 12.5, "wall_seconds": 5.0,
                          "dropped_chunks": 3, "skipped_chunks": 2, "outage_seconds": 1.5,
                          "replication_lag_p99_ms": 42.0, "write_errors": 4}
    assert docs[1][2] == {**COMMON, "kind": "memory", "agent": 0, "steps": 200, "share": 200 / 300}
    empty = documents(_event(memory=pb.MemoryReport(per_agent_steps={1: 0})))
    assert "fill" not in empty[0][2] and "share" not in empty[1][2]
    assert "replication_lag_p99_ms" not in empty[0][2]  # absent before any lag was measured
    assert set(docs[0][2]) == set(FIELDS["borg-memory"]) - {"sample_rate"}  # the one field left unset here


def test_drops_document() -> None:
    ev = _event(drops=pb.DropReport(dropped_events=5, first_dropped_seq=10, last_dropped_seq=14))
    assert documents(ev) == [("borg-drops", "pong/agent-3/abcd1234:7", {
        **COMMON, "kind": "drops", "dropped_events": 5, "first_dropped_seq": 10, "last_dropped_seq": 14})]


def test_assimilation_document() -> None:
    event = pb.AssimilationEvent(agent=2, donor=0, env_steps=8000, mean_return=21.5, donor_mean_return=180.0,
                                 donor_env_steps=7996, learning_rate=8e-4, epsilon_floor=0.0125, wall_seconds=30.0)
    assert documents(_event(assimilation=event)) == [("borg-assimilation", "pong/agent-3/abcd1234:7", {
        **COMMON, "kind": "assimilation", "agent": 2, "donor": 0, "env_steps": 8000, "mean_return": 21.5,
        "donor_mean_return": 180.0, "donor_env_steps": 7996, "learning_rate": 8e-4, "epsilon_floor": 0.0125,
        "wall_seconds": 30.0})]
    event.ClearField("epsilon_floor")  # a policy without an epsilon-greedy leaf has no floor
    assert "epsilon_floor" not in documents(_event(assimilation=event))[0][2]


@pytest.mark.parametrize("when", [math.nan, math.inf, -1.0, 1e12])
def test_a_time_that_is_no_time_is_a_bad_event(when: float) -> None:
    ev = pb.TelemetryEvent(header=header(SOURCE, 1, now=when), drops=pb.DropReport())
    with pytest.raises(BadEvent, match="time_unix"):
        documents(ev)


def test_templates_map_every_field_explicitly_and_strictly() -> None:
    templates = index_templates(replicas=2)
    assert set(templates) == set(FIELDS) == set(ALL_INDICES) == {*INDICES.values(), SHARES_INDEX}
    for index, body in templates.items():
        assert body["index_patterns"] == [index]
        template = body["template"]
        assert template["settings"]["number_of_replicas"] == 2
        assert template["mappings"]["dynamic"] == "strict"
        props = template["mappings"]["properties"]
        assert {name: prop["type"] for name, prop in props.items()} == FIELDS[index]
    for fields in FIELDS.values():
        assert {"@timestamp", "collective", "source_id", "seq", "kind", "schema_version"} <= set(fields)
    with pytest.raises(ValueError):
        index_templates(replicas=-1)
