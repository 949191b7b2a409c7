"""Pure builders: a collective's spec -> the manifests of its children (dicts, no cluster access).

`build_children` renders the children the reconciler applies (server-side apply, with ownerReferences), in a
stable order; what a spec no longer renders (e.g. the Kafka StatefulSet after a switch to external mode) is
found through `OWNED_KINDS` and the instance labels (`names.instance_selector`) and pruned. `build_secrets`
renders the create-once Secrets apart (secrets.py): created when missing, never applied again nor pruned.
"""

from __future__ import annotations

from borg_operator import names
from borg_operator.builders.agents import build_agents
from borg_operator.builders.common import Manifest
from borg_operator.builders.config import build_config_map, config_checksum, config_yaml
from borg_operator.builders.elastic import build_elastic
from borg_operator.builders.indexer import build_indexer
from borg_operator.builders.kafka import build_kafka, kafka_client
from borg_operator.builders.memory import build_memory
from borg_operator.builders.network import build_network
from borg_operator.builders.secrets import Material, build_secrets, wants_kafka_tls
from borg_operator.spec import CollectiveSpec

__all__ = ["APPLIED_KINDS", "OWNED_KINDS", "Manifest", "Material", "build_children", "build_secrets", "children_kinds",
           "config_checksum", "config_yaml"]

# (apiVersion, kind, plural) of every kind a collective may own: for listing, pruning and RBAC.
OWNED_KINDS: tuple[tuple[str, str, str], ...] = (
    ("v1", "ConfigMap", "configmaps"),
    ("v1", "Secret", "secrets"),
    ("v1", "Service", "services"),
    ("apps/v1", "StatefulSet", "statefulsets"),
    ("apps/v1", "Deployment", "deployments"),
    ("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    ("batch/v1", "Job", "jobs"),
    ("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
    ("networking.k8s.io/v1", "Ingress", "ingresses"),
    ("kafka.strimzi.io/v1", "Kafka", "kafkas"),
    ("kafka.strimzi.io/v1", "KafkaNodePool", "kafkanodepools"),
    ("kafka.strimzi.io/v1", "KafkaUser", "kafkausers"),
    ("elasticsearch.k8s.elastic.co/v1", "Elasticsearch", "elasticsearches"),
    ("kibana.k8s.elastic.co/v1", "Kibana", "kibanas"),
)


# What the reconciler applies and prunes: every owned kind but the create-once Secrets (which it may not list).
APPLIED_KINDS: tuple[tuple[str, str], ...] = tuple(
    (api_version, kind) for api_version, kind, _ in OWNED_KINDS if kind != "Secret")


def children_kinds() -> list[tuple[str, str]]:
    """(apiVersion, kind) of every kind a collective may own."""
    return [(api_version, kind) for api_version, kind, _ in OWNED_KINDS]


def build_children(name: str, namespace: str, spec: CollectiveSpec, material: Material, *,
                   completed: bool = False) -> list[Manifest]:
    """Every applied child of the collective `namespace/name`, in a stable order: config, memory, kafka, elastic,
    indexer, agents, network. SpecError (one line) when the spec cannot work.

    `material` is what the create-once Secrets hold (build_secrets); the children take only its CAs (their
    pods' checksums roll them onto a new one). `completed`: every agent finished its budget
    (`status.completed`), so the agents have no pods.
    """
    names.check_name(name, eck=spec.elastic.mode == "eck", strimzi=spec.kafka.mode == "strimzi")
    if wants_kafka_tls(spec) and not material.kafka_ca:
        raise ValueError("a managed TLS Kafka needs its material (borg_operator.tls.make_kafka_tls)")
    client = kafka_client(name, spec.kafka, material.kafka_ca)
    config = config_yaml(name, namespace, spec)
    return [
        build_config_map(name, namespace, config),
        *build_memory(name, namespace, spec, material.memory_ca, client),
        *build_kafka(name, namespace, spec, material.kafka_ca),
        *build_elastic(name, namespace, spec),
        *build_indexer(name, namespace, spec, client),
        build_agents(name, namespace, spec, memory_ca=material.memory_ca, config=config, kafka=client,
                     completed=completed),
        *build_network(name, namespace, spec),
    ]
