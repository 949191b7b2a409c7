"""The operator's least-privilege RBAC, as data: the chart renders the same rules from `rules()`.

What each rule is for:
- borgcollectives: get/list/watch (kopf's watch, the resync's list) and patch (kopf keeps its bookkeeping in
  annotations under operator.borg.dev/); borgcollectives/status: get/patch (the status); borgcollectives/
  finalizers: update, which the apiserver asks of whoever sets `blockOwnerDeletion` on a child where the
  OwnerReferencesPermissionEnforcement admission plugin is on (the operator itself adds no finalizer).
- events: create (the operator's events on the collectives).
- each kind a collective owns (builders.OWNED_KINDS): get, list (prune, the status), create and patch
  (server-side apply creates with PATCH, which needs both), delete (prune); watch only for Deployments and
  StatefulSets, whose changes the operator follows.
- secrets: get and create only. The Redis password Secret is read, and created once when missing; it is never
  updated, listed or deleted by the operator (the garbage collector removes it with the collective).
- pods: list, to find agent pods the scheduler cannot place (more agents than GPUs).

Nothing cluster-scoped is needed: API discovery (the CRD check, whether Strimzi/ECK are installed) is open to
every authenticated user, and kopf's cluster-wide scanning of namespaces and CRDs is switched off. Namespaced
(`--namespace`, repeatable): a Role with these rules in each watched namespace; cluster-wide: one ClusterRole.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from borg_operator import GROUP, PLURAL
from borg_operator.builders import OWNED_KINDS

PolicyRule = dict[str, list[str]]

CHILD_VERBS = ("get", "list", "create", "patch", "delete")
WATCHED_CHILDREN = frozenset({("apps", "deployments"), ("apps", "statefulsets")})


def _group(api_version: str) -> str:
    return api_version.split("/", 1)[0] if "/" in api_version else ""


def rules(cluster_wide: bool = False) -> list[PolicyRule]:
    """The operator's PolicyRules. The same rules serve both modes: `cluster_wide` only decides where they go
    (one ClusterRole, or a Role in each watched namespace; see `manifests`), never what they allow."""
    del cluster_wide  # no extra (cluster-scoped) rule is needed in either mode
    found: list[PolicyRule] = [
        {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch"]},
        {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch"]},
        {"apiGroups": [GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    ]
    by_verbs: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
    for api_version, kind, plural in OWNED_KINDS:
        if kind == "Secret":
            continue  # above: get and create only
        group = _group(api_version)
        verbs: tuple[str, ...] = (*CHILD_VERBS, "watch") if (group, plural) in WATCHED_CHILDREN else CHILD_VERBS
        by_verbs[(group, verbs)].append(plural)
    for (group, verbs), plurals in by_verbs.items():
        found.append({"apiGroups": [group], "resources": sorted(set(plurals)), "verbs": list(verbs)})
    return found


def manifests(service_account: str, namespace: str, watched: list[str] | None = None,
              name: str = "borg-operator") -> list[dict[str, Any]]:
    """The ServiceAccount and its RBAC: a Role + RoleBinding in each of `watched`, or (None/empty) a
    ClusterRole + ClusterRoleBinding. The chart of the next issue renders the same objects."""
    subject = {"kind": "ServiceAccount", "name": service_account, "namespace": namespace}
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": service_account, "namespace": namespace}},
    ]
    if not watched:
        objects += [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
             "rules": rules(cluster_wide=True)},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
             "subjects": [subject]},
        ]
        return objects
    for ns in watched:
        objects += [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": name, "namespace": ns}, "rules": rules(cluster_wide=False)},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": name, "namespace": ns},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
             "subjects": [subject]},
        ]
    return objects
