"""The Helm charts (charts/borg-operator, charts/borg-collective) with the real helm and the real apiserver.

They lint strictly, render, refuse a misspelled value with its path, agree with the code they are generated from
(the CRD, the operator's RBAC rules, the spec's defaults) and every object they render passes the apiserver's
server-side dry-run. The last test is the whole cluster path on the full tier: `helm install` of both charts,
pods Running on the fake GPU nodes, `kubectl scale`, more agents than GPUs, `helm uninstall`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from borg_operator import chart_files, names, rbac
from borg_operator.images import (
    DEFAULT_AGENT_IMAGE,
    DEFAULT_KAFKA_IMAGE,
    DEFAULT_MEMORY_IMAGE,
    IMAGE_TAG,
    OPERATOR_REPOSITORY,
)
from borg_operator.schema import dump
from borg_operator.spec import parse_spec
from tests.harness.cache import Progress
from tests.harness.kube import GPU_RESOURCE, KubeCluster, ToolError, service_monitor_crd
from tests.support.kube_helpers import (
    Timeout,
    namespaces_deleted_after,
    new_namespace,
    poll,
    token_kubeconfig,
    wait_established,
    wait_gpus_free,
)
from tests.support.operator_process import (
    ROOT,
    Operator,
    children,
    cluster_picture,
    condition,
    events,
    expected_children,
    install_crds,
    status,
)

OPERATOR_CHART = ROOT / "charts" / "borg-operator"
COLLECTIVE_CHART = ROOT / "charts" / "borg-collective"


@pytest.fixture(scope="module")
def cluster(kube: KubeCluster) -> Iterator[KubeCluster]:
    install_crds(kube)
    with namespaces_deleted_after(kube):
        yield kube


class _Yaml12Loader(yaml.SafeLoader):
    """Reads floats as Go (and so helm and the apiserver) write them: `1e-06` is a number, not YAML 1.1's string."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."))


def render_text(kube: KubeCluster, chart: Path, release: str, namespace: str, *args: str) -> str:
    return kube.helm("template", release, str(chart), "--namespace", namespace, *args).stdout


def render(kube: KubeCluster, chart: Path, release: str, namespace: str, *args: str) -> list[dict[str, Any]]:
    text = render_text(kube, chart, release, namespace, *args)
    return [doc for doc in yaml.load_all(text, Loader=_Yaml12Loader) if doc]


def dry_run(kube: KubeCluster, rendered: str) -> str:
    """Server-side apply in dry-run of helm's output as it is: the apiserver validates, defaults and admits each
    object, and stores none."""
    return kube.kubectl("apply", "--server-side", "--dry-run=server", "--field-manager=chart-test", "-f", "-",
                        input=rendered).stdout


def by_kind(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        found.setdefault(obj["kind"], []).append(obj)
    return found


def leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_the_generated_chart_files_are_fresh_and_the_crd_is_the_one_in_crds() -> None:
    assert chart_files.stale() == [], "chart files are stale: run `python tools/regenerate.py`"
    chart_crd = OPERATOR_CHART / "crds" / "borg.dev_borgcollectives.yaml"
    assert chart_crd.read_text() == (ROOT / "crds" / "borg.dev_borgcollectives.yaml").read_text()


def test_both_charts_pass_helm_lint_strict(cluster: KubeCluster) -> None:
    for chart in (OPERATOR_CHART, COLLECTIVE_CHART):
        result = cluster.helm("lint", "--strict", str(chart))
        assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("chart", "flags", "message"),
    [
        (OPERATOR_CHART, ["--set", "imag.tag=1"], "additional properties 'imag' not allowed"),
        (OPERATOR_CHART, ["--set", "watch.clusterwide=false"], "at '/watch': additional properties 'clusterwide'"),
        (OPERATOR_CHART, ["--set", "logFormat=xml"], "at '/logFormat'"),
        (COLLECTIVE_CHART, ["--set", "agents.replica=3"], "at '/agents': additional properties 'replica' not allowed"),
        (COLLECTIVE_CHART, ["--set", "agents.gpus=-1"], "at '/agents/gpus'"),
        (COLLECTIVE_CHART, ["--set", "kafka.mode=kraft"], "at '/kafka/mode'"),
        (COLLECTIVE_CHART, ["--set", "agents.learner.lr=0"], "at '/agents/learner/lr'"),
    ],
)
def test_a_wrong_value_fails_helm_install_with_its_path_and_installs_nothing(
        cluster: KubeCluster, chart: Path, flags: list[str], message: str) -> None:
    namespace = new_namespace(cluster, "badvalues")
    result = cluster.helm("install", "bad", str(chart), "--namespace", namespace, *flags, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert json.loads(cluster.helm("list", "--namespace", namespace, "--all", "-o", "json").stdout) == []


def _without_labels(obj: dict[str, Any]) -> dict[str, Any]:
    return {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k != "labels"}}


@pytest.mark.parametrize("watched", [None, ["team-a", "team-b"], []])
def test_the_chart_grants_exactly_the_operators_rules(cluster: KubeCluster, watched: list[str] | None) -> None:
    flags = [] if watched is None else ["--set", "watch.clusterWide=false"]
    flags += [f"--set=watch.namespaces={{{','.join(watched)}}}"] if watched else []
    objects = render(cluster, OPERATOR_CHART, "op", "borg-system", *flags)
    granted = [_without_labels(o) for o in objects
               if o["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]
    # Namespaced with no list: the release's own namespace.
    want = rbac.manifests("op-borg-operator", "borg-system", name="op-borg-operator",
                          watched=None if watched is None else (watched or ["borg-system"]))
    key = lambda o: (o["kind"], o["metadata"].get("namespace", ""))  # noqa: E731
    assert sorted(granted, key=key) == sorted(want, key=key)
    (deployment,) = by_kind(objects)["Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    served = [a.removeprefix("--namespace=") for a in args if a.startswith("--namespace=")]
    assert served == ([] if watched is None else (watched or ["borg-system"]))


def test_every_object_the_operator_chart_renders_passes_the_apiservers_dry_run(cluster: KubeCluster) -> None:
    home, watched = new_namespace(cluster, "borg-system"), new_namespace(cluster, "team")
    cluster.kubectl("apply", "--server-side", "-f", str(service_monitor_crd(Progress())))
    wait_established(cluster, "servicemonitors.monitoring.coreos.com")
    default_text = render_text(cluster, OPERATOR_CHART, "op", home)
    default = list(filter(None, yaml.load_all(default_text, Loader=_Yaml12Loader)))
    assert sorted(by_kind(default)) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service",
                                        "ServiceAccount"]
    namespaced_text = render_text(cluster, OPERATOR_CHART, "op", home, "--set", "watch.clusterWide=false",
                                  f"--set=watch.namespaces={{{watched}}}", "--set", "serviceMonitor.enabled=true",
                                  "--set", "image.digest=sha256:" + "ab" * 32, "--set", "memoryFill=false",
                                  "--set", "allowedImages={registry.example/agent,registry.example/memory}")
    namespaced = list(filter(None, yaml.load_all(namespaced_text, Loader=_Yaml12Loader)))
    assert sorted(by_kind(namespaced)) == ["Deployment", "Role", "RoleBinding", "Service", "ServiceAccount",
                                           "ServiceMonitor"]
    for text, objects in ((default_text, default), (namespaced_text, namespaced)):
        out = dry_run(cluster, text)
        assert out.count("(server dry run)") == len(objects), out
    container = by_kind(namespaced)["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/borg-dqn/borgdqn-operator@sha256:" + "ab" * 32
    assert "--no-memory-fill" in container["args"]
    assert [a for a in container["args"] if a.startswith("--allowed-image")] == [
        "--allowed-image=registry.example/agent", "--allowed-image=registry.example/memory"]
    default_args = by_kind(default)["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in default_args if a.startswith("--allowed-image")], "the operator's own default list"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_collective_chart_is_the_spec_and_every_rendering_passes_the_apiservers_dry_run(
        cluster: KubeCluster, tmp_path: Path) -> None:
    namespace = new_namespace(cluster, "hive")
    default_text = render_text(cluster, COLLECTIVE_CHART, "pong", namespace)
    (default,) = yaml.load_all(default_text, Loader=_Yaml12Loader)
    values = yaml.safe_load((COLLECTIVE_CHART / "values.yaml").read_text())
    assert default["metadata"]["name"] == "pong" and default["spec"] == {
        k: v for k, v in values.items() if k not in ("labels", "annotations")}
    # The example collective's spec as values renders to exactly that spec.
    example = yaml.safe_load((ROOT / "examples" / "borgcollective-pong.yaml").read_text())
    (tmp_path / "pong.yaml").write_text(yaml.safe_dump({**example["spec"], "annotations": {"borg.dev/paused": "true"}}))
    full_text = render_text(cluster, COLLECTIVE_CHART, "pong", namespace, "-f", str(tmp_path / "pong.yaml"))
    (full,) = yaml.load_all(full_text, Loader=_Yaml12Loader)
    assert full["metadata"]["annotations"] == {"borg.dev/paused": "true"}
    merged = parse_spec(full["spec"])  # what the operator reads: the example's fields win over the chart's
    assert merged == parse_spec(example["spec"])
    for text in (default_text, full_text):
        assert "borgcollective.borg.dev/pong serverside-applied (server dry run)" in dry_run(cluster, text)


def test_the_collective_charts_defaults_are_the_crds_and_the_images_are_set_in_one_place() -> None:
    values = yaml.safe_load((COLLECTIVE_CHART / "values.yaml").read_text())
    defaults = dump(parse_spec({}))
    for path, value in leaves({k: v for k, v in values.items() if k not in ("labels", "annotations")}):
        node: Any = defaults
        for part in path.split("."):
            node = node[part]
        assert node == value, f"values.yaml {path}: {value!r}, the CRD's default {node!r}"
    assert values["agents"]["image"] == DEFAULT_AGENT_IMAGE
    assert values["memory"]["image"] == DEFAULT_MEMORY_IMAGE
    assert values["kafka"]["image"] == DEFAULT_KAFKA_IMAGE
    operator_values = yaml.safe_load((OPERATOR_CHART / "values.yaml").read_text())
    assert operator_values["image"]["repository"] == OPERATOR_REPOSITORY
    for chart in (OPERATOR_CHART, COLLECTIVE_CHART):  # an empty image.tag means the appVersion
        assert yaml.safe_load((chart / "Chart.yaml").read_text())["appVersion"] == IMAGE_TAG


@pytest.mark.slow
def test_helm_install_both_charts_then_scale_overcommit_and_uninstall_on_the_full_tier(
        kube_full: KubeCluster, cluster: KubeCluster, tmp_path: Path) -> None:
    kube = kube_full
    wait_gpus_free(kube)  # the fake nodes' 4 GPUs (earlier tests' namespaces are being deleted)
    home, namespace = new_namespace(kube, "borg-system"), new_namespace(kube, "hive")
    installed = kube.helm("install", "op", str(OPERATOR_CHART), "--namespace", home,
                          "--set", "watch.clusterWide=false", f"--set=watch.namespaces={{{namespace}}}").stdout
    assert "kubectl scale borg/pong -n <NS> --replicas=4" in installed  # NOTES.txt: what to do next
    # No container runtime: the operator runs here, as the chart's ServiceAccount (a TokenRequest token).
    kubeconfig = token_kubeconfig(kube, home, "op-borg-operator", tmp_path / "operator.kubeconfig")
    operator = Operator(kube, tmp_path, "--namespace", namespace, kubeconfig=kubeconfig).start()
    values = {"agents": {"replicas": 2, "resources": {"cpu": "1", "memory": "8Gi"}},
              "memory": {"persistence": False, "capacity": 100_000}}
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    try:
        notes = kube.helm("install", "pong", str(COLLECTIVE_CHART), "--namespace", namespace,
                          "-f", str(tmp_path / "values.yaml")).stdout
        assert f"kubectl get borg pong -n {namespace} -w" in notes
        spec = kube.get_json("borgcollective", "pong", "-n", namespace)["spec"]
        want = expected_children("pong", namespace, spec)
        # Agents, memory, Kafka, Elasticsearch, Kibana, the indexer: everything the operator builds for it.
        assert {"Deployment", "StatefulSet", "Elasticsearch", "Kibana", "ConfigMap", "Secret"} <= {k for k, _ in want}
        poll(lambda: set(children(kube, namespace, "pong")) == want, f"children == {sorted(want)}", timeout_s=90)

        def agents_ready(count: int) -> Any:
            current = status(kube, namespace, "pong")
            return current if current.get("agents", {}).get("ready") == count else None

        def agent_pods() -> list[dict[str, Any]]:
            return kube.get_json("pods", "-n", namespace, "-l", names.selector_string("pong"))["items"]

        try:
            poll(lambda: agents_ready(2), "status.agents.ready == 2", timeout_s=120)
            kube.kubectl("scale", "borgcollective/pong", "--replicas=4", "-n", namespace)
            poll(lambda: agents_ready(4), "status.agents.ready == 4", timeout_s=120)
        except Timeout as err:
            raise Timeout(f"{err}\n{cluster_picture(kube, namespace, 'pong')}") from None
        pods = agent_pods()
        assert len(pods) == 4 and all(pod["status"]["phase"] == "Running" for pod in pods)
        assert {pod["spec"]["nodeName"] for pod in pods} <= set(kube.fake_nodes)
        assert all(pod["spec"]["containers"][0]["resources"]["limits"][GPU_RESOURCE] == "1" for pod in pods)

        # A fifth agent on 4 GPUs stays Pending, and the collective's status says why.
        kube.kubectl("scale", "borgcollective/pong", "--replicas=5", "-n", namespace)

        def surplus() -> dict[str, Any] | None:
            found = condition(kube, namespace, "pong", "AgentsReady")
            return found if found.get("reason") == "Unschedulable" and "4/5 agents ready" in found["message"] else None

        try:
            agents = poll(surplus, "AgentsReady: Unschedulable with 4/5 ready", timeout_s=120)
        except Timeout as err:
            raise Timeout(f"{err}\n{cluster_picture(kube, namespace, 'pong')}") from None
        assert agents["status"] == "False" and f"Insufficient {GPU_RESOURCE}" in agents["message"]
        assert sorted(pod["status"]["phase"] for pod in agent_pods()) == ["Pending", *["Running"] * 4]
        assert "Unschedulable" in [e["reason"] for e in events(kube, namespace, "pong") if e["type"] == "Warning"]

        # helm uninstall: the collective goes, and the garbage collector takes every child with it.
        kube.helm("uninstall", "pong", "--namespace", namespace, "--wait", "--timeout=60s")
        poll(lambda: children(kube, namespace, "pong") == {}, "every child garbage-collected", timeout_s=120)
        poll(lambda: kube.get_json("pods", "-n", namespace)["items"] == [], "every pod gone", timeout_s=120)
        with pytest.raises(ToolError, match="NotFound"):
            kube.kubectl("get", "borgcollective", "pong", "-n", namespace)
    finally:
        operator.stop()
        print(f"--- the operator's log (tail) ---\n{operator.output()[-4000:]}")
        kube.helm("uninstall", "op", "--namespace", home, check=False)
