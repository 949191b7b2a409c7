"""One idempotent reconcile of a BorgCollective, and the status refresh; no kopf in here (handlers.py wires it).

reconcile(body):
  1. paused (`borg.dev/paused: "true"`): touch nothing, status phase Paused.
  2. parse the spec and render the children (builders); a spec that cannot run -> Ready=False InvalidSpec.
  3. every kind the children need must be served (Strimzi's Kafka in strimzi mode, ECK's Elasticsearch and Kibana
     in eck mode); if not -> Ready=False with a reason naming what to install, and nothing is applied (the
     children of the last good spec keep running).
  4. the Secret of the memory's Redis users' passwords: read; created (fresh passwords) only when missing, never
     rewritten; one that lacks a user's password -> Ready=False, nothing applied.
  5. server-side apply of every other child, owned by the collective; prune what the spec no longer renders.
  6. the status, recomputed from the children (status.py), written only when it changed; events on transitions.

The per-collective lock serializes the handlers, the resync and the children's watch for one collective, so a
status is never computed from a half-applied set by one thread while another applies.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from borg_operator import KIND, metrics, names
from borg_operator.apply import API_VERSION, Applier, Owner, describe
from borg_operator.builders import OWNED_KINDS, build_children
from borg_operator.images import DEFAULT_ALLOWED_IMAGES, image_allowed
from borg_operator.memory_fill import FillReader
from borg_operator.observe import observe, read_kafka_tls, read_memory_tls, read_passwords
from borg_operator.spec import CollectiveSpec, SpecError, parse_spec
from borg_operator.status import (
    Collective,
    Event,
    MissingApi,
    compute_status,
    is_completed,
    is_paused,
    status_patch,
    transition_events,
)
from borg_operator.tls import make_kafka_tls, make_memory_tls
from borgdqn.memory.redis.acl import USERS
from borgdqn.one_line import one_line as plain_one_line
from borgdqn.one_line import one_line_text

log = logging.getLogger(__name__)

PostEvent = Callable[[Mapping[str, Any], Event], None]


def check_images(spec: CollectiveSpec, allowed: tuple[str, ...]) -> None:
    """SpecError (one line) for an image outside the operator's allow-list: its pods would get the credentials."""
    images = [("agents.image", spec.agents.image), ("memory.image", spec.memory.image)]
    if spec.kafka.mode == "managed":
        images.append(("kafka.image", spec.kafka.image))
    for where, image in images:
        if not image_allowed(image, allowed):
            raise SpecError(f"{where} {image} is not from an allowed repository ({', '.join(allowed)}): the "
                            "operator's --allowed-image (the chart's allowedImages) lists the repositories whose "
                            "pods may get the collective's credentials")


SECRET_KEYS = ", ".join(user.secret_key for user in USERS)


def lost_secret_message(cr: str) -> str:
    return (f"Secret {names.redis_secret(cr)} is gone while StatefulSet {names.memory(cr)} runs with its passwords: "
            "new ones would lock every agent out of the memory, so none are made; recreate the Secret with the old "
            f"passwords (keys: {SECRET_KEYS}), or delete the memory StatefulSet (and its volume, losing the "
            "hive's experience and model store) to start anew")


def incomplete_secret_message(cr: str, missing: list[str]) -> str:
    return (f"Secret {names.redis_secret(cr)} has no {', '.join(missing)}: the memory's Redis users need a password "
            f"each (keys: {SECRET_KEYS}); Secrets are immutable, so delete it and create it with every key")


def fresh_passwords() -> dict[str, str]:
    """A new password for each of the memory's users (32 random URL-safe bytes each)."""
    return {user.secret_key: secrets.token_urlsafe(32) for user in USERS}


def one_line(err: BaseException) -> str:
    """An error as one status line: the apiserver's own message where there is one, never a traceback."""
    body = getattr(err, "body", None)
    status = getattr(err, "status", None)
    if isinstance(body, (bytes, str)) and body:
        try:
            message = json.loads(body).get("message")
        except (ValueError, AttributeError):
            message = None
        if message:
            return f"HTTP {status}: {one_line_text(message)}"
    return plain_one_line(err)


@dataclass(frozen=True)
class Outcome:
    """How the last reconcile of a collective ended; the resync and the status refresh read it."""

    generation: int
    result: str  # applied | paused | invalid | blocked | error
    missing: tuple[MissingApi, ...] = ()
    error: str | None = None

    @property
    def observed_generation(self) -> int | None:
        # Paused and failed reconciles did not bring the children to this generation.
        return self.generation if self.result in ("applied", "invalid", "blocked") else None


@dataclass
class Reconciler:
    applier: Applier
    post_event: PostEvent
    fills: FillReader | None = None
    allowed_images: tuple[str, ...] = DEFAULT_ALLOWED_IMAGES
    clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC)
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _outcomes: dict[str, Outcome] = field(default_factory=dict)
    _handled: dict[str, float] = field(default_factory=dict)  # uid -> monotonic time of the last reconcile
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def lock(self, uid: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(uid, threading.Lock())

    def outcome(self, uid: str) -> Outcome | None:
        return self._outcomes.get(uid)

    def handled_within(self, uid: str, seconds: float) -> bool:
        return time.monotonic() - self._handled.get(uid, -float("inf")) < seconds

    def tracked(self) -> int:
        return len(self._outcomes)

    def retain(self, uids: set[str]) -> None:
        """Forgets the collectives that are gone (the resync lists the ones that exist)."""
        with self._guard:
            for table in (self._locks, self._outcomes, self._handled):
                for uid in [uid for uid in table if uid not in uids]:
                    del table[uid]

    # ------------------------------------------------------------------------------------------ reconcile
    def reconcile(self, body: Mapping[str, Any], *, unless_within_s: float | None = None) -> Outcome | None:
        """Brings the children to the spec (see the module docstring); raises on a failed request, after the
        status says so (the caller retries). With `unless_within_s`: nothing (None) if the collective was
        reconciled that recently (the resync leaves alone what a handler just did)."""
        owner = Owner.from_body(body)
        generation = int(body["metadata"].get("generation") or 0)
        with self.lock(owner.uid):
            if unless_within_s is not None and self.handled_within(owner.uid, unless_within_s):
                return None
            return self._timed(owner, generation, body)

    def _timed(self, owner: Owner, generation: int, body: Mapping[str, Any]) -> Outcome:
        with metrics.timed_reconcile():
            try:
                outcome = self._reconcile(owner, generation, body)
            except Exception as err:
                metrics.RECONCILES.labels("error").inc()
                metrics.ERRORS.labels("reconcile").inc()
                outcome = Outcome(generation, "error", error=one_line(err))
                self._outcomes[owner.uid] = outcome
                self._handled[owner.uid] = time.monotonic()
                self._refresh_locked(owner.namespace, owner.name)
                raise
            metrics.RECONCILES.labels(outcome.result).inc()
            self._outcomes[owner.uid] = outcome
            self._handled[owner.uid] = time.monotonic()
            self._refresh_locked(owner.namespace, owner.name)
            return outcome

    def _reconcile(self, owner: Owner, generation: int, body: Mapping[str, Any]) -> Outcome:
        if is_paused(body):
            return Outcome(generation, "paused")
        try:
            spec = parse_spec(dict(body.get("spec") or {}))
            check_images(spec, self.allowed_images)
            passwords = read_passwords(self.applier, owner.namespace, owner.name)
            fresh = passwords is None
            if fresh and self.applier.get("apps/v1", "StatefulSet", owner.namespace, names.memory(owner.name)):
                # The memory runs with the old password (and holds the hive's data): a new one would lock every
                # agent out of it. Say so and change nothing until a person decides.
                error = lost_secret_message(owner.name)
                previous = self._outcomes.get(owner.uid)
                if previous is None or previous.error != error:  # once, not at every resync
                    self._post(owner, Event("Warning", "SecretMissing", error))
                return Outcome(generation, "error", error=error)
            lacking = [user.secret_key for user in USERS if passwords is not None and user.secret_key not in passwords]
            if lacking:
                return Outcome(generation, "error", error=incomplete_secret_message(owner.name, lacking))
            # A missing certificate is made anew: the pods roll onto it (their templates carry its CA's checksum).
            tls = read_memory_tls(self.applier, owner.namespace, owner.name)
            kafka_tls = self._kafka_tls(owner, spec)
            completed = is_completed(dict(body.get("status") or {}), spec)
            children = self._render(owner, spec, passwords or fresh_passwords(),
                                    tls or make_memory_tls(owner.name, owner.namespace),
                                    kafka_tls or (make_kafka_tls(owner.name, owner.namespace)
                                                  if self._kafka_tls_wanted(spec) else {}), completed)
        except SpecError as err:
            return Outcome(generation, "invalid", error=str(err))
        needed = dict.fromkeys((str(c["apiVersion"]), str(c["kind"])) for c in children)
        missing = tuple(MissingApi(*kind) for kind in needed if not self.applier.served(*kind))
        if missing:
            return Outcome(generation, "blocked", missing=missing)

        # The Secrets are created once, never applied again, pruned nor listed (the operator may only get and
        # create Secrets): the passwords' when there was none, the certificate's likewise.
        create = {names.redis_secret(owner.name): fresh, names.memory_tls_secret(owner.name): tls is None,
                  names.kafka_tls_secret(owner.name): self._kafka_tls_wanted(spec) and kafka_tls is None}
        secrets_ = [c for c in children if c["kind"] == "Secret" and c["metadata"]["name"] in create]
        created = [s for s in secrets_ if create[s["metadata"]["name"]] and self.applier.create_once(owner, s)]
        if len(created) < sum(create.values()):
            # Created meanwhile (a run of ours killed after creating one): render again with what is stored.
            children = self._render(owner, spec, read_passwords(self.applier, owner.namespace, owner.name) or {},
                                    read_memory_tls(self.applier, owner.namespace, owner.name) or {},
                                    self._kafka_tls(owner, spec) or {}, completed)
        others = [c for c in children if not (c["kind"] == "Secret" and c["metadata"]["name"] in create)]
        kinds = [(api_version, kind) for api_version, kind, _ in OWNED_KINDS if kind != "Secret"]
        selector = ",".join(f"{k}={v}" for k, v in sorted(names.instance_selector(owner.name).items()))
        result = self.applier.apply(owner, others, kinds=kinds, selector=selector)
        result.created[:0] = [describe(secret) for secret in created]
        for change, count in (("created", len(result.created)), ("configured", len(result.configured)),
                              ("pruned", len(result.pruned))):
            if count:
                metrics.CHILDREN.labels(change).inc(count)
        if result.changed:
            self._post(owner, Event("Normal", "Applied", result.summary()))
        # A reconcile that changed nothing (every resync, normally) is not news.
        log.log(logging.INFO if result.changed else logging.DEBUG, "reconciled %s/%s generation %d: %s",
                owner.namespace, owner.name, generation, result.summary())
        return Outcome(generation, "applied")

    @staticmethod
    def _kafka_tls_wanted(spec: CollectiveSpec) -> bool:
        return spec.kafka.mode == "managed" and spec.kafka.secured

    def _kafka_tls(self, owner: Owner, spec: CollectiveSpec) -> dict[str, str] | None:
        """A managed TLS Kafka's stored material; None when there is none yet or the spec wants none."""
        if not self._kafka_tls_wanted(spec):
            return None
        return read_kafka_tls(self.applier, owner.namespace, owner.name)

    def _render(self, owner: Owner, spec: CollectiveSpec, passwords: Mapping[str, str], tls: Mapping[str, str],
                kafka_tls: Mapping[str, str], completed: bool) -> list[dict[str, Any]]:
        return build_children(owner.name, owner.namespace, spec, redis_passwords=passwords, memory_tls=tls,
                              kafka_tls=kafka_tls, completed=completed)

    # ------------------------------------------------------------------------------------------ status
    def refresh(self, namespace: str, name: str) -> None:
        """Recomputes the status from the children (the resync, a child's change); never raises."""
        found = self.applier.get(API_VERSION, KIND, namespace, name)
        if found is None:
            return
        with self.lock(str(found["metadata"]["uid"])):
            self._refresh_locked(namespace, name)

    def _refresh_locked(self, namespace: str, name: str) -> None:
        try:
            body = self.applier.get(API_VERSION, KIND, namespace, name)  # the status as it is now
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            collective = Collective.from_body(body)
            outcome = self._outcomes.get(str(body["metadata"]["uid"]))
            if outcome is not None and outcome.result == "invalid" and outcome.generation == collective.generation:
                # The schema and the model accepted it, the builders did not (e.g. Redis would not fit).
                collective = dataclasses.replace(collective, spec=None, spec_error=outcome.error)
            observed = observe(
                self.applier, name, namespace, collective.spec,
                missing=outcome.missing if outcome else (),
                error=outcome.error if outcome and outcome.result == "error" else None,
                observed_generation=outcome.observed_generation if outcome else None,
                fills=self.fills)
            new = compute_status(collective, observed, self.clock())
            patch = status_patch(collective.status, new)
            if patch is None:
                return
            resource = self.applier.resource(API_VERSION, KIND)
            self.applier.dynamic.patch(resource.status, body={"status": patch}, name=name, namespace=namespace,
                                       content_type="application/merge-patch+json")
            metrics.STATUS_WRITES.inc()
            for event in transition_events(collective.status, new):
                self._post(Owner.from_body(body), event, body)
            if new.get("phase") == "Succeeded" and collective.status.get("phase") != "Succeeded":
                # Release the agents' pods (and their GPUs) now rather than at the next resync.
                fresh = self.applier.get(API_VERSION, KIND, namespace, name)
                if fresh is not None:
                    self._reconcile(Owner.from_body(fresh), int(fresh["metadata"].get("generation") or 0), fresh)
        except Exception as err:
            metrics.ERRORS.labels("status").inc()
            log.warning("status of %s/%s not updated: %s", namespace, name, one_line(err))

    def _post(self, owner: Owner, event: Event, body: Mapping[str, Any] | None = None) -> None:
        ref = body or {"apiVersion": API_VERSION, "kind": KIND,
                       "metadata": {"name": owner.name, "namespace": owner.namespace, "uid": owner.uid}}
        metrics.EVENTS.labels(event.type).inc()
        self.post_event(ref, event)
