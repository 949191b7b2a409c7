"""One idempotent reconcile of a BorgCollective, and the status refresh; no kopf in here (handlers.py wires it).

reconcile(body):
  1. parse the spec, once for the reconcile and its status; a spec that cannot run -> Ready=False InvalidSpec.
  2. read the create-once Secrets (material.py: passwords, certificates), make anew in memory what is missing,
     and render the children (builders); what the status will read of them is kept (observe.Rendered).
  3. paused (`borg.dev/paused: "true"`): touch nothing, status phase Paused.
  4. the memory's Redis users' passwords: a Secret gone while the memory runs, or one that lacks a user's
     password -> Ready=False, nothing applied.
  5. every kind the children need must be served (Strimzi's Kafka in strimzi mode, ECK's Elasticsearch and Kibana
     in eck mode); if not -> Ready=False with a reason naming what to install, and nothing is applied (the
     children of the last good spec keep running).
  6. create the missing Secrets (builders/secrets.py; never rewritten), then server-side apply every child, owned
     by the collective; prune what the spec no longer renders.
  7. the status, recomputed from the children (status.py), written only when it changed; events on transitions.

The per-collective lock serializes the handlers, the resync and the children's watch for one collective, so a
status is never computed from a half-applied set by one thread while another applies.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from borg_operator import KIND, metrics, names
from borg_operator.apply import API_VERSION, Applier, Owner, describe
from borg_operator.builders import APPLIED_KINDS, build_children, build_secrets
from borg_operator.images import DEFAULT_ALLOWED_IMAGES, image_allowed
from borg_operator.material import Stored, incomplete_secret_message, lost_secret_message, read_stored
from borg_operator.memory_fill import FillReader
from borg_operator.observe import Rendered, observe
from borg_operator.spec import CollectiveSpec, SpecError
from borg_operator.status import (
    Collective,
    Event,
    MissingApi,
    compute_status,
    is_completed,
    is_paused,
    parse_body,
    status_patch,
    transition_events,
)
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
    # The generation's spec as parsed once for the reconcile and its status (None: it cannot run, `spec_error`).
    spec: CollectiveSpec | None = None
    spec_error: str | None = None

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
    _rendered: dict[str, Rendered] = field(default_factory=dict)  # uid -> what its last render has the status read
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
            for table in (self._locks, self._outcomes, self._rendered, self._handled):
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
            spec, spec_error = parse_body(body)
            try:
                outcome = self._reconcile(owner, generation, body, spec, spec_error)
            except Exception as err:
                metrics.RECONCILES.labels("error").inc()
                metrics.ERRORS.labels("reconcile").inc()
                outcome = Outcome(generation, "error", error=one_line(err), spec=spec, spec_error=spec_error)
                self._outcomes[owner.uid] = outcome
                self._handled[owner.uid] = time.monotonic()
                self._refresh_locked(owner.namespace, owner.name)
                raise
            metrics.RECONCILES.labels(outcome.result).inc()
            self._outcomes[owner.uid] = outcome
            self._handled[owner.uid] = time.monotonic()
            self._refresh_locked(owner.namespace, owner.name)
            return outcome

    def _reconcile(self, owner: Owner, generation: int, body: Mapping[str, Any], spec: CollectiveSpec | None,
                   spec_error: str | None) -> Outcome:
        paused = is_paused(body)

        def invalid(error: str) -> Outcome:
            # Paused: said in the status all the same, with nothing touched.
            return Outcome(generation, "paused" if paused else "invalid", error=error, spec_error=error)

        if spec is None:
            return invalid(spec_error or "the spec cannot be parsed")
        try:
            if not paused:
                check_images(spec, self.allowed_images)
            # A missing certificate is made anew: the pods roll onto it (their templates carry its CA's checksum).
            stored = read_stored(self.applier, owner.namespace, owner.name, spec)
            material = stored.completed(owner.name, owner.namespace, spec)
            completed = is_completed(dict(body.get("status") or {}), spec)
            children = build_children(owner.name, owner.namespace, spec, material, completed=completed)
        except SpecError as err:
            return invalid(str(err))
        self._rendered[owner.uid] = Rendered.of(children, material)
        if paused:
            return Outcome(generation, "paused", spec=spec)
        failed = self._secrets_failed(owner, stored)
        if failed is not None:
            return Outcome(generation, "error", error=failed, spec=spec)
        needed = dict.fromkeys((str(c["apiVersion"]), str(c["kind"])) for c in children)
        missing = tuple(MissingApi(*kind) for kind in needed if not self.applier.served(*kind))
        if missing:
            return Outcome(generation, "blocked", missing=missing, spec=spec)

        # The Secrets are created once, never applied again, pruned nor listed (the operator may only get and
        # create Secrets): the passwords' when there was none, the certificates' likewise.
        wanted = stored.missing(owner.name, spec)
        created = [secret for secret in build_secrets(owner.name, owner.namespace, spec, material)
                   if secret["metadata"]["name"] in wanted and self.applier.create_once(owner, secret)]
        if len(created) < len(wanted):
            # Created meanwhile (a run of ours killed after creating one): render again with what is stored.
            stored = read_stored(self.applier, owner.namespace, owner.name, spec)
            if stored.missing(owner.name, spec):
                raise RuntimeError(f"Secrets {', '.join(sorted(stored.missing(owner.name, spec)))} were created "
                                   "and are gone again")
            material = stored.completed(owner.name, owner.namespace, spec)
            children = build_children(owner.name, owner.namespace, spec, material, completed=completed)
            self._rendered[owner.uid] = Rendered.of(children, material)
        selector = ",".join(f"{k}={v}" for k, v in sorted(names.instance_selector(owner.name).items()))
        result = self.applier.apply(owner, children, kinds=list(APPLIED_KINDS), selector=selector)
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
        return Outcome(generation, "applied", spec=spec)

    def _secrets_failed(self, owner: Owner, stored: Stored) -> str | None:
        """Why the stored passwords cannot be used (one line), or None."""
        if stored.passwords is None and self.applier.get("apps/v1", "StatefulSet", owner.namespace,
                                                         names.memory(owner.name)):
            # The memory runs with the old password (and holds the hive's data): a new one would lock every
            # agent out of it. Say so and change nothing until a person decides.
            error = lost_secret_message(owner.name)
            previous = self._outcomes.get(owner.uid)
            if previous is None or previous.error != error:  # once, not at every resync
                self._post(owner, Event("Warning", "SecretMissing", error))
            return error
        lacking = stored.lacking_passwords()
        return incomplete_secret_message(owner.name, lacking) if lacking else None

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
            uid = str(body["metadata"]["uid"])
            outcome = self._outcomes.get(uid)
            if outcome is None:
                # Not reconciled by this operator yet (a child's event came first): the reconcile writes it.
                return
            generation = int(body["metadata"].get("generation") or 0)
            collective = Collective.from_body(
                body, (outcome.spec, outcome.spec_error) if outcome.generation == generation else None)
            observed = observe(
                self.applier, name, namespace, self._rendered.get(uid) if collective.spec is not None else None,
                missing=outcome.missing, error=outcome.error if outcome.result == "error" else None,
                observed_generation=outcome.observed_generation, fills=self.fills)
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
                    self._reconcile(Owner.from_body(fresh), int(fresh["metadata"].get("generation") or 0), fresh,
                                    *parse_body(fresh))
        except Exception as err:
            metrics.ERRORS.labels("status").inc()
            log.warning("status of %s/%s not updated: %s", namespace, name, one_line(err))

    def _post(self, owner: Owner, event: Event, body: Mapping[str, Any] | None = None) -> None:
        ref = body or {"apiVersion": API_VERSION, "kind": KIND,
                       "metadata": {"name": owner.name, "namespace": owner.namespace, "uid": owner.uid}}
        metrics.EVENTS.labels(event.type).inc()
        self.post_event(ref, event)
