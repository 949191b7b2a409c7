"""The collective's status, computed from what the operator observed: a pure function, no cluster, no clock.

`compute_status(collective, observed, now)` turns the collective (its parsed spec or the spec's error, its
generation, the pause annotation, the status it has now) and the children as read from the apiserver (agents
and memory StatefulSets, Kafka, ECK's Elasticsearch and Kibana, the indexer, agent pods the scheduler
could not place, APIs the spec needs that the cluster does not serve) into the status the CRD declares:

    observedGeneration, phase, conditions[Ready, AgentsReady, MemoryReady, KafkaReady, ElasticReady],
    agents{replicas, ready, selector}, gpus, memory{fill, droppedChunks, writeErrors, skippedChunks, outageSeconds}

Conditions follow the Kubernetes convention (type/status/reason/message/lastTransitionTime, as Strimzi and ECK
write them): `lastTransitionTime` moves only when a condition's status does. `status_patch` says what to write,
or None when nothing changed, so the operator writes the status only when it changes.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from borg_operator.spec import GPU_RESOURCE, CollectiveSpec, SpecError, parse_spec
from borgdqn.memory.redis.keys import LinkTotals

PAUSED_ANNOTATION = "borg.dev/paused"
CONDITION_TYPES = ("Ready", "AgentsReady", "MemoryReady", "KafkaReady", "ElasticReady", "Complete")
STATUS_KEYS = ("observedGeneration", "phase", "conditions", "agents", "gpus", "completed", "memory")
PHASES = ("Pending", "Creating", "Running", "Degraded", "Succeeded", "Paused", "Failed")
# The scheduler's message is kept whole in the pod's condition; a status line only needs its gist.
_MAX_SCHEDULER_MESSAGE = 200


def is_paused(body: Mapping[str, Any]) -> bool:
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(PAUSED_ANNOTATION, "")).strip().lower() == "true"


def parse_body(body: Mapping[str, Any]) -> tuple[CollectiveSpec | None, str | None]:
    """A collective's spec, parsed, or why it cannot run (one line)."""
    try:
        return parse_spec(dict(body.get("spec") or {})), None
    except SpecError as err:
        return None, str(err)


@dataclass(frozen=True)
class Collective:
    """What the status needs of the BorgCollective itself."""

    name: str
    namespace: str
    generation: int
    paused: bool = False
    spec: CollectiveSpec | None = None
    spec_error: str | None = None  # set instead of `spec` when the spec cannot run
    status: Mapping[str, Any] = field(default_factory=dict)  # the status it has now

    @classmethod
    def from_body(cls, body: Mapping[str, Any],
                  parsed: tuple[CollectiveSpec | None, str | None] | None = None) -> Collective:
        """`parsed`: the body's spec as the reconciler parsed it (`parse_body`), so it is not parsed again."""
        meta = body.get("metadata") or {}
        spec, error = parsed or parse_body(body)
        return cls(name=meta.get("name", ""), namespace=meta.get("namespace", ""),
                   generation=int(meta.get("generation") or 0), paused=is_paused(body), spec=spec,
                   spec_error=error, status=dict(body.get("status") or {}))


@dataclass(frozen=True)
class MissingApi:
    """A kind the spec needs (e.g. Strimzi's Kafka in strimzi mode) that the cluster does not serve."""

    api_version: str
    kind: str

    @property
    def group(self) -> str:
        return self.api_version.split("/", 1)[0] if "/" in self.api_version else ""

    @property
    def reason(self) -> str:
        if self.group.endswith("strimzi.io"):
            return "StrimziNotInstalled"
        if self.group.endswith("k8s.elastic.co"):
            return "EckNotInstalled"
        return "ApiNotServed"

    @property
    def message(self) -> str:
        served = f"the cluster does not serve {self.kind} ({self.api_version})"
        if self.reason == "StrimziNotInstalled":
            return (f"kafka.mode is strimzi but {served}: install Strimzi (its CRDs and operator, strimzi.io), "
                    "or set spec.kafka.mode to managed or external")
        if self.reason == "EckNotInstalled":
            return (f"elastic.mode is eck but {served}: install ECK (Elastic Cloud on Kubernetes, its CRDs and "
                    "operator), or set spec.elastic.mode to disabled")
        return f"{served}: install what provides it"


@dataclass(frozen=True)
class Observed:
    """The children as read from the apiserver (None: not there), and what the operator found out."""

    agents: Mapping[str, Any] | None = None  # the agents StatefulSet
    memory: Mapping[str, Any] | None = None  # the memory StatefulSet
    kafka: Mapping[str, Any] | None = None  # managed: the Kafka StatefulSet; strimzi: Strimzi's Kafka
    elasticsearch: Mapping[str, Any] | None = None  # ECK's Elasticsearch
    kibana: Mapping[str, Any] | None = None  # ECK's Kibana
    indexer: Mapping[str, Any] | None = None  # the indexer Deployment
    unschedulable: Sequence[str] = ()  # one scheduler message per agent pod it could not place
    missing: Sequence[MissingApi] = ()
    memory_fill: float | None = None  # None: not known (memory not ready, not reachable)
    memory_links: LinkTotals | None = None  # what the agents' links to the log report (known with the fill)
    memory_finished: Mapping[int, int] | None = None  # agent id -> env steps when it finished (known with the fill)
    memory_refused: str | None = None  # why the memory refused the operator's read (password, ACL, certificate)
    error: str | None = None  # the last reconcile failed with this (one line)
    observed_generation: int | None = None  # the generation the children were last reconciled to
    selector: str = ""  # the agents' label selector (label selector syntax), for the scale subresource


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str

    @property
    def ok(self) -> bool:
        return self.status == "True"


def _true(type_: str, reason: str, message: str) -> Condition:
    return Condition(type_, "True", reason, message)


def _false(type_: str, reason: str, message: str) -> Condition:
    return Condition(type_, "False", reason, message)


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _workload(obj: Mapping[str, Any]) -> tuple[int, int, int, bool]:
    """(desired, ready, updated, current) of a Deployment or StatefulSet; current: its controller saw the spec."""
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    desired = _int(spec.get("replicas", 1))
    generation = _int((obj.get("metadata") or {}).get("generation"))
    current = _int(status.get("observedGeneration")) >= generation
    return desired, _int(status.get("readyReplicas")), _int(status.get("updatedReplicas")), current


def selector_string(match_labels: Mapping[str, str]) -> str:
    """matchLabels -> label selector syntax (`a=b,c=d`, sorted: the same labels give the same string)."""
    return ",".join(f"{key}={value}" for key, value in sorted(match_labels.items()))


def _short(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= _MAX_SCHEDULER_MESSAGE else message[: _MAX_SCHEDULER_MESSAGE - 3] + "..."


def is_completed(status: Mapping[str, Any], spec: CollectiveSpec) -> bool:
    """Whether ``status`` says that every agent the spec asks for finished the spec's budget: the agents then get no
    pods (builders), until spec.agents.steps or spec.agents.replicas changes."""
    completed = status.get("completed")
    return (status.get("phase") == "Succeeded" and isinstance(completed, Mapping)
            and completed.get("steps") == spec.agents.steps and completed.get("agents") == spec.agents.replicas)


def _completion(spec: CollectiveSpec, observed: Observed, status: Mapping[str, Any]) -> tuple[bool, Condition]:
    """(every agent finished its budget, the Complete condition), from the finished marks the agents leave in the
    memory's Redis; while they cannot be read, a completed collective stays completed (no pods are restarted)."""
    n, steps = spec.agents.replicas, spec.agents.steps
    finished = observed.memory_finished
    if finished is None:
        if is_completed(status, spec):
            return True, _true("Complete", "BudgetReached", f"all {n} agents finished their {steps:,} env steps")
        return False, _kept_or_unknown(_previous_conditions(status), "Complete", "NotKnown",
                                       "the agents' finished marks in the memory are not read yet")
    done = sum(1 for k in range(n) if finished.get(k, -1) >= steps)
    if n > 0 and done == n:
        return True, _true("Complete", "BudgetReached", f"all {n} agents finished their {steps:,} env steps")
    return False, _false("Complete", "Training", f"{done}/{n} agents finished their {steps:,} env steps")


def agents_condition(spec: CollectiveSpec, agents: Mapping[str, Any] | None,
                     unschedulable: Sequence[str], completed: bool = False) -> Condition:
    desired = spec.agents.replicas
    if completed:
        return _true("AgentsReady", "Completed", f"all {desired} agents finished their budget; their pods are gone")
    if agents is None:
        return _false("AgentsReady", "NotCreated", "the agents StatefulSet does not exist yet")
    _, ready, updated, current = _workload(agents)
    counts = f"{ready}/{desired} agents ready"
    if unschedulable:
        pods = f"{len(unschedulable)} agent pod{'s' if len(unschedulable) > 1 else ''}"
        if spec.agents.gpus > 0:
            why = (f"{pods} cannot be scheduled: more agents than free GPUs "
                   f"({spec.agents.gpus} {GPU_RESOURCE} each)")
        else:
            why = f"{pods} cannot be scheduled"
        return _false("AgentsReady", "Unschedulable", f"{counts}; {why}: {_short(unschedulable[0])}")
    if desired == 0:
        return _true("AgentsReady", "ScaledToZero", "0 agents desired")
    if current and ready >= desired and updated >= desired:
        return _true("AgentsReady", "AllReady", counts)
    return _false("AgentsReady", "Progressing", counts)


def _statefulset_condition(type_: str, what: str, obj: Mapping[str, Any] | None, missing: str) -> Condition:
    if obj is None:
        return _false(type_, "NotCreated", missing)
    desired, ready, _, current = _workload(obj)
    counts = f"{ready}/{desired} {what} ready"
    if current and ready >= desired:
        return _true(type_, "AllReady", counts)
    return _false(type_, "Progressing", counts)


def memory_condition(memory: Mapping[str, Any] | None, fill: float | None,
                     links: LinkTotals | None = None, refused: str | None = None) -> Condition:
    condition = _statefulset_condition("MemoryReady", "memory pods", memory,
                                       "the memory StatefulSet does not exist yet")
    if refused is not None:
        # The memory's users or certificate do not match its Secrets: the agents are refused the same way.
        return _false("MemoryReady", "AccessRefused",
                      f"{condition.message}; the memory refuses the operator's monitor user: {refused}")
    if fill is None:
        return condition
    message = f"{condition.message}, {fill:.0%} full"
    if links is not None and (links.dropped_chunks or links.skipped_chunks or links.write_errors):
        # Experience lost on the way (agents' outboxes overflowed while Redis was away, Redis refused appends,
        # tails fell behind the log).
        message += (f"; agents dropped {links.dropped_chunks} chunks, Redis refused {links.write_errors} appends, "
                    f"tails skipped {links.skipped_chunks}")
    return Condition(condition.type, condition.status, condition.reason, message)


def _missing_for(missing: Sequence[MissingApi], reason: str) -> MissingApi | None:
    return next((api for api in missing if api.reason == reason), None)


def kafka_condition(spec: CollectiveSpec, kafka: Mapping[str, Any] | None,
                    missing: Sequence[MissingApi]) -> Condition:
    mode = spec.kafka.mode
    if mode == "external":
        return _true("KafkaReady", "External",
                     f"external bootstrap servers {spec.kafka.bootstrap_servers} (not checked by the operator)")
    if mode == "managed":
        return _statefulset_condition("KafkaReady", "brokers", kafka, "the Kafka StatefulSet does not exist yet")
    gone = _missing_for(missing, "StrimziNotInstalled")
    if gone is not None:
        return _false("KafkaReady", gone.reason, gone.message)
    if kafka is None:
        return _false("KafkaReady", "NotCreated", "the Strimzi Kafka resource does not exist yet")
    ready = next((c for c in (kafka.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready is not None and ready.get("status") == "True":
        return _true("KafkaReady", "StrimziReady", "Strimzi reports the Kafka cluster Ready")
    detail = (ready or {}).get("message") or "Strimzi has not reported the Kafka cluster Ready yet"
    return _false("KafkaReady", "StrimziNotReady", _short(str(detail)))


def _health(obj: Mapping[str, Any] | None) -> str:
    return str((obj or {}).get("status", {}).get("health") or "unknown")


def elastic_condition(spec: CollectiveSpec, observed: Observed) -> Condition:
    if spec.elastic.mode == "disabled":
        return _true("ElasticReady", "Disabled", "elastic.mode is disabled: no Elasticsearch, Kibana or indexer")
    gone = _missing_for(observed.missing, "EckNotInstalled")
    if gone is not None:
        return _false("ElasticReady", gone.reason, gone.message)
    if observed.elasticsearch is None:
        return _false("ElasticReady", "NotCreated", "the Elasticsearch resource does not exist yet")
    es = _health(observed.elasticsearch)
    parts = [f"Elasticsearch {es}"]
    # ECK's yellow: every primary shard is assigned, only replicas are not (a single node): it serves.
    problems = [] if es in ("green", "yellow") else ["ElasticsearchNotReady"]
    if spec.elastic.kibana.count > 0:
        kibana = _health(observed.kibana) if observed.kibana is not None else "missing"
        parts.append(f"Kibana {kibana}")
        if kibana != "green":
            problems.append("KibanaNotReady")
    if observed.indexer is not None:
        desired, ready, _, current = _workload(observed.indexer)
        parts.append(f"indexer {ready}/{desired} ready")
        if not (current and ready >= desired):
            problems.append("IndexerNotReady")
    message = ", ".join(parts)
    return _false("ElasticReady", problems[0], message) if problems else _true("ElasticReady", "Healthy", message)


_PART_REASON = {"AgentsReady": "AgentsNotReady", "MemoryReady": "MemoryNotReady", "KafkaReady": "KafkaNotReady",
                "ElasticReady": "ElasticNotReady"}


def _ready(parts: Sequence[Condition]) -> Condition:
    failing = [c for c in parts if not c.ok]
    if not failing:
        return _true("Ready", "AllReady", "agents, memory, Kafka and Elasticsearch are ready")
    message = "; ".join(f"{c.type}: {c.message}" for c in failing)
    return _false("Ready", _PART_REASON.get(failing[0].type, "NotReady"), message)


def _previous_conditions(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in status.get("conditions") or [] if isinstance(c, Mapping)}


def _kept_or_unknown(previous: dict[str, Mapping[str, Any]], type_: str, reason: str, message: str) -> Condition:
    old = previous.get(type_)
    if old is not None:
        return Condition(type_, str(old.get("status", "Unknown")), str(old.get("reason", reason)),
                         str(old.get("message", "")))
    return Condition(type_, "Unknown", reason, message)


def timestamp(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _render(conditions: Sequence[Condition], previous: dict[str, Mapping[str, Any]],
            now: datetime.datetime) -> list[dict[str, str]]:
    rendered = []
    for condition in conditions:
        old = previous.get(condition.type) or {}
        kept = old.get("status") == condition.status and old.get("lastTransitionTime")
        rendered.append({
            "type": condition.type,
            "status": condition.status,
            "reason": condition.reason,
            "message": condition.message,
            "lastTransitionTime": str(old["lastTransitionTime"]) if kept else timestamp(now),
        })
    return rendered


def compute_status(collective: Collective, observed: Observed, now: datetime.datetime) -> dict[str, Any]:
    """The status the collective should have, given what was observed at `now`."""
    previous = _previous_conditions(collective.status)
    spec = collective.spec
    if spec is None:
        # The spec cannot run: the children stay as they were, so their conditions keep what they said.
        error = collective.spec_error or "the spec cannot be parsed"
        parts = [_kept_or_unknown(previous, type_, "InvalidSpec", error) for type_ in CONDITION_TYPES[1:-1]]
        complete = _kept_or_unknown(previous, "Complete", "InvalidSpec", error)
        completed = False
        ready = _false("Ready", "InvalidSpec", error)
    else:
        completed, complete = _completion(spec, observed, collective.status)
        parts = [
            agents_condition(spec, observed.agents, observed.unschedulable, completed),
            memory_condition(observed.memory, observed.memory_fill, observed.memory_links, observed.memory_refused),
            kafka_condition(spec, observed.kafka, observed.missing),
            elastic_condition(spec, observed),
        ]
        if observed.missing:
            ready = _false("Ready", observed.missing[0].reason, observed.missing[0].message)
        elif observed.error:
            ready = _false("Ready", "ReconcileError", observed.error)
        else:
            ready = _ready(parts)
    if collective.paused:
        ready = Condition("Ready", ready.status, "Paused",
                          f"reconciling is paused ({PAUSED_ANNOTATION}: \"true\"); {ready.message}")

    status: dict[str, Any] = {}
    generation = observed.observed_generation
    if generation is None:
        generation = collective.status.get("observedGeneration")
    if generation is not None:
        status["observedGeneration"] = int(generation)
    status["phase"] = _phase(collective, observed, ready, completed)
    # Complete is not part of Ready: a collective is ready while it trains.
    status["conditions"] = _render([ready, *parts, complete], previous, now)
    agents_status = (observed.agents or {}).get("status") or {}
    selector = observed.selector or str((collective.status.get("agents") or {}).get("selector", ""))
    status["agents"] = {"replicas": _int(agents_status.get("replicas")),
                        "ready": _int(agents_status.get("readyReplicas")), "selector": selector}
    if spec is not None:
        status["gpus"] = 0 if completed else spec.agents.replicas * spec.agents.gpus
        if completed:
            status["completed"] = {"steps": spec.agents.steps, "agents": spec.agents.replicas}
    elif "gpus" in collective.status:
        status["gpus"] = _int(collective.status["gpus"])
    if observed.memory_fill is not None:
        status["memory"] = {"fill": f"{observed.memory_fill:.0%}"}
        if observed.memory_links is not None:
            links = observed.memory_links
            status["memory"].update(droppedChunks=links.dropped_chunks, writeErrors=links.write_errors,
                                    skippedChunks=links.skipped_chunks,
                                    outageSeconds=round(links.outage_s, 1))
    return status


def _phase(collective: Collective, observed: Observed, ready: Condition, completed: bool) -> str:
    if collective.paused:
        return "Paused"
    if collective.spec is None or observed.missing:
        return "Failed"
    if completed:
        return "Succeeded"
    if ready.ok:
        return "Running"
    if observed.agents is None:
        return "Pending"
    if collective.status.get("phase") in ("Running", "Degraded"):
        return "Degraded"
    return "Creating"


def status_patch(current: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any] | None:
    """A JSON merge patch of the status from `current` to `new` (None: nothing to write).

    Keys of ours the new status leaves out (e.g. `memory` once the fill is unknown) are removed with null; keys
    someone else wrote are left alone; lists (the conditions) are replaced whole, as merge patches do.
    """
    patch: dict[str, Any] = {key: value for key, value in new.items() if current.get(key) != value}
    patch.update({key: None for key in current if key in STATUS_KEYS and key not in new})
    return patch or None


def ready_condition(status: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return _previous_conditions(status).get("Ready")


# Ready reasons that mean the user (or the cluster's admin) has to act: each is a Warning event, once.
WARNING_REASONS = frozenset({"InvalidSpec", "StrimziNotInstalled", "EckNotInstalled", "ApiNotServed",
                             "ReconcileError"})


@dataclass(frozen=True)
class Event:
    type: str  # "Normal" | "Warning"
    reason: str
    message: str


def transition_events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """The events a status change deserves: posted on transitions only, so a retried failure or a resync that
    finds the same problem again posts nothing new (no event storm)."""
    events: list[Event] = []
    before, after = _previous_conditions(old), _previous_conditions(new)
    was, now = before.get("Ready") or {}, after.get("Ready") or {}
    reason, message = str(now.get("reason", "")), str(now.get("message", ""))
    if reason != was.get("reason"):
        if reason in WARNING_REASONS:
            events.append(Event("Warning", reason, message))
        elif reason == "Paused":
            events.append(Event("Normal", "Paused", message))
        elif was.get("reason") == "Paused":
            events.append(Event("Normal", "Resumed", "reconciling again (the pause annotation is gone)"))
        if now.get("status") == "True" and was.get("status") != "True" and reason != "Paused":
            events.append(Event("Normal", "Ready", message))
    if new.get("phase") == "Succeeded" and old.get("phase") != "Succeeded":
        complete = after.get("Complete") or {}
        events.append(Event("Normal", "Succeeded", f"{complete.get('message', 'every agent finished')}; the agents' "
                            "pods are released, the memory, Kafka and Elasticsearch stay"))
    agents_was, agents_now = before.get("AgentsReady") or {}, after.get("AgentsReady") or {}
    if agents_now.get("reason") == "Unschedulable" and agents_was.get("reason") != "Unschedulable":
        events.append(Event("Warning", "Unschedulable", str(agents_now.get("message", ""))))
    return events
