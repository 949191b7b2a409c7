"""Pieces every builder shares: object metadata, the hardened security contexts, small env helpers."""

from __future__ import annotations

import hashlib
from typing import Any

from borg_operator import names
from borg_operator.spec import StorageSpec
from borg_operator.tls import CA_FILE

Manifest = dict[str, Any]

# The UID/GID of the borgdqn images (memory_image/Dockerfile; the agent image follows it).
BORG_UID = 10001


def metadata(cr: str, namespace: str, name: str, component: str,
             annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": names.labels(cr, component)}
    if annotations:
        meta["annotations"] = annotations
    return meta


def pod_security_context(uid: int = BORG_UID) -> dict[str, Any]:
    # fsGroup: the non-root user may write the volumes it gets (PVCs, emptyDirs); OnRootMismatch spares a
    # recursive chown of a large volume (a full AOF, Kafka logs) on every start.
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(uid: int = BORG_UID) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_basics() -> dict[str, Any]:
    """Pod spec fields every child pod gets.

    No service-account token: no borgdqn process talks to the Kubernetes API, so a token would only be
    something to steal. No service links: Kubernetes would inject `<SERVICE>_PORT...` variables for every
    Service in the namespace, and for a collective named e.g. `borg` those would start with `BORG_`, the prefix
    borgdqn reads its settings from.
    """
    return {"automountServiceAccountToken": False, "enableServiceLinks": False,
            "securityContext": pod_security_context()}


def guaranteed(cpu: str, memory: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    """requests == limits: the Guaranteed QoS class, so a busy node neither throttles nor evicts it first."""
    amounts = {"cpu": cpu, "memory": memory, **(extra or {})}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def env_field(name: str, field_path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def env_secret(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def secret_volume(name: str, secret: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A volume of some keys of a Secret, a file each (named as the key), readable by the owner only."""
    items = [{"key": key, "path": key} for key in keys]
    return {"name": name, "secret": {"secretName": secret, "defaultMode": 0o400, "items": items}}


def ca_checksum(ca: str) -> str:
    """What a pod template carries of a CA certificate, so that a new one rolls the pods."""
    return hashlib.sha256(ca.encode()).hexdigest()


def memory_ca_volume(cr: str) -> dict[str, Any]:
    """The memory's CA certificate only (not its key): what every client of the memory verifies it with."""
    return secret_volume("memory-ca", names.memory_tls_secret(cr), (CA_FILE,))


def empty_dir(name: str, *, memory: bool = False, size_limit: str | None = None) -> dict[str, Any]:
    source: dict[str, Any] = {}
    if memory:
        source["medium"] = "Memory"
    if size_limit:
        source["sizeLimit"] = size_limit
    return {"name": name, "emptyDir": source}


def claim_spec(storage: StorageSpec) -> dict[str, Any]:
    """A ReadWriteOnce PersistentVolumeClaim spec (no storage class: the cluster's default)."""
    claim: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": storage.size}}}
    if storage.storage_class_name:
        claim["storageClassName"] = storage.storage_class_name
    return claim
