"""Reads a collective's children from the apiserver into `status.Observed`: the impure half of the status.

Reads the agents' StatefulSet by name, and the workloads the last reconcile rendered (`Rendered`): the memory
StatefulSet, Kafka (the StatefulSet, or Strimzi's Kafka), ECK's Elasticsearch and Kibana, the indexer
Deployment, as the spec's modes have them; lists the agent pods the scheduler could not place (Pending,
PodScheduled=False, reason Unschedulable: e.g. more agents than GPUs); and, once the memory has a ready pod,
reads its fill from Redis (memory_fill.py) with a short deadline, as the monitor user.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from borg_operator import names
from borg_operator.apply import Applier
from borg_operator.builders import OWNED_KINDS, Manifest, Material
from borg_operator.memory_fill import FillReader
from borg_operator.spec import REDIS_PORT, memory_host
from borg_operator.status import MissingApi, Observed
from borgdqn.memory.redis.acl import MONITOR

log = logging.getLogger(__name__)

APPS = "apps/v1"
# The kinds of the children whose state the status reads, and their components (the `Observed` fields they fill);
# the agents are read by name whatever was rendered (the scale subresource's StatefulSet).
WORKLOAD_KINDS = frozenset((api_version, kind) for api_version, kind, _ in OWNED_KINDS
                           if kind in ("StatefulSet", "Deployment", "Kafka", "Elasticsearch", "Kibana"))
PART_ROLES = frozenset({names.MEMORY, names.KAFKA, names.ELASTICSEARCH, names.KIBANA, names.INDEXER})


def unschedulable_messages(pods: Sequence[dict[str, Any]]) -> list[str]:
    """The scheduler's message for each pod it could not place (the pod stays Pending)."""
    messages = []
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") != "Pending" or (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        for condition in status.get("conditions") or []:
            if (condition.get("type") == "PodScheduled" and condition.get("status") == "False"
                    and condition.get("reason") == "Unschedulable"):
                messages.append(str(condition.get("message") or "Unschedulable"))
    return messages


def _ready_replicas(obj: dict[str, Any] | None) -> int:
    try:
        return int(((obj or {}).get("status") or {}).get("readyReplicas") or 0)
    except (TypeError, ValueError):
        return 0


@dataclass(frozen=True)
class Part:
    """A rendered child whose state the status reads; `role` is its component, the `Observed` field it fills."""

    role: str
    api_version: str
    kind: str
    name: str


@dataclass(frozen=True)
class Rendered:
    """What the status needs of the children the last reconcile rendered: the parts to read, and the monitor's
    login to read the memory's fill with."""

    parts: tuple[Part, ...]
    monitor_password: str = field(repr=False)
    memory_ca: str = field(repr=False)

    @classmethod
    def of(cls, children: Sequence[Manifest], material: Material) -> Rendered:
        parts = tuple(
            Part(role, str(child["apiVersion"]), str(child["kind"]), str(child["metadata"]["name"]))
            for child in children
            if (child["apiVersion"], child["kind"]) in WORKLOAD_KINDS
            and (role := child["metadata"]["labels"].get(names.LABEL_COMPONENT)) in PART_ROLES)
        return cls(parts, material.passwords.get(MONITOR.secret_key, ""), material.memory_ca)


def observe(applier: Applier, cr: str, namespace: str, rendered: Rendered | None, *,
            missing: Sequence[MissingApi] = (),
            error: str | None = None, observed_generation: int | None = None,
            fills: FillReader | None = None) -> Observed:
    """What the status needs, read now: the agents (always, by name), and the parts of `rendered` (None: the spec
    is invalid, only the agents are read) whose kind the cluster serves."""
    agents = applier.get(APPS, "StatefulSet", namespace, names.agents(cr))
    unschedulable: list[str] = []
    if agents is not None and _ready_replicas(agents) < int((agents.get("spec") or {}).get("replicas") or 0):
        pods = applier.list("v1", "Pod", namespace, names.selector_string(cr)) or []
        unschedulable = unschedulable_messages(pods)
    parts: dict[str, Any] = {}
    for part in rendered.parts if rendered is not None else ():
        if MissingApi(part.api_version, part.kind) not in missing:
            parts[part.role] = applier.get(part.api_version, part.kind, namespace, part.name)
    if rendered is not None and fills is not None and _ready_replicas(parts.get(names.MEMORY)) > 0:
        host = memory_host(cr, namespace)
        fill, why = fills.read(host, REDIS_PORT, MONITOR.name, rendered.monitor_password, cr, rendered.memory_ca)
        parts["memory_refused"] = fills.refusal(host, REDIS_PORT, cr)
        if fill is not None:
            parts["memory_fill"], parts["memory_links"] = fill.fill, fill.links
            parts["memory_finished"] = fill.finished
        if why is not None:
            log.debug("memory fill of %s/%s unknown: %s", namespace, cr, why)
    return Observed(agents=agents, unschedulable=unschedulable, missing=tuple(missing), error=error,
                    observed_generation=observed_generation, selector=names.selector_string(cr), **parts)
