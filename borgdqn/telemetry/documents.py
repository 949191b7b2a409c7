"""Elasticsearch documents made from telemetry events, and the index templates (explicit mappings) they go into.

One index per event kind (``INDICES`` in :mod:`borgdqn.telemetry.events`) plus ``borg-memory-shares``: one
document per (memory report, agent) from ``MemoryReport.per_agent_steps``, so Kibana can chart each agent's
share of the pool. A document's id is the event's id (``source_id:seq``; ``source_id:seq:agent`` for shares),
so an event indexed twice is stored once.

Every mapping is ``dynamic: strict``: a field the template does not name makes Elasticsearch reject the
document instead of guessing a type (a guessed ``long`` for a field that later carries ``0.5`` breaks every
chart on it). The documents are built here from the proto, so a strict rejection can only mean that this file
and its templates disagree; a test catches that, and the indexer counts and logs such a document and goes on.

``FIELDS`` (index -> field -> Elasticsearch type) is derived from the templates and is what the Kibana saved
objects are checked against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from borgdqn.proto.borg.v1 import telemetry_pb2 as pb
from borgdqn.telemetry.events import INDICES, BadEvent, event_id, kind_of

SHARES_INDEX = "borg-memory-shares"
ALL_INDICES: tuple[str, ...] = (*INDICES.values(), SHARES_INDEX)
TEMPLATE_PRIORITY = 200  # above Elasticsearch's built-in templates (priority 100 for logs-*-* and the like)
DATE_FORMAT = "strict_date_optional_time||epoch_millis"

Document = tuple[str, str, dict[str, Any]]  # (index, id, body)

_COMMON: dict[str, str] = {
    "@timestamp": "date",
    "collective": "keyword",
    "source_id": "keyword",
    "seq": "long",
    "kind": "keyword",
    "schema_version": "integer",
}
_EPISODE: dict[str, str] = {
    "agent": "integer", "policy": "keyword", "episode_return": "double", "length": "long", "env_steps": "long",
    "episode": "long", "epsilon": "double", "wall_seconds": "double",
}
_TRAINING: dict[str, str] = {
    "agent": "integer", "env_steps": "long", "updates": "long", "loss": "double", "mean_q": "double",
    "learning_rate": "double", "updates_per_s": "double", "env_steps_per_s": "double",
    "replay_sample_age": "double", "epsilon": "double", "mean_return": "double", "best_mean_return": "double",
    "wall_seconds": "double",
}
_MEMORY: dict[str, str] = {
    "size": "long", "capacity": "long", "inserted": "long", "sampled": "long", "rejected": "long",
    "bytes_used": "long", "fill": "double", "insert_rate": "double", "sample_rate": "double",
    "wall_seconds": "double", "dropped_chunks": "long", "write_errors": "long", "skipped_chunks": "long",
    "outage_seconds": "double", "replication_lag_p99_ms": "double",
}
_SHARES: dict[str, str] = {"agent": "integer", "steps": "long", "share": "double"}
_DROPS: dict[str, str] = {"dropped_events": "long", "first_dropped_seq": "long", "last_dropped_seq": "long"}
_ASSIMILATION: dict[str, str] = {
    "agent": "integer", "donor": "integer", "env_steps": "long", "mean_return": "double",
    "donor_mean_return": "double", "donor_env_steps": "long", "learning_rate": "double", "epsilon_floor": "double",
    "wall_seconds": "double",
}

FIELDS: dict[str, dict[str, str]] = {
    INDICES["episode"]: {**_COMMON, **_EPISODE},
    INDICES["training"]: {**_COMMON, **_TRAINING},
    INDICES["memory"]: {**_COMMON, **_MEMORY},
    SHARES_INDEX: {**_COMMON, **_SHARES},
    INDICES["drops"]: {**_COMMON, **_DROPS},
    INDICES["assimilation"]: {**_COMMON, **_ASSIMILATION},
}


def _mapping(fields: Mapping[str, str]) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for name, es_type in fields.items():
        prop: dict[str, Any] = {"type": es_type}
        if es_type == "date":
            prop["format"] = DATE_FORMAT
        elif es_type == "keyword":
            prop["ignore_above"] = 1024
        properties[name] = prop
    return {"dynamic": "strict", "properties": properties}


def index_templates(replicas: int = 0, shards: int = 1, refresh_interval: str = "1s") -> dict[str, dict[str, Any]]:
    """Composable index templates (``PUT _index_template/<name>``), one per index, named as the index they
    match; each with settings and the explicit mapping of ``FIELDS``."""
    if replicas < 0 or shards < 1:
        raise ValueError(f"index settings: shards {shards} must be >= 1 and replicas {replicas} >= 0")
    return {
        index: {
            "index_patterns": [index],
            "priority": TEMPLATE_PRIORITY,
            "template": {
                "settings": {"number_of_shards": shards, "number_of_replicas": replicas,
                             "refresh_interval": refresh_interval},
                "mappings": _mapping(fields),
            },
            "_meta": {"managed_by": "borgdqn", "description": f"Borg-DQN telemetry: {index}"},
        }
        for index, fields in FIELDS.items()
    }


def _put(body: dict[str, Any], name: str, value: float | None) -> None:
    """Sets a double field unless it is absent or not finite (JSON has no NaN; a diverged loss is no number)."""
    if value is not None and math.isfinite(value):
        body[name] = value


def _timestamp_ms(time_unix: float) -> int:
    if not math.isfinite(time_unix) or not 0 <= time_unix < 1e11:
        raise BadEvent(f"header.time_unix {time_unix!r} is not a time")
    return round(time_unix * 1000)


def documents(event: pb.TelemetryEvent) -> list[Document]:
    """The documents one (decoded) event makes: ``(index, id, body)``; raises BadEvent for an event whose
    content cannot be a document (a time that is no time)."""
    kind = kind_of(event)
    h = event.header
    doc_id = event_id(event)
    common: dict[str, Any] = {
        "@timestamp": _timestamp_ms(h.time_unix), "collective": h.collective, "source_id": h.source_id,
        "seq": h.seq, "kind": kind, "schema_version": h.schema_version,
    }
    body = dict(common)
    docs: list[Document] = []
    if kind == "episode":
        e = event.episode
        body.update(agent=e.agent, policy=e.policy, length=e.length, env_steps=e.env_steps, episode=e.episode)
        for name in ("episode_return", "epsilon", "wall_seconds"):
            _put(body, name, getattr(e, name))
    elif kind == "training":
        t = event.training
        body.update(agent=t.agent, env_steps=t.env_steps, updates=t.updates)
        for name in ("learning_rate", "updates_per_s", "env_steps_per_s", "epsilon", "wall_seconds"):
            _put(body, name, getattr(t, name))
        for name in ("loss", "mean_q", "replay_sample_age", "mean_return", "best_mean_return"):
            if t.HasField(name):
                _put(body, name, getattr(t, name))
    elif kind == "memory":
        m = event.memory
        body.update(size=m.size, capacity=m.capacity, inserted=m.inserted, sampled=m.sampled, rejected=m.rejected,
                    bytes_used=m.bytes_used, dropped_chunks=m.dropped_chunks, skipped_chunks=m.skipped_chunks,
                    write_errors=m.write_errors)
        _put(body, "outage_seconds", m.outage_seconds)
        if m.capacity > 0:
            body["fill"] = m.size / m.capacity
        for name in ("insert_rate", "sample_rate", "replication_lag_p99_ms"):
            if m.HasField(name):
                _put(body, name, getattr(m, name))
        _put(body, "wall_seconds", m.wall_seconds)
        for agent, steps in sorted(m.per_agent_steps.items()):
            share: dict[str, Any] = {**common, "agent": agent, "steps": steps}
            if m.size > 0:
                share["share"] = steps / m.size
            docs.append((SHARES_INDEX, f"{doc_id}:{agent}", share))
    elif kind == "drops":
        d = event.drops
        body.update(dropped_events=d.dropped_events, first_dropped_seq=d.first_dropped_seq,
                    last_dropped_seq=d.last_dropped_seq)
    else:
        a = event.assimilation
        body.update(agent=a.agent, donor=a.donor, env_steps=a.env_steps, donor_env_steps=a.donor_env_steps)
        for name in ("mean_return", "donor_mean_return", "learning_rate", "wall_seconds"):
            _put(body, name, getattr(a, name))
        if a.HasField("epsilon_floor"):
            _put(body, "epsilon_floor", a.epsilon_floor)
    docs.insert(0, (INDICES[kind], doc_id, body))
    return docs
