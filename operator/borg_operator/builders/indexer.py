"""The indexer Deployment `<cr>-indexer` (Kafka -> Elasticsearch) and the Kibana setup Job `<cr>-kibana-setup`
(imports the dashboard). Both run the light memory image and exist only with ECK.

They log in as ECK's `elastic` user (its password is in the Secret ECK creates) and trust ECK's CA (the
public half of its HTTP certificates, also a Secret ECK creates); credentials reach borgdqn through the
environment variables it reads (BORG_ES_*, BORG_KIBANA_*), never through arguments.
"""

from __future__ import annotations

from typing import Any

from borg_operator import names
from borg_operator.builders.common import (
    Manifest,
    container_security_context,
    empty_dir,
    env,
    env_secret,
    guaranteed,
    metadata,
    pod_basics,
)
from borg_operator.builders.elastic import ES_PORT, KIBANA_PORT, kibana_enabled
from borg_operator.builders.kafka import KafkaClient
from borg_operator.spec import CollectiveSpec, kafka_bootstrap

ELASTIC_USER = "elastic"  # ECK's built-in superuser; its Secret's key is the user name
CA_DIR = "/etc/borg/ca"
CA_FILE = f"{CA_DIR}/ca.crt"
INDEXER_RESOURCES = ("500m", "512Mi")
SETUP_RESOURCES = ("100m", "256Mi")
SETUP_TIMEOUT_S = 900  # Kibana's first start (saved-objects migrations) can take minutes
SETUP_BACKOFF_LIMIT = 4
# A finished Job goes after a day; the next reconcile creates it again and it imports again, which is
# harmless (the import overwrites) and puts back a dashboard someone deleted.
SETUP_TTL_S = 86_400


def es_url(cr: str) -> str:
    # The short Service name is in ECK's certificate and resolves in the collective's namespace.
    return f"https://{names.es_http_service(cr)}:{ES_PORT}"


def kibana_url(cr: str) -> str:
    return f"https://{names.kibana_http_service(cr)}:{KIBANA_PORT}"


def _ca_volume(secret: str) -> dict[str, Any]:
    return {"name": "ca", "secret": {"secretName": secret, "items": [{"key": "ca.crt", "path": "ca.crt"}]}}


def _container(name: str, image: str, args: list[str], credentials: list[dict[str, Any]],
               resources: tuple[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["borgdqn"],  # replaces the memory image's entrypoint (which renders a redis.conf)
        "args": args,
        "env": credentials,
        "resources": guaranteed(*resources),
        "securityContext": container_security_context(),
        "volumeMounts": [{"name": "ca", "mountPath": CA_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }


def build_indexer_deployment(cr: str, namespace: str, spec: CollectiveSpec, kafka: KafkaClient) -> Manifest:
    # One replica of each index per extra Elasticsearch node (a single node cannot hold a replica).
    replicas = min(1, spec.elastic.count - 1)
    args = ["indexer", "--kafka", kafka_bootstrap(cr, namespace, spec.kafka), "--es", es_url(cr),
            "--ca-file", CA_FILE, "--group", f"{cr}-indexer", "--replicas", str(replicas), *kafka.args]
    credentials = [env("BORG_ES_USERNAME", ELASTIC_USER),
                   env_secret("BORG_ES_PASSWORD", names.es_elastic_user_secret(cr), ELASTIC_USER), *kafka.env]
    container = _container("indexer", spec.memory.image, args, credentials, INDEXER_RESOURCES)
    container["volumeMounts"] += kafka.mounts
    template_metadata: dict[str, Any] = {"labels": names.labels(cr, names.INDEXER)}
    if kafka.annotations:
        template_metadata["annotations"] = dict(kafka.annotations)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(cr, namespace, names.indexer(cr), names.INDEXER),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": names.selector_labels(cr, names.INDEXER)},
            "template": {
                "metadata": template_metadata,
                "spec": {
                    **pod_basics(),
                    # On SIGTERM it finishes the batches in flight and commits what Elasticsearch took.
                    "terminationGracePeriodSeconds": 60,
                    "containers": [container],
                    "volumes": [_ca_volume(names.es_http_ca_secret(cr)), empty_dir("tmp"), *kafka.volumes],
                },
            },
        },
    }


def build_kibana_setup_job(cr: str, namespace: str, spec: CollectiveSpec) -> Manifest:
    args = ["kibana-setup", "--kibana", kibana_url(cr), "--ca-file", CA_FILE, "--timeout", str(SETUP_TIMEOUT_S)]
    credentials = [env("BORG_KIBANA_USERNAME", ELASTIC_USER),
                   env_secret("BORG_KIBANA_PASSWORD", names.es_elastic_user_secret(cr), ELASTIC_USER)]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(cr, namespace, names.kibana_setup(cr), names.KIBANA_SETUP),
        "spec": {
            "backoffLimit": SETUP_BACKOFF_LIMIT,
            "ttlSecondsAfterFinished": SETUP_TTL_S,
            "template": {
                "metadata": {"labels": names.labels(cr, names.KIBANA_SETUP)},
                "spec": {
                    **pod_basics(),
                    # Never: each retry is a new pod, so the failed ones keep their logs for `kubectl logs`.
                    "restartPolicy": "Never",
                    "containers": [_container("kibana-setup", spec.memory.image, args, credentials,
                                              SETUP_RESOURCES)],
                    # Kibana's certificate comes from Kibana's own CA (ECK issues one per resource).
                    "volumes": [_ca_volume(names.kibana_http_ca_secret(cr)), empty_dir("tmp")],
                },
            },
        },
    }


def build_indexer(cr: str, namespace: str, spec: CollectiveSpec, kafka: KafkaClient) -> list[Manifest]:
    if spec.elastic.mode != "eck":
        return []
    children = [build_indexer_deployment(cr, namespace, spec, kafka)]
    if kibana_enabled(spec):
        children.append(build_kibana_setup_job(cr, namespace, spec))
    return children
