"""Tier 3: our images, built from their Dockerfiles, running in real pods on a real kubelet.

The harness joins a node to a control plane of its own (containerd + runc, a CNI bridge, kubelet, kube-proxy,
CoreDNS, kube-router's NetworkPolicy controller; `tests/harness/node.py`) and imports the memory, operator and
agent images it built with buildah from the repository's Dockerfiles on a debootstrapped Debian base
(`tests/harness/images.py`). The harness's Kafka listens on the node's address, so pods reach it as a
collective's external Kafka.

Proven: the node is Ready with its GPU count, cluster DNS and the `kubernetes` Service work from a pod; every image
answers `--help` and refuses an unknown argument with one line and exit 2; a collective installed with the two
Helm charts (the operator itself a pod from its image, in-cluster config, the chart's ServiceAccount) trains in
namespaces that enforce the `restricted` Pod Security Standard: agents write to and learn from the shared memory,
the memory's NetworkPolicy lets the operator read it and refuses a pod it does not list, `kubectl scale` adds an
agent that joins, a deleted agent pod comes back and learns again, the memory pod deleted after the agents are
scaled to 0 comes back with exactly the steps it stored (AOF on a persistent volume), no pod logs a traceback,
`helm uninstall` removes every pod, and stopping the node gives the machine back as it was.
Stand-ins, named: `nvidia.com/gpu` is a count the node advertises (no device, no CUDA: agents run torch on the CPU),
the persistent volume is a pre-bound hostPath volume, Elasticsearch and Kibana are off (no ECK).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from borg_operator import names
from borgdqn.memory.redis.acl import AGENT, MONITOR
from borgdqn.proto.borg.v1 import telemetry_pb2 as pb
from borgdqn.telemetry.events import TOPICS, decode_event
from borgdqn.telemetry.memory_monitor import LogPublisher, MemoryMonitor, MemoryNotCreated
from tests.conftest import _terminal
from tests.harness.cache import Progress
from tests.harness.errors import HarnessError
from tests.harness.images import IMAGES, ensure_image
from tests.harness.kafka import KafkaServer, ensure_kafka, start_kafka
from tests.harness.kube import GPU_RESOURCE, KubeCluster, ensure_kube, start_kube
from tests.harness.node import (
    BRIDGE,
    RealNode,
    ensure_node,
    host_state_dir,
    mounts_under,
    node_ip,
    processes_mentioning,
    start_real_node,
)
from tests.support.kube_helpers import Timeout, poll
from tests.support.operator_process import ROOT

pytestmark = pytest.mark.real_node  # and integration, as the whole folder (tests/conftest.py)

GPUS = 4
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}


@dataclass
class Real:
    kube: KubeCluster
    node: RealNode
    kafka: KafkaServer

    def image(self, name: str) -> str:
        return self.node.images[name]


@pytest.fixture(scope="module")
def real(request: pytest.FixtureRequest) -> Iterator[Real]:
    progress = Progress()
    started: list[Any] = []
    with _terminal(request):
        try:
            install = ensure_node(progress)
            images = [ensure_image(progress, name) for name in IMAGES]
            address = node_ip()
            kafka = start_kafka(ensure_kafka(progress), host=address)
            started.append(kafka)
            kube_install = ensure_kube(progress, full=True)
            kube = start_kube(kube_install, node_ip=address)
            started.append(kube)
            kube.add_control_loops(kube_install)
            node = start_real_node(kube, install, images, gpus=GPUS, progress=progress)
            started.append(node)
        except HarnessError as exc:
            for part in reversed(started):
                part.stop()
            pytest.fail(str(exc), pytrace=False)
    try:
        yield Real(kube=kube, node=node, kafka=kafka)
    finally:
        for part in reversed(started):
            part.stop()


def restricted_namespace(kube: KubeCluster, name: str) -> str:
    kube.kubectl("create", "namespace", name)
    kube.kubectl("label", "namespace", name, *(f"{key}={value}" for key, value in RESTRICTED.items()))
    poll(lambda: kube.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
         f"the default ServiceAccount in {name}", timeout_s=60)
    return name


def one_shot_pod(name: str, image: str, args: list[str], *, command: list[str] | None = None,
                 token: bool = False) -> dict[str, Any]:
    """A pod that runs once, as the restricted Pod Security Standard requires a pod to be."""
    container: dict[str, Any] = {
        "name": "main", "image": image, "imagePullPolicy": "Never", "args": args,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "readOnlyRootFilesystem": True},
        "resources": {"limits": {"cpu": "500m", "memory": "512Mi"}},
    }
    if command is not None:
        container["command"] = command
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "automountServiceAccountToken": token,
                 "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                 "containers": [container]},
    }


def terminated(kube: KubeCluster, namespace: str, pod: str, timeout_s: float = 120) -> dict[str, Any]:
    def state() -> dict[str, Any] | None:
        found = kube.get_json("pod", pod, "-n", namespace)
        for status in found.get("status", {}).get("containerStatuses", []):
            if "terminated" in status.get("state", {}):
                return dict(status["state"]["terminated"])
        return None

    return poll(state, f"pod {namespace}/{pod} terminated", timeout_s=timeout_s, interval_s=0.5)


def logs(kube: KubeCluster, namespace: str, pod: str, *args: str) -> str:
    return kube.kubectl("logs", pod, "-n", namespace, *args).stdout


def test_the_node_is_ready_with_gpus_and_pods_reach_dns_and_the_apiserver(real: Real) -> None:
    kube = real.kube
    node = kube.get_json("node", real.node.node_name)
    assert node["status"]["allocatable"][GPU_RESOURCE] == str(GPUS)
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    namespace = restricted_namespace(kube, "probe")
    # The memory image's Python: resolve the apiserver's Service name, then call it with the pod's own token.
    script = (
        "import json, os, socket, ssl, urllib.request\n"
        "sa = '/var/run/secrets/kubernetes.io/serviceaccount'\n"
        "print('uid', os.getuid())\n"
        "print('dns', socket.gethostbyname('kubernetes.default.svc.cluster.local'))\n"
        "request = urllib.request.Request('https://kubernetes.default.svc/version',\n"
        "                                 headers={'Authorization': 'Bearer ' + open(sa + '/token').read()})\n"
        "context = ssl.create_default_context(cafile=sa + '/ca.crt')\n"
        "print('version', json.load(urllib.request.urlopen(request, context=context))['gitVersion'])\n"
    )
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(
        one_shot_pod("probe", real.image("memory"), ["-c", script], command=["python"], token=True)))
    state = terminated(kube, namespace, "probe")
    output = logs(kube, namespace, "probe")
    assert state["exitCode"] == 0, output
    lines = dict(line.split(" ", 1) for line in output.splitlines())
    assert lines["uid"] == "10001"  # the image's user
    assert lines["dns"] == kube.get_json("service", "kubernetes", "-n", "default")["spec"]["clusterIP"]
    assert lines["version"] == "v1.36.3"


# (image, arguments for usage, a word of the usage text)
ENTRYPOINTS = {
    "memory": ("entrypoint.py", "redis-server"),
    "operator": ("usage: borg-operator", "--namespace"),
    "agent": ("usage: borgdqn", "train"),
}


def test_every_image_answers_help_and_refuses_an_unknown_argument(real: Real) -> None:
    kube = real.kube
    namespace = restricted_namespace(kube, "entrypoints")
    for image in ENTRYPOINTS:
        for case, args in (("help", ["--help"]), ("unknown", ["--no-such-option"])):
            kube.kubectl("apply", "-n", namespace, "-f", "-",
                         input=json.dumps(one_shot_pod(f"{image}-{case}", real.image(image), args)))
    for image, (usage, word) in ENTRYPOINTS.items():
        help_state = terminated(kube, namespace, f"{image}-help")
        help_text = logs(kube, namespace, f"{image}-help")
        assert help_state["exitCode"] == 0, help_text
        assert usage in help_text and word in help_text
        unknown_state = terminated(kube, namespace, f"{image}-unknown")
        refusal = logs(kube, namespace, f"{image}-unknown").strip()
        assert unknown_state["exitCode"] == 2, refusal
        assert "--no-such-option" in refusal.splitlines()[-1] and "Traceback" not in refusal


# The collective: CartPole agents on the CPU inside the agent image, each with one advertised GPU and a budget
# that outlasts the test; everything sized to fit a 2-core node next to the operator.
AGENT_STEPS = 10_000_000
CAPACITY = 20_000
STORAGE_CLASS = "borgdqn-test-local"


def collective_values(real: Real) -> dict[str, Any]:
    return {
        "env": {"id": "CartPole-v1", "numEnvs": 2, "frameStack": 1},
        "agents": {
            "replicas": 2, "gpus": 1, "threads": 1, "steps": AGENT_STEPS, "seed": 5,
            "image": real.image("agent"), "imagePullPolicy": "Never",
            # Memory sized by the operator for the replica and a GPU agent (7Gi: a request, the agents use less).
            "resources": {"cpu": "400m", "memory": ""},
            "learner": {"learningStarts": 200, "batchSize": 32, "updateEvery": 4, "targetUpdatePeriod": 100,
                        "lr": 1e-3, "device": "cpu"},
            "network": {"mlpHidden": [32, 32]},
        },
        "memory": {"capacity": CAPACITY, "chunkLength": 16, "outboxSteps": 4096, "modelStoreBytes": 64 << 20,
                   "image": real.image("memory"), "persistence": True,
                   "storage": {"size": "1Gi", "storageClassName": STORAGE_CLASS},
                   "resources": {"cpu": "250m", "memory": "1Gi"}},
        "kafka": {"mode": "external", "bootstrapServers": real.kafka.bootstrap},
        "elastic": {"mode": "disabled"},
    }


def memory_volume(real: Real, namespace: str, cr: str) -> None:
    """A hostPath PersistentVolume bound in advance to the memory's claim (a stand-in for a cluster's storage
    provisioner), its directory owned by the image's user as a provisioner's volume would be."""
    directory = real.node.workdir / "volumes" / f"{namespace}-{cr}-memory"
    directory.mkdir(parents=True)
    directory.chmod(0o700)
    os.chown(directory, 10001, 10001)
    claim = f"data-{names.memory(cr)}-0"
    for manifest in (
        {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": STORAGE_CLASS},
         "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "Immediate"},
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{namespace}-{cr}-memory"},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                  "storageClassName": STORAGE_CLASS, "persistentVolumeReclaimPolicy": "Retain",
                  "hostPath": {"path": str(directory), "type": "Directory"},
                  "claimRef": {"namespace": namespace, "name": claim}}},
    ):
        real.kube.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def pods(kube: KubeCluster, namespace: str, selector: str = "") -> list[dict[str, Any]]:
    args = ["-l", selector] if selector else []
    return list(kube.get_json("pods", "-n", namespace, *args)["items"])


def ready(pod: dict[str, Any]) -> bool:
    statuses = pod.get("status", {}).get("containerStatuses", [])
    return pod.get("status", {}).get("phase") == "Running" and bool(statuses) and all(s["ready"] for s in statuses)


def agent_pods(kube: KubeCluster, namespace: str, cr: str) -> dict[str, dict[str, Any]]:
    selector = ",".join(f"{k}={v}" for k, v in names.selector_labels(cr, names.AGENT).items())
    return {pod["metadata"]["name"]: pod for pod in pods(kube, namespace, selector)}


def assert_no_traceback(kube: KubeCluster, running: list[dict[str, Any]]) -> None:
    for pod in running:
        name, where = pod["metadata"]["name"], pod["metadata"]["namespace"]
        for container in pod["spec"]["containers"]:
            text = logs(kube, where, name, "-c", container["name"])
            assert "Traceback" not in text, f"{name}/{container['name']}:\n{text[-3000:]}"


class Memory:
    """The collective's Redis, read from the host through its ClusterIP Service (kube-proxy's rules) as the
    memory's read-only monitor user."""

    def __init__(self, kube: KubeCluster, namespace: str, cr: str) -> None:
        secret = kube.get_json("secret", names.redis_secret(cr), "-n", namespace)
        address = kube.get_json("service", names.memory(cr), "-n", namespace)["spec"]["clusterIP"]
        self.cr = cr
        tls = kube.get_json("secret", names.memory_tls_secret(cr), "-n", namespace)
        # TLS only, verified against the collective's CA; by the Service's IP, which the certificate does not name
        # (it names the Service's DNS names, which the host cannot resolve): the chain is checked, not the name.
        self.clients = {user.name: redis.Redis(
            host=address, port=6379, username=user.name, socket_timeout=5, socket_connect_timeout=5,
            password=base64.b64decode(secret["data"][user.secret_key]).decode(), ssl=True,
            ssl_ca_data=base64.b64decode(tls["data"]["ca.crt"]).decode(), ssl_check_hostname=False)
            for user in (AGENT, MONITOR)}
        self.client = self.clients[MONITOR.name]
        self.last_error: str | None = None

    def assert_least_privilege(self) -> None:
        """The memory pod's Redis runs the users its image rendered: an agent may not run an admin command or
        touch another memory's keys, the monitor may not write."""
        agent, monitor = self.clients[AGENT.name], self.clients[MONITOR.name]
        own = f"borg:{{{self.cr}}}:config"
        for refused in (agent.flushall, lambda: agent.config_get("maxmemory"),
                        lambda: agent.get("borg:{another}:config"), lambda: monitor.set(own, b"{}")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
        plain = redis.Redis(host=self.clients[MONITOR.name].connection_pool.connection_kwargs["host"], port=6379,
                            socket_timeout=5, socket_connect_timeout=5)
        with pytest.raises(redis.ConnectionError):  # no plaintext on the memory's port
            plain.ping()
        assert monitor.get(own) is not None  # what the memory's users may do, they can

    def per_agent(self) -> dict[int, int]:
        """Steps stored now, by agent ({} while Redis does not answer or holds no memory yet)."""
        try:
            return MemoryMonitor(self.client, self.cr, LogPublisher()).read().per_agent
        except (redis.RedisError, MemoryNotCreated) as err:  # the memory pod restarting; no agent has linked yet
            self.last_error = f"{type(err).__name__}: {err}"
            return {}

    def when(self, test: Callable[[dict[int, int]], bool]) -> dict[int, int] | None:
        """The per-agent counts if they pass `test` (for `poll`)."""
        counts = self.per_agent()
        return counts if test(counts) else None


def training_reports(bootstrap: str, collective: str, until: Callable[[dict[str, pb.TrainingReport]], bool],
                     timeout_s: float) -> dict[str, pb.TrainingReport]:
    """The latest training report of each producer (source id: `<collective>/agent-<k>/<random>`, one per process
    life) on Kafka, read from the beginning until `until` holds or `timeout_s` passed."""
    from aiokafka import AIOKafkaConsumer

    async def read() -> dict[str, pb.TrainingReport]:
        consumer = AIOKafkaConsumer(TOPICS["training"], bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    group_id=f"test-{time.monotonic_ns()}", auto_offset_reset="earliest")
        await consumer.start()
        found: dict[str, pb.TrainingReport] = {}
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and not until(found):
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        event: pb.TelemetryEvent = decode_event(record.value)
                        if event.header.collective == collective and event.HasField("training"):
                            found[event.header.source_id] = event.training
            return found
        finally:
            await consumer.stop()

    return asyncio.run(read())


def learning(reports: dict[str, pb.TrainingReport]) -> dict[int, set[str]]:
    """agent -> the producers (pod lives) of that agent that reported a loss."""
    agents: dict[int, set[str]] = {}
    for source, report in reports.items():
        if report.HasField("loss"):
            agents.setdefault(report.agent, set()).add(source)
    return agents


# The memory speaks TLS only; this probe asks whether Redis answers at all, so it does not verify the certificate.
REDIS_PROBE = """
import socket, ssl, sys, time
host, listed = sys.argv[1], sys.argv[2] == "listed"
print("resolved", socket.gethostbyname(host), flush=True)
deadline = time.monotonic() + (60 if listed else 10)  # a listed pod: until the enforcer has its address
unverified = ssl.create_default_context()
unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
while True:
    try:
        with unverified.wrap_socket(socket.create_connection((host, 6379), timeout=2)) as connection:
            connection.sendall(b"PING\\r\\n")
            print("reply", connection.recv(64).decode().strip(), connection.version(), flush=True)
            sys.exit(0)
    except OSError as exc:
        if time.monotonic() > deadline:
            print("no connection", type(exc).__name__, flush=True)
            sys.exit(1)
        time.sleep(1)
"""


def assert_memory_admits_only_listed_pods(real: Real, namespace: str, cr: str) -> None:
    """Two pods of the memory image in the collective's namespace knock on Redis: one without labels (no policy
    lists it), one with the operator's `app.kubernetes.io/name` (the policy admits it from any namespace)."""
    kube = real.kube
    host = f"{names.memory(cr)}.{namespace}.svc.cluster.local"
    for case in ("unlisted", "listed"):
        pod = one_shot_pod(f"redis-probe-{case}", real.image("memory"), ["-c", REDIS_PROBE, host, case],
                           command=["python"])
        if case == "listed":
            pod["metadata"]["labels"] = {names.LABEL_NAME: names.OPERATOR_APP}
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
    outcome = {}
    for case in ("unlisted", "listed"):
        state = terminated(kube, namespace, f"redis-probe-{case}")
        outcome[case] = (state["exitCode"], logs(kube, namespace, f"redis-probe-{case}"))
        kube.kubectl("delete", "pod", f"redis-probe-{case}", "-n", namespace, "--wait=false")
    listed_code, listed_log = outcome["listed"]
    assert listed_code == 0 and "reply -NOAUTH" in listed_log, listed_log  # Redis itself answered, over TLS
    assert "TLSv1.3" in listed_log or "TLSv1.2" in listed_log, listed_log
    unlisted_code, unlisted_log = outcome["unlisted"]
    assert unlisted_code == 1 and "resolved 10." in unlisted_log and "no connection" in unlisted_log, unlisted_log


def test_a_collective_trains_scales_heals_and_uninstalls_in_real_pods_under_restricted_pod_security(
        real: Real, tmp_path: Path) -> None:
    kube, cr = real.kube, "cart"
    home = restricted_namespace(kube, "borg-system")
    namespace = restricted_namespace(kube, "hive")
    repository, _, tag = real.image("operator").rpartition(":")
    allowed = [real.image(name).rpartition(":")[0] for name in ("agent", "memory")]
    # The operator as a pod of its own image: in-cluster config, the chart's ServiceAccount and RBAC.
    kube.helm("install", "op", str(ROOT / "charts" / "borg-operator"), "--namespace", home, "--wait",
              "--timeout=120s", f"--set=image.repository={repository}", f"--set=image.tag={tag}",
              "--set=image.pullPolicy=Never", "--set=watch.clusterWide=false",
              f"--set=watch.namespaces={{{namespace}}}", f"--set=allowedImages={{{','.join(allowed)}}}",
              "--set=resyncSeconds=5")
    memory_volume(real, namespace, cr)
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(collective_values(real)))

    def members_ready(count: int) -> dict[str, dict[str, Any]] | None:
        found = agent_pods(kube, namespace, cr)
        return found if len(found) == count and all(ready(pod) for pod in found.values()) else None

    def memory_pod() -> dict[str, Any] | None:
        found = [pod for pod in pods(kube, namespace) if pod["metadata"]["name"] == f"{names.memory(cr)}-0"]
        return found[0] if found and ready(found[0]) else None

    seen: dict[str, Memory] = {}

    def picture() -> str:
        pod = f"{names.memory(cr)}-0"
        memory_logs = "".join(
            kube.kubectl("logs", pod, "-c", part, "-n", namespace, "--tail=40", check=False).stdout
            for part in ("redis", "monitor"))
        memory_logs += kube.kubectl("exec", pod, "-c", "redis", "-n", namespace, "--", "ls", "-la", "/data",
                                    "/data/appendonlydir", check=False).stdout
        return (kube.kubectl("get", "borg,pods,pvc", "-n", namespace, "-o", "wide", check=False).stdout
                + kube.kubectl("get", "borg", cr, "-n", namespace, "-o", "jsonpath={.status.conditions}",
                               check=False).stdout
                + f"\nthe test's memory client, last error: {seen['memory'].last_error if seen else None}\n"
                + memory_logs)

    def wait(check: Callable[[], Any], what: str, timeout_s: float = 180) -> Any:
        try:
            return poll(check, what, timeout_s=timeout_s, interval_s=1)
        except Timeout as err:
            raise Timeout(f"{err}\n{picture()}") from None

    def learners(until: Callable[[dict[int, set[str]]], bool]) -> dict[int, set[str]]:
        return learning(training_reports(real.kafka.bootstrap, cr, lambda r: until(learning(r)), timeout_s=240))

    try:
        kube.helm("install", cr, str(ROOT / "charts" / "borg-collective"), "--namespace", namespace,
                  "-f", str(tmp_path / "values.yaml"))
        first_memory = wait(memory_pod, "the memory pod Ready (Redis and its monitor)")
        assert [c["name"] for c in first_memory["spec"]["containers"]] == ["redis", "monitor"]
        wait(lambda: members_ready(2), "2 agent pods Ready")

        # The agents write to the shared memory, and learn from it: each reports a loss on Kafka.
        memory = seen["memory"] = Memory(kube, namespace, cr)
        wait(lambda: memory.when(lambda c: {0, 1} <= set(c)), "both agents' steps in Redis")
        assert set(learners(lambda a: {0, 1} <= set(a))) == {0, 1}
        memory.assert_least_privilege()

        # The memory's NetworkPolicy, enforced: the operator (from its namespace) reads the memory for the
        # status; a pod it does not list cannot open a connection to Redis, the same pod with the operator's
        # label can.
        wait(lambda: kube.get_json("borg", cr, "-n", namespace).get("status", {}).get("memory", {}).get("fill"),
             "the memory's fill in the status (the operator reached Redis)")
        assert_memory_admits_only_listed_pods(real, namespace, cr)

        # kubectl scale: a third agent starts and joins the hive (writes, learns).
        kube.kubectl("scale", f"borgcollective/{cr}", "--replicas=3", "-n", namespace)
        wait(lambda: members_ready(3), "3 agent pods Ready")
        wait(lambda: memory.when(lambda c: 2 in c), "agent 2's steps in Redis")
        assert 2 in learners(lambda a: 2 in a)

        # A deleted agent pod comes back (a new pod, the same agent) and learns again: a second producer life.
        victim = f"{names.agents(cr)}-1"
        old_uid = agent_pods(kube, namespace, cr)[victim]["metadata"]["uid"]
        kube.kubectl("delete", "pod", victim, "-n", namespace, "--wait=true", "--timeout=90s")

        def replaced() -> bool:
            members = members_ready(3)
            return members is not None and members[victim]["metadata"]["uid"] != old_uid

        wait(replaced, "a new agent pod 1 Ready")
        assert len(learners(lambda a: len(a.get(1, ())) >= 2)[1]) == 2

        # The memory pod, deleted while no agent writes, comes back on its volume with exactly what it stored.
        assert_no_traceback(kube, list(agent_pods(kube, namespace, cr).values()))
        kube.kubectl("scale", f"borgcollective/{cr}", "--replicas=0", "-n", namespace)
        wait(lambda: agent_pods(kube, namespace, cr) == {}, "every agent pod gone")
        stored = wait(lambda: memory.when(lambda c: {0, 1, 2} <= set(c)), "the memory's counts")
        assert memory.per_agent() == stored  # nothing writes any more
        kube.kubectl("delete", "pod", f"{names.memory(cr)}-0", "-n", namespace, "--wait=true", "--timeout=120s")

        def new_memory_pod() -> dict[str, Any] | None:
            pod = memory_pod()
            return pod if pod and pod["metadata"]["uid"] != first_memory["metadata"]["uid"] else None

        wait(new_memory_pod, "a new memory pod Ready")
        assert wait(lambda: memory.when(bool), "the memory answering again") == stored

        # No container of any pod logged a traceback (the agents' logs were read before they were scaled away).
        remaining = pods(kube, namespace) + pods(kube, home)
        assert len(remaining) == 2  # the memory, the operator
        assert_no_traceback(kube, remaining)
    finally:
        kube.helm("uninstall", cr, "--namespace", namespace, "--wait", "--timeout=120s", check=False)
        poll(lambda: pods(kube, namespace) == [], "every pod of the collective gone", timeout_s=180)
        kube.helm("uninstall", "op", "--namespace", home, "--wait", "--timeout=120s", check=False)
        poll(lambda: pods(kube, home) == [], "the operator's pod gone", timeout_s=120)


def _rules(dump: str) -> set[str]:
    """What iptables-save says that counts: the rules and the user-defined chains, by table (not the comments,
    counters or built-in chains, which an emptied table still lists)."""
    found, table = set(), ""
    for line in dump.splitlines():
        if line.startswith("*"):
            table = line
        elif line.startswith("-A ") or (line.startswith(":") and line.split()[1] == "-"):
            found.add(f"{table} {line.split(' [')[0] if line.startswith(':') else line}")
    return found


def ipsets() -> list[str]:
    return sorted(subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True, check=True).stdout.split())


def test_stopping_the_node_gives_the_machine_back_as_it_was(real: Real) -> None:
    """Runs last in this module: it stops the node the fixture started (stopping twice is a no-op)."""
    state_dir = host_state_dir()
    before = json.loads((state_dir / "state.json").read_text())
    saved = {family: (state_dir / f"{family}.rules").read_text() for family in ("iptables", "ip6tables")}
    running = {family: subprocess.run([f"{family}-save"], capture_output=True, text=True, check=True).stdout
               for family in saved}
    # The node had changed them: kube-proxy's Services, kube-router's policy chains. (Its ipsets went with the
    # last NetworkPolicy; the restore destroys those a killed kube-router leaves.)
    assert any("KUBE-SERVICES" in rules for rules in _rules(running["iptables"]))
    assert any("KUBE-ROUTER-FORWARD" in rules for rules in _rules(running["iptables"]))
    workdir = str(real.node.workdir)
    assert mounts_under(workdir) and Path(f"/sys/class/net/{BRIDGE}").exists()

    real.node.stop()

    for family, dump in saved.items():
        after = subprocess.run([f"{family}-save"], capture_output=True, text=True, check=True).stdout
        assert _rules(after) == _rules(dump), family
    assert {name: Path("/proc/sys", name).read_text().strip() for name in before["sysctls"]} == before["sysctls"]
    assert ipsets() == before["ipsets"]
    assert not Path(f"/sys/class/net/{BRIDGE}").exists()
    assert mounts_under(workdir) == [] and not Path(workdir).exists()
    assert processes_mentioning(workdir) == []
    netns = Path("/run/netns")
    assert (sorted(entry.name for entry in netns.iterdir()) if netns.is_dir() else []) == before["netns"]
    assert not state_dir.exists()
