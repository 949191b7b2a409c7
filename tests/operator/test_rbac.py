"""The operator's least-privilege RBAC (`borg_operator.rbac`) on the real apiserver: enough, and no more.

The operator runs with a ServiceAccount token (TokenRequest, as a pod would get) bound to exactly the rules of
`rbac.rules()`, and reconciles a collective fully (children, status, events); the same identity is refused what
it does not need: Secrets in other namespaces, listing or changing Secrets, other namespaces' children, nodes.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from borg_operator import rbac
from tests.harness.kube import KubeCluster
from tests.support.kube_helpers import apply, new_namespace, poll, token_kubeconfig
from tests.support.operator_process import (
    Operator,
    children,
    collective,
    condition,
    events,
    expected_children,
    install_crds,
    status,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(kube: KubeCluster) -> KubeCluster:
    install_crds(kube)
    return kube


def can_i(kube: KubeCluster, identity: str, *args: str) -> bool:
    result = kube.kubectl("auth", "can-i", *args, f"--as={identity}", check=False)
    return result.stdout.strip() == "yes"


def as_token(kube: KubeCluster, kubeconfig: Path, *args: str) -> Any:
    """kubectl with the ServiceAccount's token (the admin kubeconfig is replaced, not merged)."""
    assert kube.install is not None
    import subprocess

    return subprocess.run([str(kube.install.kubectl), "--kubeconfig", str(kubeconfig), *args], capture_output=True,
                          text=True, timeout=60, env={**kube.tool_env(), "KUBECONFIG": str(kubeconfig)})


@pytest.fixture
def namespaces(cluster: KubeCluster) -> Iterator[Callable[[str], str]]:
    """Makes namespaces for the test; deletes them afterwards (a terminating namespace takes nothing new, so
    their agents never compete for the fake GPUs once the full tier is up)."""
    made: list[str] = []

    def make(prefix: str) -> str:
        made.append(new_namespace(cluster, prefix))
        return made[-1]

    yield make
    for namespace in made:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")


@pytest.fixture
def account(namespaces: Callable[[str], str]) -> tuple[str, str]:
    return namespaces("opsys"), f"borg-operator-{uuid.uuid4().hex[:6]}"


def reconciles_fully(kube: KubeCluster, namespace: str, name: str, operator: Operator, identity: str) -> None:
    apply(kube, collective(name, namespace, {}))
    want = expected_children(name, namespace, {})
    poll(lambda: set(children(kube, namespace, name)) == want, f"children == {sorted(want)}", timeout_s=60)
    poll(lambda: status(kube, namespace, name).get("observedGeneration") == 1, "status written")
    # Progressing on tier 1; with the full tier up, kwok may run the agents already.
    assert condition(kube, namespace, name, "AgentsReady")["reason"] in ("Progressing", "AllReady", "Unschedulable")
    reasons = [e["reason"] for e in events(kube, namespace, name)]
    assert "Applied" in reasons and not {"ReconcileError", "InvalidSpec"} & set(reasons), reasons
    # Everything it needed was allowed: an RBAC refusal names the identity it refused, and none is logged.
    log = operator.output()
    assert identity not in log, log[-3000:]


def test_namespaced_rules_are_enough_to_reconcile_and_refuse_the_rest(
        cluster: KubeCluster, account: tuple[str, str], namespaces: Callable[[str], str], tmp_path: Path) -> None:
    home, name = account
    watched, other = namespaces("watched"), namespaces("other")
    for manifest in rbac.manifests(name, home, watched=[watched], name=name):
        apply(cluster, manifest)
    cluster.kubectl("create", "secret", "generic", "theirs", "--from-literal=password=hunter2", "-n", other)
    kubeconfig = token_kubeconfig(cluster, home, name, tmp_path / "operator.kubeconfig")

    operator = Operator(cluster, tmp_path, "--namespace", watched, kubeconfig=kubeconfig).start()
    try:
        reconciles_fully(cluster, watched, "rb", operator, f"system:serviceaccount:{home}:{name}")
    finally:
        operator.stop()
        print(f"--- the operator's log (tail) ---\n{operator.output()[-4000:]}")

    # Real requests with the operator's own token ...
    refused = as_token(cluster, kubeconfig, "get", "secret", "theirs", "-n", other)
    assert refused.returncode != 0 and "Forbidden" in refused.stderr
    assert f'system:serviceaccount:{home}:{name}" cannot get resource "secrets"' in refused.stderr
    listed = as_token(cluster, kubeconfig, "get", "secrets", "-n", watched)
    assert listed.returncode != 0 and 'cannot list resource "secrets"' in listed.stderr
    allowed = as_token(cluster, kubeconfig, "get", "secret", "rb-redis", "-n", watched, "-o", "json")
    assert allowed.returncode == 0
    assert base64.b64decode(json.loads(allowed.stdout)["data"]["agent-password"])

    # ... and the apiserver's answer for the rest.
    identity = f"system:serviceaccount:{home}:{name}"
    assert can_i(cluster, identity, "patch", "borgcollectives/status", "-n", watched)
    assert can_i(cluster, identity, "create", "deployments.apps", "-n", watched)
    for verb, resource, namespace in [
        ("get", "secrets", other), ("create", "deployments.apps", other), ("list", "borgcollectives.borg.dev", other),
        ("delete", "secrets", watched), ("update", "secrets", watched), ("patch", "secrets", watched),
        ("delete", "pods", watched), ("create", "pods", watched), ("get", "configmaps", home),
        ("delete", "borgcollectives.borg.dev", watched), ("create", "roles.rbac.authorization.k8s.io", watched),
    ]:
        assert not can_i(cluster, identity, verb, resource, "-n", namespace), (verb, resource, namespace)
    for cluster_scoped in (["list", "nodes"], ["list", "namespaces"], ["get", "customresourcedefinitions"],
                           ["list", "borgcollectives.borg.dev", "--all-namespaces"]):
        assert not can_i(cluster, identity, *cluster_scoped), cluster_scoped


def test_cluster_wide_rules_serve_every_namespace_without_anything_cluster_scoped_beyond_them(
        cluster: KubeCluster, account: tuple[str, str], namespaces: Callable[[str], str], tmp_path: Path) -> None:
    home, name = account
    anywhere = namespaces("anywhere")
    manifests = rbac.manifests(name, home, name=name)
    assert [m["kind"] for m in manifests] == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"]
    for manifest in manifests:
        apply(cluster, manifest)
    kubeconfig = token_kubeconfig(cluster, home, name, tmp_path / "operator.kubeconfig")

    operator = Operator(cluster, tmp_path, kubeconfig=kubeconfig, log_format="json").start()
    try:
        reconciles_fully(cluster, anywhere, "cw", operator, f"system:serviceaccount:{home}:{name}")
        operator.stop()
        # The default log format: one JSON object per line, the collective named in the kopf lines about it.
        records = [json.loads(line) for line in operator.output().splitlines() if line.strip()]
        assert any(r.get("object", {}).get("name") == "cw" and r["message"] == "Handler 'reconcile' succeeded."
                   for r in records), records[-5:]
        assert any(r["message"].startswith(f"reconciled {anywhere}/cw generation 1: 18 created") for r in records)
        identity = f"system:serviceaccount:{home}:{name}"
        assert can_i(cluster, identity, "list", "borgcollectives.borg.dev", "--all-namespaces")
        for refused in (["list", "secrets", "--all-namespaces"], ["list", "nodes"], ["list", "namespaces"],
                        ["delete", "secrets", "-n", anywhere], ["create", "clusterroles.rbac.authorization.k8s.io"]):
            assert not can_i(cluster, identity, *refused), refused
    finally:
        operator.stop()
        print(f"--- the operator's log (tail) ---\n{operator.output()[-4000:]}")
        # Cluster-scoped: the next test of the session must not inherit this binding.
        for manifest in manifests[1:]:
            cluster.kubectl("delete", manifest["kind"].lower(), manifest["metadata"]["name"], "--wait=false")


def test_the_rules_cover_every_kind_a_collective_owns() -> None:
    from borg_operator.builders import OWNED_KINDS

    granted = {(group, resource): set(rule["verbs"]) for rule in rbac.rules()
               for group in rule["apiGroups"] for resource in rule["resources"]}
    for api_version, kind, plural in OWNED_KINDS:
        group = api_version.split("/")[0] if "/" in api_version else ""
        verbs = granted[(group, plural)]
        if kind == "Secret":
            assert verbs == {"get", "create"}
        else:
            assert {"get", "list", "create", "patch", "delete"} <= verbs, kind
    assert granted[("borg.dev", "borgcollectives")] == {"get", "list", "watch", "patch"}
    assert rbac.rules(cluster_wide=True) == rbac.rules(cluster_wide=False)
