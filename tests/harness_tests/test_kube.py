"""The Kubernetes harness against itself: a real apiserver stores, validates and authorizes; tier 2 schedules."""

from __future__ import annotations

import base64
import ipaddress
import json
from pathlib import Path
from typing import Any, cast

import pytest

from tests.harness.cache import Progress
from tests.harness.kube import GPU_RESOURCE, GPU_TAINT, SERVICE_ACCOUNT_ISSUER, KubeCluster, eck_crds
from tests.support.kube_helpers import apply, new_namespace, poll, wait_gpus_free

pytestmark = pytest.mark.integration

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.harness.borgdqn.test"},
    "spec": {
        "group": "harness.borgdqn.test",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [{
            "name": "v1",
            "served": True,
            "storage": True,
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"spec": {
                    "type": "object",
                    "required": ["size"],
                    "properties": {"size": {"type": "integer", "minimum": 1}, "color": {"type": "string"}},
                }},
            }},
        }],
    },
}


def widget(namespace: str, name: str, size: object) -> dict[str, Any]:
    return {"apiVersion": "harness.borgdqn.test/v1", "kind": "Widget",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"size": size, "color": "teal"}}


def test_crd_objects_are_stored_validated_and_read_by_kubectl_and_python(kube: KubeCluster) -> None:
    from kubernetes import client

    namespace = new_namespace(kube, "crd")
    apply(kube, WIDGET_CRD)
    kube.kubectl("wait", "--for=condition=Established", f"crd/{WIDGET_CRD['metadata']['name']}", "--timeout=60s")
    apply(kube, widget(namespace, "w1", 3))

    listed = kube.kubectl("get", "widgets", "-n", namespace, "--no-headers",
                          "-o", "custom-columns=NAME:.metadata.name,SIZE:.spec.size,COLOR:.spec.color").stdout
    assert listed.split() == ["w1", "3", "teal"]

    with kube.api_client() as api:
        stored = cast(dict[str, Any], client.CustomObjectsApi(api).get_namespaced_custom_object(
            "harness.borgdqn.test", "v1", namespace, "widgets", "w1"))
    assert stored["spec"] == {"size": 3, "color": "teal"}
    assert stored["metadata"]["uid"]

    # The structural schema is enforced by the apiserver, not by kubectl.
    rejected = kube.kubectl("apply", "-f", "-", input=json.dumps(widget(namespace, "w2", "big")), check=False)
    assert rejected.returncode != 0
    assert "spec.size" in rejected.stderr and "integer" in rejected.stderr
    assert kube.kubectl("get", "widget", "w2", "-n", namespace, check=False).returncode != 0


def write_chart(root: Path) -> Path:
    chart = root / "greeter"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: greeter\nversion: 0.1.0\nappVersion: '1.0'\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: {{ .Release.Name }}-greeting\n"
        "data:\n"
        "  greeting: {{ .Values.greeting | quote }}\n"
        "  release: {{ .Release.Name | quote }}\n"
    )
    return chart


def test_helm_renders_installs_and_uninstalls_a_chart(kube: KubeCluster, tmp_path: Path) -> None:
    chart = write_chart(tmp_path)
    rendered = kube.helm("template", "demo", str(chart), "--set", "greeting=bonjour").stdout
    assert 'greeting: "bonjour"' in rendered
    assert "name: demo-greeting" in rendered

    namespace = new_namespace(kube, "helm")
    kube.helm("install", "demo", str(chart), "-n", namespace, "--set", "greeting=hola", "--wait", "--timeout=60s")
    data = kube.get_json("configmap", "demo-greeting", "-n", namespace)["data"]
    assert data == {"greeting": "hola", "release": "demo"}
    releases = json.loads(kube.helm("list", "-n", namespace, "-o", "json").stdout)
    assert [(release["name"], release["status"]) for release in releases] == [("demo", "deployed")]

    kube.helm("uninstall", "demo", "-n", namespace, "--wait")
    poll(lambda: kube.kubectl("get", "configmap", "demo-greeting", "-n", namespace, check=False).returncode != 0,
         "removed by helm uninstall")
    gone = kube.kubectl("get", "configmap", "demo-greeting", "-n", namespace, check=False)
    assert "NotFound" in gone.stderr


def test_rbac_lets_a_service_account_token_read_configmaps_but_not_secrets(kube: KubeCluster) -> None:
    from kubernetes import client

    namespace = new_namespace(kube, "rbac")
    kube.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    kube.kubectl("create", "role", "configmap-reader", "--verb=get,list", "--resource=configmaps", "-n", namespace)
    kube.kubectl("create", "rolebinding", "reader", "--role=configmap-reader",
                 f"--serviceaccount={namespace}:reader", "-n", namespace)
    kube.kubectl("create", "configmap", "visible", "--from-literal=answer=42", "-n", namespace)
    kube.kubectl("create", "secret", "generic", "hidden", "--from-literal=password=hunter2", "-n", namespace)

    token = kube.kubectl("create", "token", "reader", "-n", namespace, "--duration=10m").stdout.strip()
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["iss"] == SERVICE_ACCOUNT_ISSUER
    assert claims["sub"] == f"system:serviceaccount:{namespace}:reader"

    config = client.Configuration(host=kube.server)
    config.ssl_ca_cert = str(kube.ca_cert)
    config.api_key = {"authorization": f"Bearer {token}"}
    with client.ApiClient(config) as api:
        core = client.CoreV1Api(api)
        assert core.read_namespaced_config_map("visible", namespace).data == {"answer": "42"}
        # With the full tier, the controller-manager also publishes kube-root-ca.crt into every namespace.
        listed = core.list_namespaced_config_map(namespace).items
        assert "visible" in [item.metadata.name for item in listed if item.metadata]
        with pytest.raises(client.ApiException) as refused:
            core.read_namespaced_secret("hidden", namespace)
        with pytest.raises(client.ApiException) as refused_list:
            core.list_namespaced_config_map("default")
    assert refused.value.status == 403
    status = json.loads(refused.value.body or "{}")
    assert status["reason"] == "Forbidden"
    assert f"system:serviceaccount:{namespace}:reader" in status["message"]
    assert 'cannot get resource "secrets"' in status["message"]
    assert refused_list.value.status == 403


def elasticsearch(namespace: str, count: object) -> dict[str, Any]:
    return {
        "apiVersion": "elasticsearch.k8s.elastic.co/v1",
        "kind": "Elasticsearch",
        "metadata": {"name": "quickstart", "namespace": namespace},
        "spec": {"version": "8.15.0", "nodeSets": [{"name": "default", "count": count}]},
    }


def test_eck_crds_install_and_validate_elasticsearch_objects(kube: KubeCluster) -> None:
    crds = eck_crds(Progress())
    assert any(path.name == "elasticsearch.k8s.elastic.co_elasticsearches.yaml" for path in crds)
    # Server-side: ECK's CRDs are too big for the last-applied annotation of client-side apply.
    kube.kubectl("apply", "--server-side", *(arg for path in crds for arg in ("-f", str(path))))
    kube.kubectl("wait", "--for=condition=Established", "crd/elasticsearches.elasticsearch.k8s.elastic.co",
                 "--timeout=60s")
    namespace = new_namespace(kube, "eck")

    accepted = kube.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-",
                            input=json.dumps(elasticsearch(namespace, 1)))
    assert "elasticsearch.elasticsearch.k8s.elastic.co/quickstart serverside-applied (server dry run)" in \
        accepted.stdout

    bad = json.dumps(elasticsearch(namespace, "three"))
    # Server-side apply rejects the wrong type when it builds the typed patch from the CRD's schema ...
    rejected = kube.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=bad, check=False)
    assert rejected.returncode != 0
    assert ".spec.nodeSets[0].count: expected numeric (int or float), got string" in rejected.stderr
    # ... and a plain create meets the CRD's OpenAPI validation.
    rejected = kube.kubectl("create", "--dry-run=server", "-f", "-", input=bad, check=False)
    assert rejected.returncode != 0
    assert "spec.nodeSets[0].count: Invalid value" in rejected.stderr
    assert "must be of type integer" in rejected.stderr
    # A dry run stores nothing.
    assert kube.get_json("elasticsearches", "-n", namespace)["items"] == []


def gpu_deployment(namespace: str, name: str, replicas: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {"nvidia.com/gpu.present": "true"},
                    "tolerations": [{"key": GPU_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [{
                        "name": "learner",
                        "image": "registry.invalid/borgdqn-learner:never-pulled",
                        "resources": {"requests": {GPU_RESOURCE: "1", "cpu": "1"}, "limits": {GPU_RESOURCE: "1"}},
                    }],
                },
            },
        },
    }


@pytest.mark.slow
def test_full_tier_schedules_gpu_pods_onto_fake_nodes_and_collects_garbage(kube_full: KubeCluster) -> None:
    kube = kube_full
    # All 4 fake GPUs free first: pods of earlier tests' namespaces may still be terminating.
    wait_gpus_free(kube)
    namespace = new_namespace(kube, "gpu")
    apply(kube, gpu_deployment(namespace, "learner", replicas=2))

    def pods() -> list[dict[str, Any]]:
        return list(kube.get_json("pods", "-n", namespace, "-l", "app=learner")["items"])

    def running() -> list[dict[str, Any]]:
        found = pods()
        return found if len(found) == 2 and all(pod["status"].get("phase") == "Running" for pod in found) else []

    started = poll(running, "2 pods Running", timeout_s=120)
    assert {pod["spec"]["nodeName"] for pod in started} <= set(kube.fake_nodes)
    replica_sets = kube.get_json("replicasets", "-n", namespace, "-l", "app=learner")["items"]
    assert len(replica_sets) == 1
    assert replica_sets[0]["metadata"]["ownerReferences"][0]["kind"] == "Deployment"

    # 2 nodes x 2 GPUs: a fifth GPU pod finds no node, and the real scheduler says why.
    kube.kubectl("scale", "deployment/learner", "--replicas=5", "-n", namespace)

    def one_unschedulable() -> list[dict[str, Any]]:
        found = pods()
        pending = [pod for pod in found if any(
            c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
            for c in pod["status"].get("conditions", []))]
        placed = [pod for pod in found if pod["status"].get("phase") == "Running"]
        return pending if len(found) == 5 and len(placed) == 4 and len(pending) == 1 else []

    pending = poll(one_unschedulable, "4 pods Running and 1 unschedulable", timeout_s=120)
    message = next(c["message"] for c in pending[0]["status"]["conditions"] if c["type"] == "PodScheduled")
    assert f"Insufficient {GPU_RESOURCE}" in message

    kube.kubectl("delete", "deployment", "learner", "-n", namespace, "--wait=false")

    def collected() -> bool:
        leftover_sets = kube.get_json("replicasets", "-n", namespace, "-l", "app=learner")["items"]
        return not leftover_sets and not pods()

    poll(collected, "garbage-collected (ReplicaSet and pods)", timeout_s=120)


@pytest.mark.slow
def test_every_control_plane_process_listens_on_loopback_only(kube_full: KubeCluster) -> None:
    listening = kube_full.listening()
    apiserver_port = int(kube_full.server.rsplit(":", 1)[1])
    assert apiserver_port in {port for _, port in listening}
    assert {address for address, _ in listening} == {ipaddress.ip_address("127.0.0.1")}, listening
    names = {proc.name for proc in kube_full.processes}
    assert {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"} <= names
