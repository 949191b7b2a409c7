"""The collective's create-once Secrets, built apart from its applied children: `<cr>-redis` (the memory's Redis
users' passwords), `<cr>-memory-tls` (the memory's CA and certificate) and, for a managed TLS Kafka,
`<cr>-kafka-tls` (its CA, broker keystore and client certificate).

The reconciler creates each one when it is missing and never applies, prunes nor lists them (the operator may
only get and create Secrets). All three are immutable: the apiserver itself refuses to change them, so no
reconcile can rotate a password or a CA by accident and lock the pods out of a memory that outlives them.
`Material` is what they hold; the children take only its public half (the CAs their pods verify with).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field

from borg_operator import names
from borg_operator.builders.common import Manifest, metadata
from borg_operator.spec import CollectiveSpec
from borg_operator.tls import CA_FILE, CERT_FILE, KAFKA_TLS_KEYS, KEY_FILE
from borgdqn.memory.redis.acl import USERS

MEMORY_TLS_KEYS = (CA_FILE, CERT_FILE, KEY_FILE)


@dataclass(frozen=True)
class Material:
    """What the create-once Secrets hold, by key: the memory's users' passwords, the memory's TLS
    (borg_operator.tls.make_memory_tls) and a managed TLS Kafka's (make_kafka_tls; empty when the spec has none).
    The builders never invent it, so rendering twice gives the same objects."""

    passwords: Mapping[str, str] = field(repr=False)
    memory_tls: Mapping[str, str] = field(repr=False)
    kafka_tls: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def memory_ca(self) -> str:
        return self.memory_tls.get(CA_FILE, "")

    @property
    def kafka_ca(self) -> str:
        return self.kafka_tls.get(CA_FILE, "")


def wants_kafka_tls(spec: CollectiveSpec) -> bool:
    """Whether the collective has a Kafka TLS Secret of its own: a managed Kafka with TLS (the default)."""
    return spec.kafka.mode == "managed" and spec.kafka.secured


def build_redis_secret(cr: str, namespace: str, passwords: Mapping[str, str]) -> Manifest:
    """The memory's Redis users' passwords, a key each (borgdqn.memory.redis.acl.USERS)."""
    for user in USERS:
        password = passwords.get(user.secret_key, "")
        if not password or any(ord(c) < 0x20 or ord(c) == 0x7F for c in password):
            # The memory image refuses both (a control character is usually a stray newline); fail here instead.
            raise ValueError(f"the Redis password {user.secret_key} must be non-empty printable text")
    return _immutable_secret(cr, namespace, names.redis_secret(cr), names.MEMORY,
                             {user.secret_key: passwords[user.secret_key] for user in USERS})


def build_memory_tls_secret(cr: str, namespace: str, material: Mapping[str, str]) -> Manifest:
    """The memory's CA certificate, server certificate and key."""
    return _complete_secret(cr, namespace, names.memory_tls_secret(cr), names.MEMORY, material, MEMORY_TLS_KEYS)


def build_kafka_tls_secret(cr: str, namespace: str, material: Mapping[str, str]) -> Manifest:
    """A managed Kafka's CA, broker keystore and client certificate."""
    return _complete_secret(cr, namespace, names.kafka_tls_secret(cr), names.KAFKA, material, KAFKA_TLS_KEYS)


def _complete_secret(cr: str, namespace: str, name: str, component: str, material: Mapping[str, str],
                     keys: tuple[str, ...]) -> Manifest:
    missing = [key for key in keys if not material.get(key)]
    if missing:
        raise ValueError(f"the Secret {name} needs its material ({', '.join(missing)})")
    return _immutable_secret(cr, namespace, name, component, {key: material[key] for key in keys})


def _immutable_secret(cr: str, namespace: str, name: str, component: str, data: Mapping[str, str]) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(cr, namespace, name, component),
        "type": "Opaque",
        "immutable": True,
        "data": {key: base64.b64encode(value.encode()).decode() for key, value in data.items()},
    }


def build_secrets(cr: str, namespace: str, spec: CollectiveSpec, material: Material) -> list[Manifest]:
    """Every create-once Secret of the collective `namespace/cr`, in a stable order."""
    secrets = [build_redis_secret(cr, namespace, material.passwords),
               build_memory_tls_secret(cr, namespace, material.memory_tls)]
    if wants_kafka_tls(spec):
        secrets.append(build_kafka_tls_secret(cr, namespace, material.kafka_tls))
    return secrets
