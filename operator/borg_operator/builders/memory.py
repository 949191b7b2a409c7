"""The replay memory: StatefulSet `<cr>-memory` (Redis + the monitor sidecar), its Services and
PodDisruptionBudget. The pod runs the memory image (memory_image/, docs/memory-image.md); its passwords and
certificate are the create-once Secrets (builders/secrets.py)."""

from __future__ import annotations

from typing import Any

from kubernetes.utils.quantity import parse_quantity

from borg_operator import names
from borg_operator.builders.common import (
    Manifest,
    ca_checksum,
    claim_spec,
    container_security_context,
    empty_dir,
    env,
    guaranteed,
    memory_ca_volume,
    metadata,
    pod_basics,
    secret_volume,
)
from borg_operator.builders.kafka import KafkaClient
from borg_operator.builders.secrets import MEMORY_TLS_KEYS
from borg_operator.spec import MEMORY_CA_FILE, MEMORY_TLS_DIR, REDIS_PORT, CollectiveSpec, SpecError, kafka_bootstrap
from borgdqn.memory.redis.acl import MONITOR, USERS
from borgdqn.memory.redis.client import REDIS_USERNAME_ENV
from borgdqn.memory.redis.sizing import size_memory

PASSWORD_DIR = "/var/run/secrets/borg"  # the image's BORG_REDIS_USERS_DIR: a file per user, named by its key
MONITOR_PASSWORD_FILE = f"{PASSWORD_DIR}/{MONITOR.secret_key}"
DATA_DIR = "/data"  # the image's BORG_REDIS_DATA_DIR: the append-only file
CONF_DIR = "/run/borg"  # the image's BORG_REDIS_CONF lives here: the rendered config, password included
MONITOR_RESOURCES = ("250m", "256Mi")  # one reading every 10 s: a few pipelined round trips
# Redis answers PING with -LOADING while it replays the AOF, so the pod turns Ready only once the memory is
# whole. It asks as the read-only borg-monitor; the password goes to redis-cli in REDISCLI_AUTH, never as an
# argument (visible to `ps`).
READY_COMMAND = (f'test "$(REDISCLI_AUTH="$(cat {MONITOR_PASSWORD_FILE})" redis-cli --tls --cacert {MEMORY_CA_FILE} '
                 f'--user {MONITOR.name} -p {REDIS_PORT} ping)" = PONG')


ALIVE_COMMAND = (f'case "$(redis-cli --tls --cacert {MEMORY_CA_FILE} -p {REDIS_PORT} --no-auth-warning ping 2>&1)" '
                 'in PONG|*NOAUTH*|*LOADING*) exit 0;; *) exit 1;; esac')


def redis_maxmemory(spec: CollectiveSpec) -> int:
    """Redis' maxmemory for the spec's capacity: what the memory image's entrypoint computes from the same env."""
    return size_memory(spec.memory.capacity, spec.memory.chunk_length,
                       model_store_bytes=spec.memory.model_store_bytes).maxmemory


def _check_memory_limit(spec: CollectiveSpec) -> None:
    limit = parse_quantity(spec.memory.resources.memory)
    maxmemory = redis_maxmemory(spec)
    if limit <= maxmemory:
        raise SpecError(
            f"memory.resources.memory {spec.memory.resources.memory} is not above Redis' maxmemory of "
            f"{maxmemory / 2**30:.2f} GiB for memory.capacity {spec.memory.capacity} and memory.modelStoreBytes "
            f"{spec.memory.model_store_bytes}: give the pod 1.5-2x that (an append-only-file rewrite forks Redis), "
            "or lower the capacity")


def _redis_container(cr: str, spec: CollectiveSpec) -> dict[str, Any]:
    memory = spec.memory
    # The image's redis.conf turns the append-only file on; without persistence an argument turns it off
    # (arguments after the config file override it).
    args = ["redis-server"] if memory.persistence else ["redis-server", "--appendonly", "no"]
    return {
        "name": "redis",
        "image": memory.image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "env": [
            # The entrypoint sizes maxmemory from these with borgdqn.memory.redis.sizing (and logs how).
            env("BORG_MEMORY_CAPACITY", str(memory.capacity)),
            env("BORG_MEMORY_CHUNK_LENGTH", str(memory.chunk_length)),
            env("BORG_MEMORY_MODEL_STORE_BYTES", str(memory.model_store_bytes)),
            # The memory's users (borgdqn.memory.redis.acl), their passwords from the Secret's files; the keys
            # they may touch are this memory's (replay.redis_name is the collective's name).
            env("BORG_REDIS_USERS_DIR", PASSWORD_DIR),
            env("BORG_MEMORY_NAME", cr),
            # TLS only on the port: the passwords and the experience never cross the network in clear.
            env("BORG_REDIS_TLS_DIR", MEMORY_TLS_DIR),
        ],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"exec": {"command": ["sh", "-c", READY_COMMAND]},
                           "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
        # Alive while Redis answers a TLS client at all: -NOAUTH (no user given) or -LOADING (a large AOF loading)
        # count, so a slow but healthy start is not killed. (A bare TCP check would make Redis log a failed TLS
        # handshake every period.)
        "livenessProbe": {"exec": {"command": ["sh", "-c", ALIVE_COMMAND]}, "initialDelaySeconds": 10,
                          "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 6},
        "resources": guaranteed(memory.resources.cpu, memory.resources.memory),
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "data", "mountPath": DATA_DIR},
            {"name": "conf", "mountPath": CONF_DIR},
            {"name": "redis-users", "mountPath": PASSWORD_DIR, "readOnly": True},
            {"name": "memory-tls", "mountPath": MEMORY_TLS_DIR, "readOnly": True},
        ],
    }


def _monitor_container(cr: str, namespace: str, spec: CollectiveSpec, kafka: KafkaClient) -> dict[str, Any]:
    return {
        "name": "monitor",
        "image": spec.memory.image,
        "imagePullPolicy": "IfNotPresent",
        # `command` replaces the image's entrypoint, which would render a redis.conf.
        "command": ["borgdqn"],
        "args": ["memory-monitor", "--memory", f"rediss://127.0.0.1:{REDIS_PORT}/0", "--ca-file", MEMORY_CA_FILE,
                 "--name", cr,
                 "--password-file", MONITOR_PASSWORD_FILE, "--kafka", kafka_bootstrap(cr, namespace, spec.kafka),
                 "--collective", cr, *kafka.args],
        "env": [env(REDIS_USERNAME_ENV, MONITOR.name), *kafka.env],  # read-only: it may not write a key
        "resources": guaranteed(*MONITOR_RESOURCES),
        "securityContext": container_security_context(),
        # Its own password only: the sidecar never holds the agents' or the administrator's.
        "volumeMounts": [{"name": "redis-monitor", "mountPath": PASSWORD_DIR, "readOnly": True},
                         {"name": "memory-ca", "mountPath": MEMORY_TLS_DIR, "readOnly": True}, *kafka.mounts],
    }


def build_memory_statefulset(cr: str, namespace: str, spec: CollectiveSpec, memory_ca: str,
                             kafka: KafkaClient) -> Manifest:  # fmt: skip
    _check_memory_limit(spec)
    memory = spec.memory
    volumes: list[dict[str, Any]] = [
        secret_volume("redis-users", names.redis_secret(cr), tuple(user.secret_key for user in USERS)),
        secret_volume("redis-monitor", names.redis_secret(cr), (MONITOR.secret_key,)),
        secret_volume("memory-tls", names.memory_tls_secret(cr), MEMORY_TLS_KEYS),
        memory_ca_volume(cr),
        # Memory-backed: the rendered config holds the password, which so never touches a disk.
        empty_dir("conf", memory=True, size_limit="1Mi"),
        *kafka.volumes,
    ]
    sts_spec: dict[str, Any] = {
        "serviceName": names.memory_headless(cr),
        "replicas": 1,  # one Redis holds the one pool every agent shares
        "selector": {"matchLabels": names.selector_labels(cr, names.MEMORY)},
        # The PVC outlives the StatefulSet (and the collective): hours of experience are not deleted with an
        # object; a collective re-created under the same name picks its memory up again.
        "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
        "template": {
            "metadata": {"labels": names.labels(cr, names.MEMORY),
                         "annotations": {names.MEMORY_CA_ANNOTATION: ca_checksum(memory_ca), **kafka.annotations}},
            "spec": {
                **pod_basics(),
                # On SIGTERM Redis fsyncs the append-only file and exits; a large one needs more than 30 s.
                "terminationGracePeriodSeconds": 60,
                "containers": [_redis_container(cr, spec), _monitor_container(cr, namespace, spec, kafka)],
                "volumes": volumes,
            },
        },
    }
    if memory.persistence:
        sts_spec["volumeClaimTemplates"] = [
            {"metadata": {"name": "data", "labels": names.labels(cr, names.MEMORY)},
             "spec": claim_spec(memory.storage)}]
    else:
        volumes.append(empty_dir("data"))
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(cr, namespace, names.memory(cr), names.MEMORY),
        "spec": sts_spec,
    }


def _service(cr: str, namespace: str, name: str, *, headless: bool) -> Manifest:
    spec: dict[str, Any] = {
        "selector": names.selector_labels(cr, names.MEMORY),
        "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}],
    }
    if headless:
        # The StatefulSet's governing Service: a stable DNS name for the pod, also while it is not Ready.
        spec.update({"clusterIP": "None", "publishNotReadyAddresses": True})
    else:
        spec["type"] = "ClusterIP"
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": metadata(cr, namespace, name, names.MEMORY), "spec": spec}


def build_memory_services(cr: str, namespace: str) -> list[Manifest]:
    """Headless `<cr>-memory-headless` (the StatefulSet's) and `<cr>-memory`, the address agents use."""
    return [_service(cr, namespace, names.memory_headless(cr), headless=True),
            _service(cr, namespace, names.memory(cr), headless=False)]


def build_memory_pdb(cr: str, namespace: str) -> Manifest:
    """No voluntary eviction of the one memory pod (a node drain waits for a person to move it).

    maxUnavailable 0 rather than minAvailable 1: the same for one replica, but it says the intent (never take
    it away) and stays right whatever the replica count. A drain that evicted it would cost every agent its
    pool for the restart (and, without persistence, the pool itself). unhealthyPodEvictionPolicy AlwaysAllow:
    a memory pod that is not Ready anyway (crash-looping) must not block a drain.
    """
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(cr, namespace, names.memory(cr), names.MEMORY),
        "spec": {"maxUnavailable": 0, "selector": {"matchLabels": names.selector_labels(cr, names.MEMORY)},
                 "unhealthyPodEvictionPolicy": "AlwaysAllow"},
    }


def build_memory(cr: str, namespace: str, spec: CollectiveSpec, memory_ca: str, kafka: KafkaClient) -> list[Manifest]:
    return [build_memory_statefulset(cr, namespace, spec, memory_ca, kafka),
            *build_memory_services(cr, namespace), build_memory_pdb(cr, namespace)]
