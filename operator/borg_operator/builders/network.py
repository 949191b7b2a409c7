"""NetworkPolicies: who may reach the memory's Redis and a managed Kafka (ingress only; nothing else changes).

A pod selected by a policy takes only what some policy allows; traffic inside a pod (the monitor to Redis on
127.0.0.1) never meets a policy. For a Strimzi Kafka the listener's `networkPolicyPeers` say the same (see
kafka.py): Strimzi writes that policy itself.
"""

from __future__ import annotations

from typing import Any

from borg_operator import names
from borg_operator.builders.common import Manifest, metadata
from borg_operator.builders.kafka import CONTROLLER_PORT, kafka_client_peers
from borg_operator.spec import KAFKA_PORT, REDIS_PORT, CollectiveSpec


def _pods(cr: str, component: str) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": names.selector_labels(cr, component)}}


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def build_memory_policy(cr: str, namespace: str) -> Manifest:
    operator = {  # the operator reads the memory's stats for the status (`memory.fill`), from its namespace
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {names.LABEL_NAME: names.OPERATOR_APP}},
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(cr, namespace, names.memory(cr), names.MEMORY),
        "spec": {
            "podSelector": {"matchLabels": names.selector_labels(cr, names.MEMORY)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [_pods(cr, names.AGENT), _pods(cr, names.MEMORY), operator],
                         "ports": _tcp(REDIS_PORT)}],
        },
    }


def build_kafka_policy(cr: str, namespace: str) -> Manifest:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(cr, namespace, names.kafka(cr), names.KAFKA),
        "spec": {
            "podSelector": {"matchLabels": names.selector_labels(cr, names.KAFKA)},
            "policyTypes": ["Ingress"],
            "ingress": [
                # The nodes among themselves: replication and the KRaft quorum.
                {"from": [_pods(cr, names.KAFKA)], "ports": _tcp(KAFKA_PORT, CONTROLLER_PORT)},
                {"from": kafka_client_peers(cr), "ports": _tcp(KAFKA_PORT)},
            ],
        },
    }


def build_network(cr: str, namespace: str, spec: CollectiveSpec) -> list[Manifest]:
    policies = [build_memory_policy(cr, namespace)]
    if spec.kafka.mode == "managed":
        policies.append(build_kafka_policy(cr, namespace))
    return policies
