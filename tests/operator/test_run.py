"""The operator running (`python -m borg_operator`, a real process) against the harness's real kube-apiserver.

Tier 1 (etcd + kube-apiserver, no controllers): the operator turns a collective into its children, rolls the
agents on a hyper-parameter change, follows `kubectl scale`, prunes what the spec drops, pauses, refuses what
cannot run (an invalid spec, Strimzi mode without Strimzi) without a retry storm, and converges after a
SIGKILL. The full tier (agent pods Running on fake GPU nodes, more agents than GPUs, garbage collection) runs
through the Helm charts in tests/e2e/test_charts.py. Every test runs an operator of its own for its own namespace
(`--namespace`), so that tests never see each other's collectives; the cluster-wide default is tested with its RBAC
(tests/operator/test_rbac.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from borg_operator import names
from borg_operator.__main__ import check_crd
from tests.harness.kube import GPU_RESOURCE, KubeCluster
from tests.harness.process import free_port
from tests.support.kube_helpers import apply, new_namespace, poll
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

STRIMZI_CRDS = ("kafkas.kafka.strimzi.io", "kafkanodepools.kafka.strimzi.io", "kafkausers.kafka.strimzi.io")


@pytest.fixture(scope="module")
def cluster(kube: KubeCluster) -> KubeCluster:
    install_crds(kube)
    return kube


@pytest.fixture
def namespace(cluster: KubeCluster) -> Iterator[str]:
    name = new_namespace(cluster, "op")
    yield name
    # Once the namespace is terminating nothing new is created in it: its agents never take the fake nodes'
    # GPUs from a later test, also when the full tier (controllers, kwok) comes up after this test.
    cluster.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture
def operator(cluster: KubeCluster, namespace: str, tmp_path: Path) -> Iterator[Operator]:
    running = Operator(cluster, tmp_path, "--namespace", namespace).start()
    try:
        yield running
    finally:
        running.stop()
        print(f"--- the operator's log (tail) ---\n{running.output()[-4000:]}")  # shown when the test failed


def settled(kube: KubeCluster, namespace: str, name: str, spec: dict[str, Any] | None) -> dict[tuple[str, str], Any]:
    """Polls until the children are exactly what the builders render for `spec`; returns them."""
    want = expected_children(name, namespace, spec)

    def exact() -> dict[tuple[str, str], Any] | None:
        found = children(kube, namespace, name)
        return found if set(found) == want else None

    return poll(exact, f"children == {sorted(want)}", timeout_s=60)


def test_a_collective_becomes_its_children_owned_labelled_with_gpus_and_config(
        cluster: KubeCluster, namespace: str, operator: Operator) -> None:
    spec = {"agents": {"replicas": 2, "gpus": 1, "learner": {"lr": 0.0003}}}
    started = time.monotonic()
    apply(cluster, collective("pong", namespace, spec))
    found = settled(cluster, namespace, "pong", spec)
    print(f"\napply -> {len(found)} children: {time.monotonic() - started:.2f}s (polling kubectl)")

    uid = cluster.get_json("borgcollective", "pong", "-n", namespace)["metadata"]["uid"]
    owner = {"apiVersion": "borg.dev/v1alpha1", "kind": "BorgCollective", "name": "pong", "uid": uid,
             "controller": True, "blockOwnerDeletion": True}
    for (kind, name), obj in found.items():
        assert obj["metadata"]["ownerReferences"] == [owner], (kind, name)
        labels = obj["metadata"]["labels"]
        assert labels[names.LABEL_INSTANCE] == "pong" and labels[names.LABEL_MANAGED_BY] == "borg-operator", name
        assert labels[names.LABEL_NAME] == "borg-dqn" and labels[names.LABEL_PART_OF] == "borg-dqn", name
        managers = {entry["manager"] for entry in obj["metadata"]["managedFields"]}
        assert "borg-operator" in managers, (kind, name, managers)

    agents = found[("StatefulSet", "pong-agents")]
    assert agents["spec"]["replicas"] == 2
    pod = agents["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"][GPU_RESOURCE] == "1"
    assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
    rendered = found[("ConfigMap", "pong-config")]["data"]["borgdqn.yaml"]
    config = yaml.safe_load(rendered)
    assert config["learner"]["lr"] == 0.0003
    assert config["replay"]["redis_url"] == f"rediss://pong-memory.{namespace}.svc:6379/0"
    assert pod["metadata"]["annotations"]["borg.dev/config-checksum"] == hashlib.sha256(rendered.encode()).hexdigest()
    passwords = {k: base64.b64decode(v).decode() for k, v in found[("Secret", "pong-redis")]["data"].items()}
    assert sorted(passwords) == ["admin-password", "agent-password", "monitor-password"]
    assert all(len(password) >= 32 for password in passwords.values()) and len(set(passwords.values())) == 3
    # The memory's certificate, signed by a CA of the collective's own whose key the operator did not keep.
    tls = found[("Secret", "pong-memory-tls")]
    assert tls["immutable"] is True and sorted(tls["data"]) == ["ca.crt", "tls.crt", "tls.key"]
    ca = base64.b64decode(tls["data"]["ca.crt"]).decode()
    annotations = [found[("StatefulSet", part)]["spec"]["template"]["metadata"]["annotations"]
                   for part in ("pong-memory", "pong-agents")]
    assert {a[names.MEMORY_CA_ANNOTATION] for a in annotations} == {hashlib.sha256(ca.encode()).hexdigest()}

    def described() -> dict[str, Any] | None:
        current = status(cluster, namespace, "pong")
        return current if current.get("observedGeneration") == 1 and current.get("conditions") else None

    current = poll(described, "status with observedGeneration 1")
    assert current["gpus"] == 2
    assert current["phase"] == "Creating"  # tier 1: no controller makes pods, so nothing gets ready
    assert current["agents"]["selector"] == names.selector_string("pong")
    assert [c["type"] for c in current["conditions"]] == ["Ready", "AgentsReady", "MemoryReady", "KafkaReady",
                                                          "ElasticReady", "Complete"]
    applied = [e for e in events(cluster, namespace, "pong") if e["reason"] == "Applied"]
    assert len(applied) == 1 and applied[0]["type"] == "Normal"
    assert applied[0]["message"].startswith(f"{len(found)} created, 0 configured, 0 unchanged")
    row = cluster.kubectl("get", "borg", "pong", "-n", namespace, "--no-headers").stdout.split()
    # NAME DESIRED READY GPUS STATUS (no MEMORY: the fill is unknown). READY is 0 on tier 1, may be 2 with the
    # full tier up (kwok runs the agents; the rest never gets ready there).
    assert (row[0], row[1], row[3], row[4]) == ("pong", "2", "2", "False"), row

    # Another pass (the resync, every 2 s here) changes nothing: the operator's fields are not written again
    # (controllers may still write the children's status), no second Applied event.
    def applied_by_operator() -> dict[tuple[str, str], Any]:
        return {key: [entry for entry in obj["metadata"]["managedFields"] if entry["manager"] == "borg-operator"]
                for key, obj in children(cluster, namespace, "pong").items()}

    before = applied_by_operator()
    time.sleep(5)
    assert applied_by_operator() == before
    assert len([e for e in events(cluster, namespace, "pong") if e["reason"] == "Applied"]) == 1
    assert operator.metrics()['borg_operator_reconciles_total{result="applied"}'] >= 2


def test_a_hyper_parameter_change_rolls_the_agents(cluster: KubeCluster, namespace: str, operator: Operator) -> None:
    apply(cluster, collective("hp", namespace, {"agents": {"learner": {"lr": 0.0001}}}))
    before = settled(cluster, namespace, "hp", {"agents": {"learner": {"lr": 0.0001}}})
    checksum = before[("StatefulSet", "hp-agents")]["spec"]["template"]["metadata"]["annotations"][
        "borg.dev/config-checksum"]

    cluster.kubectl("patch", "borgcollective", "hp", "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"agents": {"learner": {"lr": 0.0005}}}}))

    def rolled() -> str | None:
        agents = cluster.get_json("statefulset", "hp-agents", "-n", namespace)
        new = agents["spec"]["template"]["metadata"]["annotations"]["borg.dev/config-checksum"]
        return new if new != checksum else None

    new = poll(rolled, "a new config checksum on the agents' pod template", timeout_s=30)
    data = cluster.get_json("configmap", "hp-config", "-n", namespace)["data"]["borgdqn.yaml"]
    assert yaml.safe_load(data)["learner"]["lr"] == 0.0005
    assert new == hashlib.sha256(data.encode()).hexdigest()
    poll(lambda: status(cluster, namespace, "hp").get("observedGeneration") == 2, "observedGeneration 2")
    changed = [e["message"] for e in events(cluster, namespace, "hp") if e["reason"] == "Applied"]
    assert any("~ConfigMap/hp-config" in m and "~StatefulSet/hp-agents" in m for m in changed), changed


def test_kubectl_scale_changes_the_agents_and_kubectl_get_borg_shows_it(
        cluster: KubeCluster, namespace: str, operator: Operator) -> None:
    apply(cluster, collective("sc", namespace, {"agents": {"replicas": 2, "gpus": 2}}))
    settled(cluster, namespace, "sc", {"agents": {"replicas": 2, "gpus": 2}})
    poll(lambda: status(cluster, namespace, "sc").get("gpus") == 4, "status.gpus 4")

    started = time.monotonic()
    cluster.kubectl("scale", "borgcollective/sc", "--replicas=5", "-n", namespace)
    poll(lambda: cluster.get_json("statefulset", "sc-agents", "-n", namespace)["spec"]["replicas"] == 5,
         "the agents StatefulSet at 5 replicas", timeout_s=30, interval_s=0.05)
    print(f"\nkubectl scale -> StatefulSet at 5: {time.monotonic() - started:.2f}s (kubectl included)")

    poll(lambda: status(cluster, namespace, "sc").get("gpus") == 10, "status.gpus 10")
    row = cluster.kubectl("get", "borg", "sc", "-n", namespace, "--no-headers").stdout.split()
    assert (row[0], row[1], row[3]) == ("sc", "5", "10"), row  # NAME DESIRED READY GPUS
    scale = cluster.get_json("borgcollective", "sc", "-n", namespace, "--subresource=scale")
    assert scale["spec"]["replicas"] == 5
    assert scale["status"]["selector"] == names.selector_string("sc")


def test_what_the_spec_drops_is_pruned_and_only_that(cluster: KubeCluster, namespace: str, operator: Operator) -> None:
    spec = {"elastic": {"kibana": {"count": 1, "ingress": {"enabled": True, "host": "kibana.example.org",
                                                           "tlsSecretName": "kibana-tls"}}}}
    apply(cluster, collective("pr", namespace, spec))
    full = settled(cluster, namespace, "pr", spec)
    assert {("Kibana", "pr-kibana"), ("Ingress", "pr-kibana")} <= set(full)
    # An object with the collective's labels that it does not own is none of the operator's business.
    stranger = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "pr-notes", "namespace": namespace, "labels": names.labels("pr", "notes")},
                "data": {"note": "mine"}}
    apply(cluster, stranger)

    slim = {"elastic": {"kibana": {"count": 0, "ingress": {"enabled": False}}}}
    cluster.kubectl("patch", "borgcollective", "pr", "-n", namespace, "--type=merge", "-p", json.dumps({"spec": slim}))
    want = expected_children("pr", namespace, slim) | {("ConfigMap", "pr-notes")}
    gone = set(full) - want
    assert {("Kibana", "pr-kibana"), ("Ingress", "pr-kibana")} <= gone
    poll(lambda: set(children(cluster, namespace, "pr")) == want, f"children == {sorted(want)}", timeout_s=30)
    pruned = poll(lambda: [e["message"] for e in events(cluster, namespace, "pr") if "pruned" in e["message"]],
                  "an Applied event naming what was pruned", timeout_s=30)
    assert len(pruned) == 1 and all(f"-{kind}/{name}" in pruned[0] for kind, name in gone), pruned
    assert cluster.get_json("configmap", "pr-notes", "-n", namespace)["data"] == {"note": "mine"}


def test_an_agents_deployment_of_an_older_operator_gives_way_to_the_statefulset(
        cluster: KubeCluster, namespace: str, operator: Operator) -> None:
    apply(cluster, collective("up", namespace))
    found = settled(cluster, namespace, "up", None)
    agents = found[("StatefulSet", "up-agents")]
    # What an operator of the Deployment days left: NAME-agents as a Deployment, owned by the collective.
    old = {"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": "up-agents", "namespace": namespace, "labels": agents["metadata"]["labels"],
                        "ownerReferences": agents["metadata"]["ownerReferences"]},
           "spec": {"replicas": 0, "selector": agents["spec"]["selector"],
                    "template": {"metadata": {"labels": agents["spec"]["template"]["metadata"]["labels"]},
                                 "spec": {"containers": [{"name": "agent", "image": "borg-dqn/agent:old"}]}}}}
    created = cluster.kubectl("create", "-f", "-", "-o", "jsonpath={.metadata.uid}", input=json.dumps(old)).stdout
    assert created.strip(), "the old operator's Deployment was created"
    # The next pass (a resync, maybe before this line runs) prunes it; the StatefulSet stays the same object.
    poll(lambda: ("Deployment", "up-agents") not in children(cluster, namespace, "up"), "the Deployment pruned",
         timeout_s=30)
    settled(cluster, namespace, "up", None)
    after = cluster.get_json("statefulset", "up-agents", "-n", namespace)
    assert after["metadata"]["uid"] == agents["metadata"]["uid"]


def test_a_paused_collective_is_left_alone_until_the_pause_ends(
        cluster: KubeCluster, namespace: str, operator: Operator) -> None:
    apply(cluster, collective("pa", namespace, {"agents": {"replicas": 1}}))
    settled(cluster, namespace, "pa", {"agents": {"replicas": 1}})
    cluster.kubectl("annotate", "borgcollective", "pa", "-n", namespace, "borg.dev/paused=true")
    poll(lambda: status(cluster, namespace, "pa").get("phase") == "Paused", "phase Paused")
    cluster.kubectl("scale", "borgcollective/pa", "--replicas=3", "-n", namespace)
    time.sleep(5)  # two resyncs: nothing may change while paused
    assert cluster.get_json("statefulset", "pa-agents", "-n", namespace)["spec"]["replicas"] == 1
    assert condition(cluster, namespace, "pa", "Ready")["reason"] == "Paused"

    cluster.kubectl("annotate", "borgcollective", "pa", "-n", namespace, "borg.dev/paused-")
    poll(lambda: cluster.get_json("statefulset", "pa-agents", "-n", namespace)["spec"]["replicas"] == 3,
         "3 agents once resumed", timeout_s=30)
    poll(lambda: {"Paused", "Resumed"} <= {e["reason"] for e in events(cluster, namespace, "pa")},
         "events Paused and Resumed", timeout_s=30)


def _reconciles(operator: Operator, result: str) -> float:
    return operator.metrics().get(f'borg_operator_reconciles_total{{result="{result}"}}', 0.0)


def test_an_invalid_spec_says_why_once_and_is_not_retried(
        cluster: KubeCluster, namespace: str, operator: Operator) -> None:
    # Passes the CRD's schema, but Redis would not fit: its maxmemory for a 1M-step memory is above 1Gi.
    name = "iv"
    apply(cluster, collective(name, namespace, {"memory": {"resources": {"cpu": "2", "memory": "1Gi"}}}))
    poll(lambda: condition(cluster, namespace, name, "Ready").get("reason") == "InvalidSpec", "Ready: InvalidSpec")
    ready = condition(cluster, namespace, name, "Ready")
    assert ready["status"] == "False" and ready["message"].startswith("memory.resources.memory 1Gi is not above")
    assert status(cluster, namespace, name)["phase"] == "Failed"
    attempts = _reconciles(operator, "invalid")
    time.sleep(6)  # three resyncs
    assert _reconciles(operator, "invalid") == attempts == 1
    warnings = [e for e in events(cluster, namespace, name) if e["type"] == "Warning"]
    assert [(e["reason"], e.get("count", 1)) for e in warnings] == [("InvalidSpec", 1)]
    assert children(cluster, namespace, name) == {}
    assert operator.output().count("invalid spec: memory.resources.memory") == 1  # kopf's permanent failure

    # Fixed: reconciled at once.
    fixed = {"memory": {"resources": {"cpu": "2", "memory": "16Gi"}}}
    cluster.kubectl("patch", "borgcollective", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": fixed}))
    settled(cluster, namespace, name, fixed)
    poll(lambda: condition(cluster, namespace, name, "Ready").get("reason") != "InvalidSpec", "InvalidSpec gone")


def test_an_image_outside_the_allow_list_is_refused_and_nothing_is_applied(
        cluster: KubeCluster, namespace: str, operator: Operator) -> None:
    name = "im"
    apply(cluster, collective(name, namespace, {"agents": {"image": "evil.example/steal-credentials:1"}}))
    poll(lambda: condition(cluster, namespace, name, "Ready").get("reason") == "InvalidSpec", "Ready: InvalidSpec")
    message = condition(cluster, namespace, name, "Ready")["message"]
    assert message.startswith("agents.image evil.example/steal-credentials:1 is not from an allowed repository")
    assert children(cluster, namespace, name) == {}, "no Secret, no pod spec: nothing to hand credentials to"


def test_a_deleted_redis_secret_is_reported_and_never_replaced_while_the_memory_runs(
        cluster: KubeCluster, namespace: str, operator: Operator) -> None:
    name = "ls"
    apply(cluster, collective(name, namespace, None))
    found = settled(cluster, namespace, name, None)
    passwords = found[("Secret", f"{name}-redis")]["data"]

    cluster.kubectl("delete", "secret", f"{name}-redis", "-n", namespace)
    poll(lambda: "is gone while StatefulSet ls-memory runs with its passwords" in
         condition(cluster, namespace, name, "Ready").get("message", ""), "Ready says the Secret is gone")
    ready = condition(cluster, namespace, name, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ReconcileError")
    time.sleep(5)  # two resyncs more: still no new password, and one warning, not one per resync
    assert cluster.kubectl("get", "secret", f"{name}-redis", "-n", namespace, check=False).returncode != 0
    warnings = [e for e in events(cluster, namespace, name) if e["reason"] == "SecretMissing"]
    assert [(e["type"], e.get("count", 1)) for e in warnings] == [("Warning", 1)], warnings
    assert "recreate the Secret with the old passwords" in warnings[0]["message"]

    # Restored with one user's password only: said, not filled in (the operator never writes a Secret twice).
    restored = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": f"{name}-redis", "namespace": namespace},
                "data": {"agent-password": passwords["agent-password"]}}
    apply(cluster, restored)
    poll(lambda: "Secret ls-redis has no monitor-password, admin-password" in
         condition(cluster, namespace, name, "Ready").get("message", ""), "Ready says which keys are missing")
    # The Secret restored with the old passwords: reconciled as before, the error gone, the passwords kept.
    apply(cluster, {**restored, "data": passwords})
    poll(lambda: condition(cluster, namespace, name, "Ready").get("reason") != "ReconcileError", "the error gone")
    assert cluster.get_json("secret", f"{name}-redis", "-n", namespace)["data"] == passwords


def test_managed_children_deleted_one_by_one_come_back(cluster: KubeCluster, namespace: str,
                                                       operator: Operator) -> None:  # fmt: skip
    """A person (or a script) deletes the collective's children one by one: the memory's Service, the config, the
    memory's StatefulSet and its TLS Secret come back by the next reconcile (a child's watch or the resync). The TLS
    Secret comes back as a new certificate, and the memory's and the agents' pod templates roll onto its CA. (The
    passwords' Secret is reported instead of made anew: the test above.)"""
    name = "dc"
    apply(cluster, collective(name, namespace, None))
    found = settled(cluster, namespace, name, None)

    def ca_checksums() -> set[str]:
        return {cluster.get_json("statefulset", part, "-n", namespace)["spec"]["template"]["metadata"]["annotations"]
                [names.MEMORY_CA_ANNOTATION] for part in (f"{name}-memory", f"{name}-agents")}

    before = ca_checksums()
    for kind, child in (("Service", f"{name}-memory"), ("ConfigMap", f"{name}-config"),
                        ("StatefulSet", f"{name}-memory"), ("Secret", f"{name}-memory-tls")):
        old = found[(kind, child)]["metadata"]["uid"]
        started = time.monotonic()
        cluster.kubectl("delete", kind.lower(), child, "-n", namespace, "--wait=true")

        def back(kind: str = kind, child: str = child, old: str = old) -> dict[str, Any] | None:
            now = children(cluster, namespace, name).get((kind, child))
            return now if now is not None and now["metadata"]["uid"] != old else None

        poll(back, f"{kind} {child} made anew", timeout_s=30)
        print(f"\n{kind} {child} deleted -> made anew in {time.monotonic() - started:.1f}s")
    after = poll(lambda: ca_checksums() if ca_checksums() != before and len(ca_checksums()) == 1 else None,
                 "the memory and the agents rolled onto the new CA", timeout_s=30)
    tls = children(cluster, namespace, name)[("Secret", f"{name}-memory-tls")]
    assert after == {hashlib.sha256(base64.b64decode(tls["data"]["ca.crt"])).hexdigest()}
    assert set(settled(cluster, namespace, name, None)) == set(found)
    ready = condition(cluster, namespace, name, "Ready")
    assert ready.get("reason") != "ReconcileError", ready


@pytest.fixture
def without_strimzi(cluster: KubeCluster) -> Iterator[None]:
    """No Strimzi CRDs for the test's duration: those another test installed are put back afterwards."""
    saved = []
    for crd in STRIMZI_CRDS:
        found = cluster.kubectl("get", "crd", crd, "-o", "json", check=False)
        if found.returncode == 0:
            saved.append(json.loads(found.stdout))
            cluster.kubectl("delete", "crd", crd, "--wait=true", "--timeout=60s")
    try:
        yield
    finally:
        for crd in saved:
            crd.pop("status", None)
            for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
                crd["metadata"].pop(key, None)
            cluster.kubectl("create", "-f", "-", input=json.dumps(crd))


def test_strimzi_mode_without_strimzi_says_what_to_install_without_a_retry_storm(
        cluster: KubeCluster, namespace: str, without_strimzi: None, tmp_path: Path) -> None:
    operator = Operator(cluster, tmp_path, "--namespace", namespace).start()
    try:
        apply(cluster, collective("sz", namespace, {"kafka": {"mode": "strimzi"}}))
        poll(lambda: condition(cluster, namespace, "sz", "Ready").get("reason") == "StrimziNotInstalled",
             "Ready: StrimziNotInstalled")
        ready = condition(cluster, namespace, "sz", "Ready")
        assert ready["status"] == "False"
        assert "install Strimzi" in ready["message"] and "Kafka (kafka.strimzi.io/" in ready["message"]
        assert condition(cluster, namespace, "sz", "KafkaReady")["reason"] == "StrimziNotInstalled"
        assert status(cluster, namespace, "sz")["phase"] == "Failed"

        first = _reconciles(operator, "blocked")
        window_s = 6.0
        time.sleep(window_s)
        # Re-checked once per resync (2 s here, 30 s by default) and not more: no retry storm ...
        assert _reconciles(operator, "blocked") - first <= window_s / operator.resync_s + 1
        # ... one Warning event, and nothing applied while Strimzi is missing.
        warnings = [(e["reason"], e.get("count", 1)) for e in events(cluster, namespace, "sz")
                    if e["type"] == "Warning"]
        assert warnings == [("StrimziNotInstalled", 1)]
        assert children(cluster, namespace, "sz") == {}
        assert operator.output().count("waiting for kafka.mode is strimzi") == 1  # the handler's; resyncs are quiet
    finally:
        operator.stop()


def test_killed_mid_reconcile_the_operator_converges_after_a_restart(
        cluster: KubeCluster, namespace: str, tmp_path: Path) -> None:
    from kubernetes import client, watch

    operator = Operator(cluster, tmp_path, "--namespace", namespace).start()
    spec: dict[str, Any] = {}
    want = expected_children("kl", namespace, spec)
    killed = threading.Event()
    try:
        with cluster.api_client() as api:
            core = client.CoreV1Api(api)
            listed = core.list_namespaced_secret(namespace)
            assert listed.metadata is not None
            since = listed.metadata.resource_version
            stream = watch.Watch()

            def kill_at_the_secret() -> None:
                # The reconcile creates the Secret first, then lists what exists and applies the rest: a watch
                # that is already open sees the Secret well before the last child is applied.
                for event in stream.stream(core.list_namespaced_secret, namespace, resource_version=since,
                                           timeout_seconds=60):
                    if event["object"].metadata.name == "kl-redis":
                        operator.kill()
                        killed.set()
                        stream.stop()

            watcher = threading.Thread(target=kill_at_the_secret)
            watcher.start()
            time.sleep(0.5)  # the watch request is on its way before the collective exists
            apply(cluster, collective("kl", namespace, spec))
            watcher.join(timeout=60)
        assert killed.is_set()
        seen_at_kill = set(children(cluster, namespace, "kl"))
        passwords = cluster.get_json("secret", "kl-redis", "-n", namespace)["data"]
        listed = cluster.kubectl("get", "secret", "kl-memory-tls", "-n", namespace, "-o", "json", check=False)
        tls = json.loads(listed.stdout) if listed.returncode == 0 else None
        print(f"\nat SIGKILL: {len(seen_at_kill)} of {len(want)} children")
        assert seen_at_kill < want, "the operator finished before the kill: nothing was mid-reconcile"

        operator.start()
        found = settled(cluster, namespace, "kl", spec)
        # Each child once, owned once; the password is the one the killed run generated.
        uid = cluster.get_json("borgcollective", "kl", "-n", namespace)["metadata"]["uid"]
        assert all([ref["uid"] for ref in obj["metadata"]["ownerReferences"]] == [uid] for obj in found.values())
        assert found[("Secret", "kl-redis")]["data"] == passwords
        if tls:  # made before the kill: kept, not made anew
            assert found[("Secret", "kl-memory-tls")]["data"] == tls["data"]
        workloads = cluster.get_json("deployments,statefulsets", "-n", namespace)["items"]
        assert sorted((w["kind"], w["metadata"]["name"]) for w in workloads) == [
            ("Deployment", "kl-indexer"), ("StatefulSet", "kl-agents"), ("StatefulSet", "kl-kafka"),
            ("StatefulSet", "kl-memory")]
        poll(lambda: status(cluster, namespace, "kl").get("observedGeneration") == 1, "status written")
    finally:
        operator.stop()
        print(f"--- the operator's log (tail) ---\n{operator.output()[-4000:]}")


def test_the_cli_says_in_one_line_what_is_missing(cluster: KubeCluster, tmp_path: Path) -> None:
    with cluster.api_client() as api:
        assert check_crd(api) is None
        missing = check_crd(api, group="nowhere.borg.dev")
    assert missing is not None and "CRD is not installed" in missing
    assert "kubectl apply --server-side -f crds/borg.dev_borgcollectives.yaml" in missing

    # An apiserver that is not there: one line, exit status 1, no traceback.
    config = json.loads(cluster.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"
    unreachable = tmp_path / "unreachable.kubeconfig"
    unreachable.write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-m", "borg_operator", "--metrics-port", "0", "--liveness-port", "0"],
                            env={"KUBECONFIG": str(unreachable), "PATH": "/usr/bin:/bin"}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("borg-operator: cannot reach the Kubernetes API at https://127.0.0.1:")

    bad = subprocess.run([sys.executable, "-m", "borg_operator", "--metrics-port", "70000"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--metrics-port: 70000 is not a port" in bad.stderr


def test_cli_defaults_retry_backoff_and_key_value_logs() -> None:
    import logging

    from borg_operator.__main__ import KeyValueFormatter, parse_args
    from borg_operator.handlers import controlling_collective, retry_delay

    args = parse_args([])
    assert (args.namespace, args.metrics_port, args.liveness_port, args.log_format, args.standalone) == (
        [], 8080, 8081, "json", True)
    assert parse_args(["-n", "a", "--namespace", "b"]).namespace == ["a", "b"]
    for bad in (["--no-such-option"], ["--metrics-port", "70000"], ["--resync-seconds", "0"]):
        with pytest.raises(SystemExit) as exited:
            parse_args(bad)
        assert exited.value.code == 2
    refusal = subprocess.run([sys.executable, "-m", "borg_operator", "--no-such-option"], capture_output=True,
                             text=True, check=False)
    assert refusal.returncode == 2 and refusal.stderr.strip().splitlines() == [
        "borg-operator: error: unrecognized arguments: --no-such-option (borg-operator --help shows the usage)"]
    assert [retry_delay(retry) for retry in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]

    record = logging.LogRecord("kopf.objects", logging.WARNING, __file__, 1, "reconcile failed: %s", ("HTTP 500",),
                               None)
    record.k8s_ref = {"namespace": "rl", "name": "pong"}
    line = KeyValueFormatter().format(record)
    assert line.endswith('level=warning logger=kopf.objects object=rl/pong msg="reconcile failed: HTTP 500"')

    child = {"metadata": {"ownerReferences": [
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x", "controller": True},
        {"apiVersion": "borg.dev/v1alpha1", "kind": "BorgCollective", "name": "pong", "controller": True}]}}
    assert controlling_collective(child) == "pong"
    assert controlling_collective({"metadata": {}}) is None
