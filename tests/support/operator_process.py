"""The operator as the tests and the latency benchmark run it: a real `python -m borg_operator` process against the
harness's apiserver, with the generated CRD (and ECK's) installed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from borg_operator import names
from borg_operator.builders import OWNED_KINDS, Manifest, Material, build_children, build_secrets
from borg_operator.spec import parse_spec
from borg_operator.tls import CA_FILE, CERT_FILE, KAFKA_TLS_KEYS, KEY_FILE
from borgdqn.memory.redis.acl import USERS
from tests.harness.cache import Progress
from tests.harness.kube import KubeCluster, eck_crds
from tests.harness.process import ServerProcess, free_port, rss_bytes, start_server, wait_until
from tests.support.kube_helpers import gpu_pods, wait_established

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "borg.dev_borgcollectives.yaml"
CRD_NAME = "borgcollectives.borg.dev"
T = TypeVar("T")


def install_crds(kube: KubeCluster, *, eck: bool = True) -> None:
    """Our CRD (and ECK's): server-side, so a second install in the same session changes nothing."""
    files = [CRD, *(eck_crds(Progress()) if eck else [])]
    kube.kubectl("apply", "--server-side", "--force-conflicts", *(arg for path in files for arg in ("-f", str(path))))
    wait_established(kube, CRD_NAME, *(("elasticsearches.elasticsearch.k8s.elastic.co",
                                        "kibanas.kibana.k8s.elastic.co") if eck else ()))


def image_properties(container_env: list[dict[str, Any]]) -> dict[str, str]:
    """server.properties as the apache/kafka image writes it from the container's KAFKA_* variables
    (KAFKA_FOO_BAR -> foo.bar, `__` -> `_`, `___` -> `-`); the variables given by value only."""
    out = {}
    for item in container_env:
        name = item["name"]
        if not name.startswith("KAFKA_") or "value" not in item or name in ("KAFKA_HEAP_OPTS", "KAFKA_NODE_ID"):
            continue
        key = name[len("KAFKA_"):].lower().replace("___", "-").replace("__", "\0").replace("_", ".")
        out[key.replace("\0", "_")] = str(item["value"])
    return out


def collective(name: str, namespace: str, spec: dict[str, Any] | None = None,
               annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "borg.dev/v1alpha1", "kind": "BorgCollective", "metadata": meta, "spec": spec or {}}


def render_collective(name: str, namespace: str, spec: dict[str, Any], material: Material,
                      completed: bool = False) -> list[Manifest]:
    """Everything the operator makes of a spec: the create-once Secrets, then the applied children."""
    parsed = parse_spec(spec)
    return [*build_secrets(name, namespace, parsed, material),
            *build_children(name, namespace, parsed, material, completed=completed)]


def expected_children(name: str, namespace: str, spec: dict[str, Any] | None = None) -> set[tuple[str, str]]:
    """(kind, name) of everything the operator makes of this spec (the material does not change the set)."""
    material = Material(passwords={user.secret_key: "unused" for user in USERS},
                        memory_tls=dict.fromkeys((CA_FILE, CERT_FILE, KEY_FILE), "unused"),
                        kafka_tls=dict.fromkeys(KAFKA_TLS_KEYS, "unused"))
    return {(child["kind"], child["metadata"]["name"]) for child in render_collective(name, namespace, spec or {},
                                                                                       material)}


def _resource(api_version: str, plural: str) -> str:
    return f"{plural}.{api_version.split('/')[0]}" if "/" in api_version else plural


def children(kube: KubeCluster, namespace: str, name: str) -> dict[tuple[str, str], Any]:
    """Every object of an owned kind (of those the cluster serves now) labelled with the collective's instance."""
    selector = ",".join(f"{k}={v}" for k, v in names.instance_selector(name).items())
    served = set(kube.kubectl("api-resources", "-o", "name").stdout.split())
    resources = [_resource(api, plural) for api, _, plural in OWNED_KINDS if _resource(api, plural) in served]
    listed = kube.kubectl("get", ",".join(resources), "-n", namespace, "-l", selector, "-o", "json",
                          "--show-managed-fields")
    return {(item["kind"], item["metadata"]["name"]): item for item in json.loads(listed.stdout)["items"]}


def status(kube: KubeCluster, namespace: str, name: str) -> dict[str, Any]:
    return dict(kube.get_json("borgcollective", name, "-n", namespace).get("status") or {})


def condition(kube: KubeCluster, namespace: str, name: str, type_: str) -> dict[str, Any]:
    for found in status(kube, namespace, name).get("conditions") or []:
        if found["type"] == type_:
            return dict(found)
    return {}


def events(kube: KubeCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    listed = kube.get_json("events", "-n", namespace, "--field-selector",
                           f"involvedObject.name={name},involvedObject.kind=BorgCollective")
    return list(listed["items"])


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


class Operator:
    """`python -m borg_operator` as a subprocess (its own process group, killed with the test session)."""

    def __init__(self, kube: KubeCluster, workdir: Path, *args: str, kubeconfig: Path | None = None,
                 resync_s: float = 2.0, log_format: str = "text") -> None:
        self.kube = kube
        self.workdir = workdir
        self.args = args
        self.kubeconfig = kubeconfig or kube.kubeconfig
        self.resync_s = resync_s
        self.log_format = log_format
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.proc: ServerProcess | None = None
        self.starts = 0

    @property
    def log(self) -> Path:
        return self.workdir / f"operator-{self.starts}.log"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "borg_operator", "--metrics-port", str(self.metrics_port), "--liveness-port",
                str(self.liveness_port), "--bind-address", "127.0.0.1", "--log-format", self.log_format,
                "--resync-seconds", str(self.resync_s), *self.args]

    def start(self, wait: bool = True) -> Operator:
        self.starts += 1
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}
        self.proc = start_server("borg-operator", self.command(), self.log, env=env, cwd=ROOT)
        if wait:
            wait_until(self.proc, self.healthy, "serving /healthz", timeout_s=60)
        return self

    def healthy(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2) as response:
            return bool(response.status == 200)

    def metrics(self) -> dict[str, float]:
        """The Prometheus samples, by `name{labels}`."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match and not line.startswith("#"):
                samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
        return samples

    def reconciles(self) -> float:
        return sum(value for key, value in self.metrics().items() if key.startswith("borg_operator_reconciles_total"))

    def rss(self) -> int:
        assert self.proc is not None
        return rss_bytes([self.proc.pgid])

    def output(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in sorted(self.workdir.glob("operator-*.log")))

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace_s=10)
            self.proc = None


@contextmanager
def running_operator(kube: KubeCluster, workdir: Path, *args: str, **kwargs: Any) -> Iterator[Operator]:
    operator = Operator(kube, workdir, *args, **kwargs).start()
    try:
        yield operator
    finally:
        operator.stop()


def cluster_picture(kube: KubeCluster, namespace: str, name: str) -> str:
    """What a failed full-tier wait saw: the condition, the agent pods, the nodes' readiness and taints, who holds
    the GPUs."""
    agents = condition(kube, namespace, name, "AgentsReady")
    pods = [(pod["metadata"]["name"], pod["status"].get("phase"), pod["spec"].get("nodeName"),
             [(c["type"], c["status"], c.get("reason")) for c in pod["status"].get("conditions", [])])
            for pod in kube.get_json("pods", "-n", namespace, "-l", names.selector_string(name))["items"]]
    nodes = [(node["metadata"]["name"], node["spec"].get("taints"),
              [(c["type"], c["status"]) for c in node["status"].get("conditions", []) if c["type"] == "Ready"])
             for node in kube.get_json("nodes")["items"]]
    return f"AgentsReady: {agents}\nagent pods: {pods}\nnodes: {nodes}\nGPUs held by: {gpu_pods(kube)}"
