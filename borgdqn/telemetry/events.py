"""Telemetry events on the wire: ``borg.v1.TelemetryEvent`` (protos/borg/v1/telemetry.proto) and their names.

One Kafka topic and one Elasticsearch index per event kind; an event's document id is ``source_id:seq``, so an
event indexed twice (a consumer replaying after a crash) is stored once. Decoding treats its input as hostile:
a bad message raises :class:`BadEvent` (a ``ValueError``) with a one-line reason.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from google.protobuf.message import DecodeError

from borgdqn.proto.borg.v1 import telemetry_pb2 as pb

SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 1 << 20  # far above any real event (a memory report with 256 agents is ~3 KB)

Kind = Literal["episode", "training", "memory", "drops", "assimilation"]
DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class EventKind:
    """One kind of event: the name of its payload in ``TelemetryEvent``'s ``oneof``, the payload's message, and how
    long its Kafka topic keeps it. Its topic is ``borg.telemetry.<kind>``, its Elasticsearch index ``borg-<kind>``
    (its document fields: borgdqn/telemetry/documents.py)."""

    kind: Kind
    message: type
    retention_ms: int
    partitions: int = 3


# Episodes and training reports are the run's history (Elasticsearch keeps it longer): a week in Kafka is
# room for an indexer that was down over a long weekend. Memory readings come every few seconds and are only
# a snapshot: a day. Drop reports and assimilations are rare and explain gaps and jumps: a month.
EVENT_KINDS: tuple[EventKind, ...] = (
    EventKind("episode", pb.EpisodeEvent, 7 * DAY_MS),
    EventKind("training", pb.TrainingReport, 7 * DAY_MS),
    EventKind("memory", pb.MemoryReport, 1 * DAY_MS),
    EventKind("drops", pb.DropReport, 30 * DAY_MS),
    EventKind("assimilation", pb.AssimilationEvent, 30 * DAY_MS),
)
KINDS: tuple[Kind, ...] = tuple(row.kind for row in EVENT_KINDS)
KIND_OF_MESSAGE: dict[type, Kind] = {row.message: row.kind for row in EVENT_KINDS}
TOPICS: dict[Kind, str] = {kind: f"borg.telemetry.{kind}" for kind in KINDS}
INDICES: dict[Kind, str] = {kind: f"borg-{kind}" for kind in KINDS}

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")


class BadEvent(ValueError):
    """A message that is not a telemetry event this reader can use (the reason is one line)."""


@dataclass(frozen=True)
class Source:
    """Who sends events: the collective, a role and index (``agent-3``, ``memory-0``) or a name of its own (a
    collective's agent is its pod), a random id per process life; ``next_seq`` numbers its events from 0."""

    collective: str
    role: str
    index: int
    nonce: str
    name: str = ""  # replaces ``role-index`` in the source id

    @classmethod
    def new(cls, collective: str, role: str, index: int = 0, name: str = "") -> Source:
        for what, value in (("collective", collective), ("role", role), ("name", name or role)):
            if not _NAME.match(value):
                raise ValueError(f"telemetry {what} {value!r}: use 1-63 letters, digits, '_', '.', '-'")
        return cls(collective, role, index, secrets.token_hex(4), name)

    @property
    def source_id(self) -> str:
        return f"{self.collective}/{self.name or f'{self.role}-{self.index}'}/{self.nonce}"


def header(source: Source, seq: int, now: float | None = None) -> pb.EventHeader:
    return pb.EventHeader(schema_version=SCHEMA_VERSION, collective=source.collective, source_id=source.source_id,
                          seq=seq, time_unix=time.time() if now is None else now)


def kind_of(event: pb.TelemetryEvent) -> Kind:
    kind = event.WhichOneof("event")
    if kind not in KINDS:
        raise BadEvent("event carries no known payload")
    return kind


def event_id(event: pb.TelemetryEvent) -> str:
    """The event's document id: unique per (source, seq)."""
    return f"{event.header.source_id}:{event.header.seq}"


def encode_event(event: pb.TelemetryEvent) -> bytes:
    return event.SerializeToString()


def decode_event(data: bytes | None) -> pb.TelemetryEvent:
    """Parse and check one message; raises BadEvent (one line) for anything a consumer must skip."""
    if data is None:
        raise BadEvent("empty message (a tombstone?)")
    if len(data) > MAX_EVENT_BYTES:
        raise BadEvent(f"message of {len(data)} bytes exceeds {MAX_EVENT_BYTES}")
    event = pb.TelemetryEvent()
    try:
        event.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise BadEvent(f"not a TelemetryEvent: {' '.join(str(err).split()) or 'unparsable bytes'}") from None
    if not event.HasField("header"):
        raise BadEvent("event without a header")
    h = event.header
    if h.schema_version < 1 or h.schema_version > SCHEMA_VERSION:
        raise BadEvent(f"schema_version {h.schema_version} is not 1..{SCHEMA_VERSION}")
    if not h.source_id or not h.collective:
        raise BadEvent("event without source_id or collective")
    kind_of(event)
    return event
