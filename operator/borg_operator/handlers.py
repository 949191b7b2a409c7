"""The kopf handlers, one per concern, registered into a registry by `register` (the CLI in __main__ runs them).

- create / update / resume -> one idempotent reconcile (reconcile.py). A spec that cannot run is a permanent
  error (the status and one Warning event say why; kopf does not retry it); a failed request is retried with
  an exponential delay (1, 2, 4 ... 60 s) at most RETRIES times, after which the resync below takes over at its
  own pace. A blocked spec (Strimzi or ECK not installed) is not an error of the handler: the status says what
  to install, and the resync picks the operator up once it is there.
- the resync: every `resync_s`, each collective not handled within the last `idle_s` is reconciled again
  (repairs drift, e.g. a child edited by hand; retries what failed) and its status refreshed from the children.
  It is a thread of the operator, not a kopf timer: kopf puts a finalizer on every object that has a timer or
  a daemon, and a finalizer would block `kubectl delete borg` whenever the operator is down.
- the children's Deployments and StatefulSets (watched with a server-side label selector on managed-by): a
  change refreshes the owner's status at once (agents ready, rollouts); a deleted child is put back.
- deletion: nothing to do. Every child carries an ownerReference to the collective (controller,
  blockOwnerDeletion), so the apiserver's garbage collector removes them all, also while the operator is down.
  No finalizer, hence none to get stuck.

kopf keeps its bookkeeping (retry counts, the last handled spec) in annotations under `operator.borg.dev/`: not
in `status`, whose schema the CRD declares exactly, and not under `borg.dev/`, since kopf leaves annotations
under its own prefix out of what it compares, and a change of the pause annotation `borg.dev/paused` must count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import kopf

from borg_operator import GROUP, KIND, PLURAL, VERSION, names
from borg_operator.apply import API_VERSION
from borg_operator.reconcile import Reconciler, one_line

log = logging.getLogger(__name__)

STORAGE_PREFIX = "operator.borg.dev"
RETRIES = 8
MAX_DELAY_S = 60.0
CHILD_SELECTOR = f"{names.LABEL_MANAGED_BY}={names.MANAGED_BY}"
CHILD_HANDLER = "child_changed"


@dataclass(frozen=True)
class Options:
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    resync_s: float = 30.0
    idle_s: float = 5.0
    workers: int = 8


def retry_delay(retry: int) -> float:
    """Exponential backoff for a failed reconcile: 1, 2, 4, ... seconds, at most a minute."""
    return float(min(MAX_DELAY_S, 2 ** max(retry, 0)))


def controlling_collective(body: Mapping[str, Any]) -> str | None:
    """The name of the BorgCollective that controls this child, if one does."""
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if (ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/")
                and ref.get("controller")):
            return str(ref.get("name"))
    return None


class Resyncer(threading.Thread):
    """Every `resync_s`: reconcile each collective that has been left alone for `idle_s`, refresh its status."""

    def __init__(self, reconciler: Reconciler, options: Options) -> None:
        super().__init__(name="borg-resync", daemon=True)
        self.reconciler = reconciler
        self.options = options
        self.stopped = threading.Event()

    def collectives(self) -> list[dict[str, Any]]:
        applier = self.reconciler.applier
        resource = applier.resource(API_VERSION, KIND)
        found: list[dict[str, Any]] = []
        for namespace in self.options.namespaces or (None,):
            listed = applier.dynamic.get(resource, namespace=namespace, _request_timeout=30)
            found.extend(dict(item) for item in listed.to_dict().get("items") or [])
        return found

    def tick(self) -> None:
        bodies = self.collectives()
        self.reconciler.retain({str(body["metadata"]["uid"]) for body in bodies})
        for body in bodies:
            meta = body["metadata"]
            if meta.get("deletionTimestamp") or self.stopped.is_set():
                continue
            uid, generation = str(meta["uid"]), int(meta.get("generation") or 0)
            last = self.reconciler.outcome(uid)
            try:
                if last is not None and last.result == "invalid" and last.generation == generation:
                    self.reconciler.refresh(str(meta["namespace"]), str(meta["name"]))
                else:
                    # Skipped when a handler did it within idle_s (checked under the collective's lock).
                    self.reconciler.reconcile(body, unless_within_s=self.options.idle_s)
            except Exception as err:  # the status says so; the next tick tries again
                log.warning("resync of %s/%s failed: %s", meta.get("namespace"), meta.get("name"), one_line(err))

    def run(self) -> None:
        while not self.stopped.wait(self.options.resync_s):
            started = time.monotonic()
            try:
                self.tick()
            except Exception as err:
                log.warning("resync: cannot list the collectives: %s", one_line(err))
            log.debug("resync took %.3fs", time.monotonic() - started)

    def stop(self) -> None:
        self.stopped.set()


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, options: Options) -> None:
    """Registers every handler of the operator into `registry`."""
    collectives: dict[str, Any] = {"group": GROUP, "version": VERSION, "plural": PLURAL, "registry": registry}
    retried: dict[str, Any] = {"retries": RETRIES, "backoff": MAX_DELAY_S, "errors": kopf.ErrorsMode.TEMPORARY}
    resyncer = Resyncer(reconciler, options)

    @kopf.on.startup(registry=registry, id="configure")
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=STORAGE_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=STORAGE_PREFIX, key="last-handled-configuration")
        # No cluster-wide list/watch of namespaces and CRDs (least privilege): the operator serves the kinds
        # that exist at startup (the CLI checks that the CRD does) in the namespaces it is given.
        settings.scanning.disabled = True
        # kopf's own events ("Handler ... succeeded") would bury ours; ours are posted by events.py.
        settings.posting.enabled = False
        settings.execution.max_workers = options.workers
        # Only the children of some collective are watched, not every Deployment of the cluster.
        for plural in ("deployments", "statefulsets"):
            settings.watching.label_selectors["apps", "v1", plural] = CHILD_SELECTOR
        resyncer.start()

    @kopf.on.login(registry=registry, id="login")
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The same source of credentials as the reconciler's client (in a pod, or $KUBECONFIG); asked again
        # when the apiserver refuses them (a rotated ServiceAccount token).
        return kopf.login_via_client(**kwargs)

    @kopf.on.cleanup(registry=registry, id="stop_resync")
    def stop_resync(**_: Any) -> None:
        resyncer.stop()

    @kopf.on.resume(**collectives, **retried, id="reconcile")
    @kopf.on.create(**collectives, **retried, id="reconcile")
    @kopf.on.update(**collectives, **retried, id="reconcile")
    def reconcile(body: kopf.Body, retry: int, logger: kopf.Logger, **_: Any) -> None:
        try:
            outcome = reconciler.reconcile(body)
        except Exception as err:
            message = one_line(err)
            logger.warning("reconcile failed (attempt %d of %d): %s", retry + 1, RETRIES + 1, message)
            raise kopf.TemporaryError(message, delay=retry_delay(retry)) from err
        if outcome is not None and outcome.result == "invalid":
            # Said in the status and a Warning event; retrying cannot help until the spec changes.
            raise kopf.PermanentError(f"invalid spec: {outcome.error}")
        if outcome is not None and outcome.result == "blocked":
            logger.warning("waiting for %s", "; ".join(api.message for api in outcome.missing))

    @kopf.on.event("apps", "v1", "deployments", registry=registry, id=CHILD_HANDLER)
    @kopf.on.event("apps", "v1", "statefulsets", registry=registry, id=CHILD_HANDLER)
    def child_changed(body: kopf.Body, type: str, logger: kopf.Logger, **_: Any) -> None:
        owner = controlling_collective(body)
        namespace = body.get("metadata", {}).get("namespace")
        if owner is None or not namespace:
            return
        if type == "DELETED":
            collective = reconciler.applier.get(API_VERSION, KIND, namespace, owner)
            if collective is not None and not collective["metadata"].get("deletionTimestamp"):
                logger.info("deleted by someone else: putting it back (collective %s)", owner)
                try:
                    reconciler.reconcile(collective)
                except Exception as err:  # the resync tries again
                    logger.warning("reconcile after a deleted child failed: %s", one_line(err))
            return
        reconciler.refresh(namespace, owner)

    @kopf.on.probe(id="collectives", registry=registry)
    def tracked(**_: Any) -> int:
        # /healthz answers while the event loop does; the figure is the collectives the operator tracks.
        return reconciler.tracked()


def namespaces_or_clusterwide(namespaces: Sequence[str]) -> dict[str, Any]:
    """kopf.run's arguments for the namespaces to serve (none: the whole cluster)."""
    return {"namespaces": list(namespaces)} if namespaces else {"clusterwide": True}
