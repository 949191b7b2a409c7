"""Telemetry transport. managed: a KRaft StatefulSet `<cr>-kafka` of the apache/kafka image (each node broker
and controller) with its Services; with TLS (the default) its clients and brokers meet on one listener that wants
a client certificate (the Secret `<cr>-kafka-tls`, builders/secrets.py); strimzi: a Strimzi `Kafka`
`<cr>-kafka` with one KafkaNodePool; external: nothing (the spec names the bootstrap servers and the Secrets
that reach them). `kafka_client`: what every pod that talks to Kafka mounts and is told, whichever the mode."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any

from borg_operator import names
from borg_operator.builders.common import (
    Manifest,
    ca_checksum,
    claim_spec,
    container_security_context,
    empty_dir,
    env,
    env_field,
    env_secret,
    guaranteed,
    metadata,
    pod_security_context,
    secret_volume,
)
from borg_operator.spec import (
    KAFKA_CLIENT_TLS_DIR,
    KAFKA_PORT,
    STRIMZI_TLS_PORT,
    CollectiveSpec,
    KafkaSpec,
    kafka_client_files,
)
from borg_operator.tls import (
    CA_FILE,
    CERT_FILE,
    CLIENT_CERT_FILE,
    CLIENT_KEY_FILE,
    KEY_FILE,
    KEYSTORE_FILE,
)
from borgdqn.telemetry.kafka_access import KAFKA_PASSWORD_ENV, KAFKA_USERNAME_ENV

CONTROLLER_PORT = 9093
DATA_DIR = "/var/lib/kafka/data"
BROKER_TLS_DIR = "/etc/kafka/tls"
# The one listener of clients and brokers (named for what it serves; the controllers keep their own).
CLIENT_LISTENER = "CLIENT"
KAFKA_UID = 1000  # `appuser` of the apache/kafka image
KAFKA_RESOURCES = ("1", "2Gi")  # telemetry is a few hundred small events per second at most
KAFKA_HEAP = "-Xms1g -Xmx1g"  # half the container, the rest for the page cache and the JVM itself
# Strimzi 1.x serves kafka.strimzi.io/v1 only (v1beta2 ended with 0.5x; v1 exists since 0.49), so v1 works
# with every Strimzi that still gets fixes.
STRIMZI_API = "kafka.strimzi.io/v1"
STRIMZI_CLUSTER_LABEL = "strimzi.io/cluster"


def cluster_id(cr: str, namespace: str) -> str:
    """A KRaft cluster id (16 bytes, URL-safe base64) derived from the collective, so every render is the same.

    Never with a leading '-', which Kafka's storage tool would take for an option.
    """
    text = base64.urlsafe_b64encode(hashlib.sha256(f"{namespace}/{cr}".encode()).digest()[:16]).decode()
    text = text.rstrip("=")
    return "A" + text[1:] if text.startswith("-") else text


def _replication(spec: CollectiveSpec) -> tuple[int, int]:
    """(replication factor, min in-sync replicas) for the brokers there are."""
    factor = min(3, spec.kafka.replicas)
    return factor, max(1, factor - 1)


def _voters(cr: str, namespace: str, replicas: int) -> str:
    pods = [f"{names.kafka(cr)}-{i}.{names.kafka_headless(cr)}.{namespace}.svc" for i in range(replicas)]
    return ",".join(f"{i}@{host}:{CONTROLLER_PORT}" for i, host in enumerate(pods))


def _listener_env(host: str, kafka: KafkaSpec) -> list[dict[str, Any]]:
    """The listeners: CLIENT for clients and between brokers (TLS with a client certificate, or plaintext where
    the spec turns TLS off), CONTROLLER for the quorum (reachable from the Kafka pods only: network.py)."""
    protocol = "SSL" if kafka.secured else "PLAINTEXT"
    out = [
        env("KAFKA_LISTENERS", f"{CLIENT_LISTENER}://:{KAFKA_PORT},CONTROLLER://:{CONTROLLER_PORT}"),
        env("KAFKA_ADVERTISED_LISTENERS", f"{CLIENT_LISTENER}://{host}:{KAFKA_PORT}"),
        env("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER"),
        env("KAFKA_INTER_BROKER_LISTENER_NAME", CLIENT_LISTENER),
        env("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", f"{CLIENT_LISTENER}:{protocol},CONTROLLER:PLAINTEXT"),
    ]
    if kafka.secured:
        prefix = f"KAFKA_LISTENER_NAME_{CLIENT_LISTENER}_SSL_"
        out += [
            env(f"{prefix}CLIENT_AUTH", "required"),  # no certificate of this CA, no connection
            env(f"{prefix}KEYSTORE_TYPE", "PEM"),
            env(f"{prefix}KEYSTORE_LOCATION", f"{BROKER_TLS_DIR}/{KEYSTORE_FILE}"),
            env(f"{prefix}TRUSTSTORE_TYPE", "PEM"),
            env(f"{prefix}TRUSTSTORE_LOCATION", f"{BROKER_TLS_DIR}/{CA_FILE}"),
        ]
    return out


def _kafka_container(cr: str, namespace: str, spec: CollectiveSpec) -> dict[str, Any]:
    kafka = spec.kafka
    factor, min_isr = _replication(spec)
    host = f"$(POD_NAME).{names.kafka_headless(cr)}.{namespace}.svc"
    mounts: list[dict[str, Any]] = [
        {"name": "data", "mountPath": DATA_DIR},
        # The image writes its generated server.properties and log4j files here at every start.
        {"name": "config", "mountPath": "/opt/kafka/config"},
        {"name": "logs", "mountPath": "/opt/kafka/logs"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if kafka.secured:
        mounts.append({"name": "kafka-tls", "mountPath": BROKER_TLS_DIR, "readOnly": True})
    return {
        "name": "kafka",
        "image": kafka.image,
        "imagePullPolicy": "IfNotPresent",
        # The image turns KAFKA_FOO_BAR into foo.bar in server.properties (and formats the storage with
        # CLUSTER_ID on first start).
        "env": [
            env_field("POD_NAME", "metadata.name"),
            # The StatefulSet's pod index (a label since Kubernetes 1.28): node ids 0..replicas-1, as the
            # static voter list below expects.
            env_field("KAFKA_NODE_ID", "metadata.labels['apps.kubernetes.io/pod-index']"),
            env("CLUSTER_ID", cluster_id(cr, namespace)),
            env("KAFKA_PROCESS_ROLES", "broker,controller"),
            env("KAFKA_CONTROLLER_QUORUM_VOTERS", _voters(cr, namespace, kafka.replicas)),
            *_listener_env(host, kafka),
            env("KAFKA_LOG_DIRS", DATA_DIR),
            env("KAFKA_LOG_RETENTION_HOURS", str(kafka.retention_hours)),
            env("KAFKA_DEFAULT_REPLICATION_FACTOR", str(factor)),
            env("KAFKA_MIN_INSYNC_REPLICAS", str(min_isr)),
            env("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", str(factor)),
            env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", str(factor)),
            env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", str(min_isr)),
            # The JVM's heap (kafka-run-class.sh reads it; the image also copies it into server.properties as
            # heap.opts, which the broker ignores with a warning).
            env("KAFKA_HEAP_OPTS", KAFKA_HEAP),
        ],
        "ports": [{"name": "kafka", "containerPort": KAFKA_PORT, "protocol": "TCP"},
                  {"name": "controller", "containerPort": CONTROLLER_PORT, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": "kafka"}, "periodSeconds": 10, "timeoutSeconds": 3},
        "livenessProbe": {"tcpSocket": {"port": "controller"}, "initialDelaySeconds": 30,
                          "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 6},
        "resources": guaranteed(*KAFKA_RESOURCES),
        "securityContext": container_security_context(KAFKA_UID),
        "volumeMounts": mounts,
    }


def build_managed_statefulset(cr: str, namespace: str, spec: CollectiveSpec, kafka_ca: str = "") -> Manifest:
    kafka = spec.kafka
    volumes = [empty_dir("config"), empty_dir("logs"), empty_dir("tmp")]
    template_metadata: dict[str, Any] = {"labels": names.labels(cr, names.KAFKA)}
    if kafka.secured:
        # The brokers' own key and the CA they check clients against; not the clients' key.
        volumes.append(secret_volume("kafka-tls", names.kafka_tls_secret(cr), (CA_FILE, KEYSTORE_FILE)))
        template_metadata["annotations"] = {names.KAFKA_CA_ANNOTATION: ca_checksum(kafka_ca)}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(cr, namespace, names.kafka(cr), names.KAFKA),
        "spec": {
            "serviceName": names.kafka_headless(cr),
            "replicas": kafka.replicas,
            # Parallel: a KRaft node becomes Ready only once the quorum stands, so OrderedReady would wait for
            # pod 0 forever while pods 1.. (its fellow voters) are never started.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": names.selector_labels(cr, names.KAFKA)},
            "template": {
                "metadata": template_metadata,
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": pod_security_context(KAFKA_UID),
                    "terminationGracePeriodSeconds": 60,  # a clean shutdown spares a log recovery on start
                    "containers": [_kafka_container(cr, namespace, spec)],
                    "volumes": volumes,
                },
            },
            "volumeClaimTemplates": [
                {"metadata": {"name": "data", "labels": names.labels(cr, names.KAFKA)},
                 "spec": claim_spec(kafka.storage)}],
        },
    }


def build_managed_services(cr: str, namespace: str) -> list[Manifest]:
    selector = names.selector_labels(cr, names.KAFKA)
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(cr, namespace, names.kafka_headless(cr), names.KAFKA),
        # Every node's own DNS name (its advertised listener and quorum address), also before it is Ready:
        # the voters must find each other to become Ready at all.
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": selector,
                 "ports": [{"name": "kafka", "port": KAFKA_PORT, "targetPort": "kafka", "protocol": "TCP"},
                           {"name": "controller", "port": CONTROLLER_PORT, "targetPort": "controller",
                            "protocol": "TCP"}]},
    }
    client = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(cr, namespace, names.kafka(cr), names.KAFKA),
        "spec": {"type": "ClusterIP", "selector": selector,
                 "ports": [{"name": "kafka", "port": KAFKA_PORT, "targetPort": "kafka", "protocol": "TCP"}]},
    }
    return [headless, client]


def kafka_client_peers(cr: str) -> list[dict[str, Any]]:
    """The pods that talk to Kafka: producers (agents, the memory pod's monitor) and the indexer."""
    return [{"podSelector": {"matchLabels": names.selector_labels(cr, component)}}
            for component in (names.AGENT, names.MEMORY, names.INDEXER)]


def build_strimzi(cr: str, namespace: str, spec: CollectiveSpec) -> list[Manifest]:
    kafka = spec.kafka
    factor, min_isr = _replication(spec)
    volume: dict[str, Any] = {"id": 0, "type": "persistent-claim", "size": kafka.storage.size,
                              "deleteClaim": False, "kraftMetadata": "shared"}
    if kafka.storage.storage_class_name:
        volume["class"] = kafka.storage.storage_class_name
    # Strimzi >= 0.46 runs KRaft with node pools only and ignores these; older ones need them. Free to keep.
    annotations = {"strimzi.io/kraft": "enabled", "strimzi.io/node-pools": "enabled"}
    cluster: Manifest = {
        "apiVersion": STRIMZI_API,
        "kind": "Kafka",
        "metadata": metadata(cr, namespace, names.kafka(cr), names.KAFKA, annotations),
        "spec": {
            "kafka": {
                "version": kafka.version,
                # networkPolicyPeers: Strimzi writes the listener's NetworkPolicy itself (and would open it to
                # everyone without peers); ours for a managed Kafka says the same.
                "listeners": [_strimzi_listener(cr, kafka)],
                "config": {
                    "log.retention.hours": kafka.retention_hours,
                    "default.replication.factor": factor,
                    "min.insync.replicas": min_isr,
                    "offsets.topic.replication.factor": factor,
                    "transaction.state.log.replication.factor": factor,
                    "transaction.state.log.min.isr": min_isr,
                },
            },
        },
    }
    if kafka.secured:
        # Strimzi's User Operator turns the KafkaUser below into a Secret with its certificate.
        cluster["spec"]["entityOperator"] = {"userOperator": {}}
    pool_labels = {**names.labels(cr, names.KAFKA), STRIMZI_CLUSTER_LABEL: names.kafka(cr)}
    pool = {
        "apiVersion": STRIMZI_API,
        "kind": "KafkaNodePool",
        "metadata": {**metadata(cr, namespace, names.kafka_node_pool(cr), names.KAFKA), "labels": pool_labels},
        "spec": {"replicas": kafka.replicas, "roles": ["controller", "broker"],
                 "storage": {"type": "jbod", "volumes": [volume]}},
    }
    if not kafka.secured:
        return [cluster, pool]
    user = {
        "apiVersion": STRIMZI_API,
        "kind": "KafkaUser",
        "metadata": {**metadata(cr, namespace, names.kafka_user(cr), names.KAFKA), "labels": pool_labels},
        # Strimzi signs a certificate (CN = the user's name) with its clients CA into the Secret of that name.
        "spec": {"authentication": {"type": "tls"}},
    }
    return [cluster, pool, user]


def _strimzi_listener(cr: str, kafka: KafkaSpec) -> dict[str, Any]:
    """With TLS (the default): Strimzi's `tls` listener that wants a certificate of its clients CA; else `plain`."""
    if kafka.secured:
        return {"name": "tls", "port": STRIMZI_TLS_PORT, "type": "internal", "tls": True,
                "authentication": {"type": "tls"}, "networkPolicyPeers": kafka_client_peers(cr)}
    return {"name": "plain", "port": KAFKA_PORT, "type": "internal", "tls": False,
            "networkPolicyPeers": kafka_client_peers(cr)}


@dataclass(frozen=True)
class KafkaClient:
    """What a pod that talks to Kafka (an agent, the memory's monitor, the indexer) adds to its spec: the volume
    of Kafka's CA and the client's certificate and key, each where the pod is told (spec.kafka_client_files),
    from the operator's Secret or the external Secrets; an external Kafka's SCRAM login as env from its Secret
    (never in the config or the arguments); the memory monitor's and indexer's flags; and the CA's checksum on
    the pod template, so that a new CA rolls the pods."""

    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    env: list[dict[str, Any]] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)


def kafka_client(cr: str, kafka: KafkaSpec, kafka_ca: str = "") -> KafkaClient:
    """``kafka_ca``: a managed TLS Kafka's CA certificate (PEM)."""
    if not kafka.secured:
        return KafkaClient()
    sources: list[dict[str, Any]] = []

    def take(secret: str, keys: dict[str, str]) -> None:
        sources.append({"secret": {"name": secret, "items": [{"key": key, "path": path}
                                                             for key, path in keys.items()]}})

    if kafka.mode == "managed":
        take(names.kafka_tls_secret(cr), {CA_FILE: CA_FILE, CLIENT_CERT_FILE: CLIENT_CERT_FILE,
                                          CLIENT_KEY_FILE: CLIENT_KEY_FILE})
    if kafka.mode == "strimzi":  # the Secrets Strimzi writes: its cluster CA's, and the KafkaUser's
        take(names.strimzi_cluster_ca_cert(cr), {CA_FILE: CA_FILE})
        take(names.kafka_user(cr), {"user.crt": CLIENT_CERT_FILE, "user.key": CLIENT_KEY_FILE})
    if kafka.ca_secret:
        take(kafka.ca_secret, {CA_FILE: CA_FILE})
    if kafka.client_cert_secret:
        take(kafka.client_cert_secret, {CERT_FILE: CLIENT_CERT_FILE, KEY_FILE: CLIENT_KEY_FILE})
    login = [env_secret(KAFKA_USERNAME_ENV, kafka.login_secret, "username"),
             env_secret(KAFKA_PASSWORD_ENV, kafka.login_secret, "password")] if kafka.login_secret else []
    files = kafka_client_files(kafka)
    flags = {"kafka_ca_file": "--kafka-ca-file", "kafka_cert_file": "--kafka-cert-file",
             "kafka_key_file": "--kafka-key-file"}
    args = ["--kafka-tls", *[arg for key, flag in flags.items() if files[key] for arg in (flag, str(files[key]))]]
    return KafkaClient(
        volumes=[{"name": "kafka-client", "projected": {"defaultMode": 0o400, "sources": sources}}] if sources else [],
        mounts=[{"name": "kafka-client", "mountPath": KAFKA_CLIENT_TLS_DIR, "readOnly": True}] if sources else [],
        env=login, args=args,
        annotations={names.KAFKA_CA_ANNOTATION: ca_checksum(kafka_ca)} if kafka.mode == "managed" else {})


def build_kafka(cr: str, namespace: str, spec: CollectiveSpec, kafka_ca: str) -> list[Manifest]:
    """`kafka_ca`: a managed TLS Kafka's CA certificate (its Secret is builders/secrets.py's), else empty."""
    if spec.kafka.mode == "managed":
        return [build_managed_statefulset(cr, namespace, spec, kafka_ca), *build_managed_services(cr, namespace)]
    if spec.kafka.mode == "strimzi":
        return build_strimzi(cr, namespace, spec)
    return []  # external: the spec's bootstrapServers
