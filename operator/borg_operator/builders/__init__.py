"""Pure builders: a collective's spec -> the manifests of its children (dicts, no cluster access).

`build_children` renders all of them in a stable order; the reconciler adds ownerReferences and applies them
(server-side apply). What a spec does not render (e.g. the Kafka StatefulSet after a switch to external mode)
is found through `OWNED_KINDS` and the instance labels (`names.instance_selector`).
"""

from __future__ import annotations

from collections.abc import Mapping

from borg_operator import names
from borg_operator.builders.agents import build_agents
from borg_operator.builders.common import Manifest
from borg_operator.builders.config import build_config_map, config_checksum, config_yaml
from borg_operator.builders.elastic import build_elastic
from borg_operator.builders.indexer import build_indexer
from borg_operator.builders.kafka import build_kafka, kafka_client
from borg_operator.builders.memory import build_memory, build_redis_secret
from borg_operator.builders.network import build_network
from borg_operator.spec import CollectiveSpec
from borg_operator.tls import CA_FILE

__all__ = ["OWNED_KINDS", "Manifest", "build_children", "children_kinds", "config_checksum", "config_yaml"]

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


def children_kinds() -> list[tuple[str, str]]:
    """(apiVersion, kind) of every kind a collective may own."""
    return [(api_version, kind) for api_version, kind, _ in OWNED_KINDS]


def build_children(name: str, namespace: str, spec: CollectiveSpec, *, redis_passwords: Mapping[str, str],
                   memory_tls: Mapping[str, str], kafka_tls: Mapping[str, str] | None = None,
                   completed: bool = False) -> list[Manifest]:
    """Every child of the collective `namespace/name`, in a stable order: config, secret, memory, kafka, elastic,
    indexer, agents, network. SpecError (one line) when the spec cannot work.

    `redis_passwords` are the existing Secret's passwords of the memory's Redis users, by key (the reconciler
    reads them first and generates them only when there is no Secret), `memory_tls` the memory's CA, certificate
    and key (borg_operator.tls, likewise), `kafka_tls` a managed TLS Kafka's (make_kafka_tls; needed when the
    spec has one): the builders never invent one, so rendering twice gives the same objects. `completed`: every
    agent finished its budget (`status.completed`), so the agents have no pods.
    """
    names.check_name(name, eck=spec.elastic.mode == "eck", strimzi=spec.kafka.mode == "strimzi")
    kafka_tls = kafka_tls or {}
    if spec.kafka.mode == "managed" and spec.kafka.secured and not kafka_tls.get(CA_FILE):
        raise ValueError("a managed TLS Kafka needs its material (borg_operator.tls.make_kafka_tls)")
    client = kafka_client(name, spec.kafka, kafka_tls.get(CA_FILE, ""))
    config = config_yaml(name, namespace, spec)
    return [
        build_config_map(name, namespace, config),
        build_redis_secret(name, namespace, redis_passwords),
        *build_memory(name, namespace, spec, memory_tls, client),
        *build_kafka(name, namespace, spec, kafka_tls),
        *build_elastic(name, namespace, spec),
        *build_indexer(name, namespace, spec, client),
        build_agents(name, namespace, spec, memory_ca=memory_tls[CA_FILE], config=config, kafka=client,
                     completed=completed),
        *build_network(name, namespace, spec),
    ]
