"""Server-side apply of the builders' manifests, owned by the collective; pruning of what the spec dropped.

Every child goes through server-side apply with field manager `borg-operator` and `force`: the operator owns
the fields it renders, a second apply of the same manifest changes nothing (the apiserver skips no-op writes, so
the resourceVersion stays and nothing rolls), and fields other managers set (an HPA on a child, `kubectl
annotate`) are left alone. The collective becomes each child's controller owner (ownerReferences with
controller and blockOwnerDeletion), like `kopf.adopt`, but on a copy: the builders' output is never mutated.

Deleting the collective needs no finalizer: every child lives in the collective's namespace with an
ownerReference to it, so the apiserver's garbage collector deletes them all, also while the operator is down.

Objects the spec no longer wants (e.g. the Elasticsearch once `elastic.mode` is disabled) are pruned: among the
kinds the operator may own, the objects labelled with the collective's instance that carry this collective's
uid as controller owner, and are not in the rendered set, are deleted. Objects of the same labels owned by
someone else are never touched.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import (
    ConflictError,
    NotFoundError,
    ResourceNotFoundError,
    UnprocessibleEntityError,
)
from kubernetes.dynamic.resource import Resource

from borg_operator import FIELD_MANAGER, GROUP, KIND, VERSION

log = logging.getLogger(__name__)

API_VERSION = f"{GROUP}/{VERSION}"
# Requests the reconciler makes wait this long at most; a slow apiserver fails the reconcile (retried later)
# instead of blocking a worker for the client's default of forever.
REQUEST_TIMEOUT_S = 30


def key(manifest: Mapping[str, Any]) -> tuple[str, str, str]:
    """(apiVersion, kind, name): what identifies a child within the collective's namespace."""
    return str(manifest["apiVersion"]), str(manifest["kind"]), str(manifest["metadata"]["name"])


# The metadata an apply can change; the rest (resourceVersion, managedFields' times) also moves when a controller
# writes the child's status.
_APPLIED_METADATA = ("labels", "annotations", "ownerReferences", "finalizers")


def desired_state(obj: Mapping[str, Any]) -> dict[str, Any]:
    """`obj` without its status and bookkeeping: what differs only when an apply changed the object. Comparing
    resourceVersions would report a child "configured" when its controller wrote its status (a StatefulSet's
    ready count as pods start) between the operator's list and its apply."""
    metadata = obj.get("metadata") or {}
    return {**{k: v for k, v in obj.items() if k not in ("status", "metadata")},
            "metadata": {k: metadata.get(k) for k in _APPLIED_METADATA}}


def describe(manifest: Mapping[str, Any]) -> str:
    return f"{manifest['kind']}/{manifest['metadata']['name']}"


@dataclass(frozen=True)
class Owner:
    """The collective as the controller owner of its children."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(name=str(meta["name"]), namespace=str(meta["namespace"]), uid=str(meta["uid"]))

    def reference(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}

    def owns(self, obj: Mapping[str, Any]) -> bool:
        refs = (obj.get("metadata") or {}).get("ownerReferences") or []
        return any(ref.get("uid") == self.uid and ref.get("controller") for ref in refs)

    def adopt(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of `manifest` in the owner's namespace with the owner's controller reference."""
        adopted = copy.deepcopy(dict(manifest))
        meta = adopted.setdefault("metadata", {})
        meta["namespace"] = self.namespace
        others = [ref for ref in meta.get("ownerReferences") or [] if ref.get("uid") != self.uid]
        meta["ownerReferences"] = [*others, self.reference()]
        return adopted


@dataclass
class ApplyResult:
    """What an apply changed, for the event and the log ("Kind/name" each)."""

    created: list[str] = field(default_factory=list)
    configured: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.configured or self.pruned)

    def summary(self) -> str:
        parts = [f"{len(self.created)} created", f"{len(self.configured)} configured",
                 f"{len(self.unchanged)} unchanged"]
        if self.pruned:
            parts.append(f"{len(self.pruned)} pruned")
        text = ", ".join(parts)
        named = [*(f"+{name}" for name in self.created), *(f"~{name}" for name in self.configured),
                 *(f"-{name}" for name in self.pruned)]
        return f"{text}: {' '.join(named)}" if named else text


def discovery_cache_file() -> str:
    """Where the DynamicClient may cache discovery: nowhere. Its default (/tmp/osrcp-<host hash>.json) is shared by
    every process that talks to the same address, so it can describe another, earlier cluster, and the operator
    may run on a read-only file system. A path that cannot be written keeps the cache in memory (the client
    ignores a failed write and re-reads discovery when a kind is not found)."""
    return os.path.join(os.sep, "nonexistent", "borg-operator", "discovery.json")


class Applier:
    """Applies, creates, reads and prunes children through one DynamicClient (thread-safe)."""

    def __init__(self, dynamic: DynamicClient, field_manager: str = FIELD_MANAGER) -> None:
        self.dynamic = dynamic
        self.field_manager = field_manager
        self._lock = threading.Lock()  # the discoverer's cache is not thread-safe
        self._resources: dict[tuple[str, str], Resource] = {}

    # ------------------------------------------------------------------------------------------ discovery
    def resource(self, api_version: str, kind: str) -> Resource:
        """The API resource of a kind; ResourceNotFoundError when the cluster does not serve it."""
        with self._lock:
            found = self._resources.get((api_version, kind))
            if found is None:
                found = self.dynamic.resources.get(api_version=api_version, kind=kind)
                self._resources[(api_version, kind)] = found
            return found

    def served(self, api_version: str, kind: str) -> bool:
        """Whether the cluster serves the kind now (a miss re-reads discovery: the CRD may have come since)."""
        try:
            self.resource(api_version, kind)
        except ResourceNotFoundError:
            return False
        return True

    def forget(self, api_version: str, kind: str) -> None:
        """Drops a kind from the cache after a 404 on its path: its CRD went away."""
        with self._lock:
            self._resources.pop((api_version, kind), None)

    # ------------------------------------------------------------------------------------------ reads
    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it (or its kind) does not exist."""
        try:
            resource = self.resource(api_version, kind)
            found = self.dynamic.get(resource, name=name, namespace=namespace, _request_timeout=REQUEST_TIMEOUT_S)
        except (NotFoundError, ResourceNotFoundError):
            return None
        return dict(found.to_dict())

    def list(self, api_version: str, kind: str, namespace: str, selector: str) -> list[dict[str, Any]] | None:
        """Objects of a kind matching a label selector; None when the cluster does not serve the kind."""
        try:
            resource = self.resource(api_version, kind)
            found = self.dynamic.get(resource, namespace=namespace, label_selector=selector,
                                     _request_timeout=REQUEST_TIMEOUT_S)
        except ResourceNotFoundError:
            return None
        except NotFoundError:
            self.forget(api_version, kind)
            return None
        return [dict(item) for item in found.to_dict().get("items") or []]

    # ------------------------------------------------------------------------------------------ writes
    def create_once(self, owner: Owner, manifest: Mapping[str, Any]) -> bool:
        """Creates the object unless it exists (never updates it); True if this call created it."""
        adopted = owner.adopt(manifest)
        resource = self.resource(str(manifest["apiVersion"]), str(manifest["kind"]))
        try:
            self.dynamic.create(resource, body=adopted, namespace=owner.namespace,
                                field_manager=self.field_manager, _request_timeout=REQUEST_TIMEOUT_S)
        except ConflictError:
            return False  # someone (an earlier run of ours) created it meanwhile: theirs stays
        return True

    def apply_one(self, owner: Owner, manifest: Mapping[str, Any]) -> dict[str, Any]:
        adopted = owner.adopt(manifest)
        resource = self.resource(str(manifest["apiVersion"]), str(manifest["kind"]))
        applied = self.dynamic.server_side_apply(
            resource, body=adopted, name=adopted["metadata"]["name"], namespace=owner.namespace,
            field_manager=self.field_manager, force_conflicts=True, _request_timeout=REQUEST_TIMEOUT_S)
        return dict(applied.to_dict())

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        resource = self.resource(api_version, kind)
        # Background: the children's own dependents (ReplicaSets, pods) go through the garbage collector.
        with contextlib.suppress(NotFoundError):
            self.dynamic.delete(resource, name=name, namespace=namespace, propagation_policy="Background",
                                _request_timeout=REQUEST_TIMEOUT_S)

    def apply(self, owner: Owner, manifests: Sequence[Mapping[str, Any]], *, kinds: Iterable[tuple[str, str]],
              selector: str) -> ApplyResult:
        """Applies `manifests` in order, then prunes the owner's objects of `kinds` (matching `selector`) that
        are not among them. Stops at the first failed request (the caller retries the whole, idempotently)."""
        existing: dict[tuple[str, str, str], dict[str, Any]] = {}
        for api_version, kind in kinds:
            for obj in self.list(api_version, kind, owner.namespace, selector) or []:
                obj.setdefault("apiVersion", api_version)
                obj.setdefault("kind", kind)
                existing[key(obj)] = obj
        result = ApplyResult()
        for manifest in manifests:
            before = existing.get(key(manifest))
            try:
                applied = self.apply_one(owner, manifest)
            except UnprocessibleEntityError as err:
                if manifest["kind"] != "Job" or before is None or "immutable" not in str(err.body):
                    raise
                # A Job's pod template cannot change (a new memory image): the Job is run again, anew.
                self.delete(str(manifest["apiVersion"]), "Job", owner.namespace, manifest["metadata"]["name"])
                applied = self.apply_one(owner, manifest)
            if before is None:
                result.created.append(describe(manifest))
            elif desired_state(applied) != desired_state(before):
                result.configured.append(describe(manifest))
            else:
                result.unchanged.append(describe(manifest))
        wanted = {key(manifest) for manifest in manifests}
        for child_key, obj in existing.items():
            if child_key not in wanted and owner.owns(obj):
                self.delete(*child_key[:2], owner.namespace, child_key[2])
                result.pruned.append(describe(obj))
        return result
