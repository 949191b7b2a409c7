"""Reads a collective's children from the apiserver into `status.Observed`: the impure half of the status.

Reads by name what the builders render (names.py): the agents and memory StatefulSets, Kafka (the
StatefulSet, or Strimzi's Kafka), ECK's Elasticsearch and Kibana, the indexer Deployment; lists the agent pods
the scheduler could not place (Pending, PodScheduled=False, reason Unschedulable: e.g. more agents than GPUs);
and, once the memory has a ready pod, reads its fill from Redis (memory_fill.py) with a short deadline.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from typing import Any

from borg_operator import names
from borg_operator.apply import Applier
from borg_operator.builders import OWNED_KINDS
from borg_operator.memory_fill import FillReader
from borg_operator.spec import REDIS_PORT, CollectiveSpec, memory_host
from borg_operator.status import MissingApi, Observed
from borg_operator.tls import CA_FILE, CERT_FILE, KAFKA_TLS_KEYS, KEY_FILE
from borgdqn.memory.redis.acl import MONITOR, USERS

log = logging.getLogger(__name__)

ECK_ES = ("elasticsearch.k8s.elastic.co/v1", "Elasticsearch")
ECK_KIBANA = ("kibana.k8s.elastic.co/v1", "Kibana")
APPS = "apps/v1"


# The Strimzi Kafka the builders render (the one the status reads back).
STRIMZI_KAFKA = next((api_version, kind) for api_version, kind, _ in OWNED_KINDS
                     if kind == "Kafka" and api_version.startswith("kafka.strimzi.io/"))


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


def read_passwords(applier: Applier, namespace: str, cr: str) -> dict[str, str] | None:
    """The memory's users' passwords from the collective's Secret, by key (None: no Secret); keys that are not a
    user's, or whose value is not text, are left out."""
    secret = applier.get("v1", "Secret", namespace, names.redis_secret(cr))
    if secret is None:
        return None
    found = {}
    for user in USERS:
        encoded = (secret.get("data") or {}).get(user.secret_key)
        try:
            found[user.secret_key] = base64.b64decode(encoded or "", validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            continue
    return {key: value for key, value in found.items() if value}


def read_memory_tls(applier: Applier, namespace: str, cr: str) -> dict[str, str] | None:
    """The memory's CA, certificate and key from its TLS Secret (None: no Secret, or one that lacks a key)."""
    return _read_tls(applier, namespace, names.memory_tls_secret(cr), (CA_FILE, CERT_FILE, KEY_FILE))


def read_kafka_tls(applier: Applier, namespace: str, cr: str) -> dict[str, str] | None:
    """A managed Kafka's CA, keystore and client certificate from its TLS Secret (None: none, or incomplete)."""
    return _read_tls(applier, namespace, names.kafka_tls_secret(cr), KAFKA_TLS_KEYS)


def _read_tls(applier: Applier, namespace: str, name: str, keys: tuple[str, ...]) -> dict[str, str] | None:
    secret = applier.get("v1", "Secret", namespace, name)
    found = {}
    for key in keys:
        try:
            found[key] = base64.b64decode(((secret or {}).get("data") or {}).get(key) or "", validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None
    return found if all(found.values()) else None


def _ready_replicas(obj: dict[str, Any] | None) -> int:
    try:
        return int(((obj or {}).get("status") or {}).get("readyReplicas") or 0)
    except (TypeError, ValueError):
        return 0


def observe(applier: Applier, cr: str, namespace: str, spec: CollectiveSpec | None, *,
            missing: Sequence[MissingApi] = (),
            error: str | None = None, observed_generation: int | None = None,
            fills: FillReader | None = None) -> Observed:
    """What the status needs, read now. `spec` None (invalid): only the agents are read (their counts)."""
    agents = applier.get(APPS, "StatefulSet", namespace, names.agents(cr))
    unschedulable: list[str] = []
    if agents is not None and _ready_replicas(agents) < int((agents.get("spec") or {}).get("replicas") or 0):
        pods = applier.list("v1", "Pod", namespace, names.selector_string(cr)) or []
        unschedulable = unschedulable_messages(pods)
    parts: dict[str, Any] = {}
    if spec is not None:
        parts["memory"] = applier.get(APPS, "StatefulSet", namespace, names.memory(cr))
        if spec.kafka.mode == "managed":
            parts["kafka"] = applier.get(APPS, "StatefulSet", namespace, names.kafka(cr))
        elif spec.kafka.mode == "strimzi" and not missing:
            parts["kafka"] = applier.get(*STRIMZI_KAFKA, namespace, names.kafka(cr))
        if spec.elastic.mode == "eck" and not missing:
            parts["elasticsearch"] = applier.get(*ECK_ES, namespace, names.elasticsearch(cr))
            parts["kibana"] = applier.get(*ECK_KIBANA, namespace, names.kibana(cr))
            parts["indexer"] = applier.get(APPS, "Deployment", namespace, names.indexer(cr))
        if fills is not None and _ready_replicas(parts["memory"]) > 0:
            password = (read_passwords(applier, namespace, cr) or {}).get(MONITOR.secret_key)
            ca = (read_memory_tls(applier, namespace, cr) or {}).get(CA_FILE)
            fill, why = fills.read(memory_host(cr, namespace), REDIS_PORT, MONITOR.name, password, cr, ca)
            parts["memory_refused"] = fills.refusal(memory_host(cr, namespace), REDIS_PORT, cr)
            if fill is not None:
                parts["memory_fill"], parts["memory_links"] = fill.fill, fill.links
                parts["memory_finished"] = fill.finished
            if why is not None:
                log.debug("memory fill of %s/%s unknown: %s", namespace, cr, why)
    return Observed(agents=agents, unschedulable=unschedulable, missing=tuple(missing), error=error,
                    observed_generation=observed_generation, selector=names.selector_string(cr), **parts)
