"""The create-once Secrets' material as the apiserver holds it (builders/secrets.py builds the Secrets).

The reconciler reads them by name (the operator may get and create Secrets, never list or change them) once per
reconcile; what is missing is made anew (`Stored.completed`) and created, except the passwords of a memory that
still runs with the old ones (reconcile.py says so instead).
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field

from borg_operator import names
from borg_operator.apply import Applier
from borg_operator.builders.secrets import MEMORY_TLS_KEYS, Material, wants_kafka_tls
from borg_operator.spec import CollectiveSpec
from borg_operator.tls import KAFKA_TLS_KEYS, make_kafka_tls, make_memory_tls
from borgdqn.memory.redis.acl import USERS

SECRET_KEYS = ", ".join(user.secret_key for user in USERS)


def fresh_passwords() -> dict[str, str]:
    """A new password for each of the memory's users (32 random URL-safe bytes each)."""
    return {user.secret_key: secrets.token_urlsafe(32) for user in USERS}


@dataclass(frozen=True)
class Stored:
    """The three Secrets' contents; None where there is no Secret (a TLS Secret lacking a key counts as none: its
    certificate is made anew, and the pods roll onto it)."""

    passwords: dict[str, str] | None = field(repr=False)
    memory_tls: dict[str, str] | None = field(repr=False)
    kafka_tls: dict[str, str] | None = field(repr=False)  # also None when the spec has no managed TLS Kafka

    def lacking_passwords(self) -> list[str]:
        """The users' keys a stored passwords Secret lacks (Secrets are immutable: a person must recreate it)."""
        if self.passwords is None:
            return []
        return [user.secret_key for user in USERS if user.secret_key not in self.passwords]

    def missing(self, cr: str, spec: CollectiveSpec) -> set[str]:
        """The names of the Secrets to create."""
        wanted = {names.redis_secret(cr): self.passwords, names.memory_tls_secret(cr): self.memory_tls}
        if wants_kafka_tls(spec):
            wanted[names.kafka_tls_secret(cr)] = self.kafka_tls
        return {name for name, held in wanted.items() if held is None}

    def completed(self, cr: str, namespace: str, spec: CollectiveSpec) -> Material:
        """The stored material, made anew where a Secret is missing."""
        kafka_tls = self.kafka_tls if self.kafka_tls is not None else (
            make_kafka_tls(cr, namespace) if wants_kafka_tls(spec) else {})
        return Material(passwords=self.passwords if self.passwords is not None else fresh_passwords(),
                        memory_tls=self.memory_tls or make_memory_tls(cr, namespace), kafka_tls=kafka_tls)


def read_stored(applier: Applier, namespace: str, cr: str, spec: CollectiveSpec) -> Stored:
    """The collective's create-once Secrets as they are now (one GET each)."""
    return Stored(passwords=_read_passwords(applier, namespace, cr),
                  memory_tls=_read_tls(applier, namespace, names.memory_tls_secret(cr), MEMORY_TLS_KEYS),
                  kafka_tls=_read_tls(applier, namespace, names.kafka_tls_secret(cr), KAFKA_TLS_KEYS)
                  if wants_kafka_tls(spec) else None)


def _read_passwords(applier: Applier, namespace: str, cr: str) -> dict[str, str] | None:
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


def _read_tls(applier: Applier, namespace: str, name: str, keys: tuple[str, ...]) -> dict[str, str] | None:
    secret = applier.get("v1", "Secret", namespace, name)
    found = {}
    for key in keys:
        try:
            found[key] = base64.b64decode(((secret or {}).get("data") or {}).get(key) or "", validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None
    return found if all(found.values()) else None


def lost_secret_message(cr: str) -> str:
    return (f"Secret {names.redis_secret(cr)} is gone while StatefulSet {names.memory(cr)} runs with its passwords: "
            "new ones would lock every agent out of the memory, so none are made; recreate the Secret with the old "
            f"passwords (keys: {SECRET_KEYS}), or delete the memory StatefulSet (and its volume, losing the "
            "hive's experience and model store) to start anew")


def incomplete_secret_message(cr: str, missing: list[str]) -> str:
    return (f"Secret {names.redis_secret(cr)} has no {', '.join(missing)}: the memory's Redis users need a password "
            f"each (keys: {SECRET_KEYS}); Secrets are immutable, so delete it and create it with every key")
