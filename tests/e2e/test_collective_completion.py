"""A collective whose agents all finished their budget succeeds, gives its agents no pods and keeps the rest; a
larger budget gives the pods back.

The operator's reconciler in-process against the harness's real kube-apiserver, with a real Redis for the memory.
The agents' finished marks are written into that Redis as ``borgdqn train --member ... --wait-when-done`` writes
them (``RedisModelStore.mark_finished``; the member's side runs for real in tests/e2e/test_collective_data_path.py).
Stand-ins, for what this machine cannot run: the memory pod's readiness (on tier 1 the memory StatefulSet's status
is patched to one ready pod, as its controller would write it; when the full tier is up, its controller and kwok
make it so), and the memory's Service address, which resolves only in a cluster (the fill reader is pointed at
the harness's redis-server instead of ``NAME-memory.NS.svc:6379``). Removing the pods of a StatefulSet scaled to 0
is the StatefulSet controller's part (tests/e2e/test_agent_identity_kube.py runs it on the full tier).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from borg_operator.apply import Applier
from borg_operator.events import EventPoster
from borg_operator.memory_fill import FillReader, MemoryFill, fetch_fill
from borg_operator.reconcile import Reconciler
from borgdqn.memory.redis.keys import LogShape
from borgdqn.memory.redis.model_store import RedisModelStore
from borgdqn.memory.redis.writer import LogWriter
from tests.harness.kube import GPU_RESOURCE, KubeCluster
from tests.harness.redis import RedisServer
from tests.support.kube_helpers import apply, namespaces_deleted_after, new_namespace, poll
from tests.support.operator_process import collective, events, install_crds

STEPS = 5000
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
SPEC = {"agents": {"replicas": 2, "steps": STEPS}, "memory": {"persistence": False, "capacity": 100_000},
        "elastic": {"mode": "disabled"}}


@pytest.fixture(scope="module")
def cluster(kube: KubeCluster) -> Iterator[KubeCluster]:
    install_crds(kube)
    with namespaces_deleted_after(kube):
        yield kube


@pytest.fixture
def reconciler(cluster: KubeCluster, redis_server: RedisServer) -> Iterator[Reconciler]:
    from kubernetes.dynamic import DynamicClient

    def fetch(host: str, port: int, username: str | None, password: str | None, name: str,
              timeout_s: float, ca: str | None) -> MemoryFill:
        return fetch_fill("127.0.0.1", redis_server.port, None, redis_server.password, name, timeout_s)

    fills = FillReader(timeout_s=5.0, quiet_s=0.0, fetch=fetch)
    with cluster.api_client() as api:
        applier = Applier(DynamicClient(api))
        yield Reconciler(applier, EventPoster(applier), fills=fills)
    fills.close()


def test_every_agent_done_succeeds_releases_the_agents_and_a_larger_budget_brings_them_back(
        cluster: KubeCluster, reconciler: Reconciler, redis_server: RedisServer) -> None:
    namespace = new_namespace(cluster, "done")
    client = redis.Redis.from_url(redis_server.url)
    # The memory as the agents leave it: the log declared, the model store beside it.
    LogWriter(client, "done", LogShape(capacity=100_000, chunk_length=32, frame_shape=(4,),
                                       frame_dtype="<f4")).declare()  # fmt: skip
    store = RedisModelStore(client, "done", budget_bytes=1 << 20)

    def get() -> dict[str, Any]:
        return cluster.get_json("borgcollective", "done", "-n", namespace)

    def status() -> dict[str, Any]:
        reconciler.refresh(namespace, "done")
        return dict(get().get("status") or {})

    def complete(found: dict[str, Any]) -> dict[str, Any]:
        return next(c for c in found.get("conditions", []) if c["type"] == "Complete")

    def settle(message: str) -> dict[str, Any]:
        """The status once the Complete condition says ``message``: the memory is read while its pod is ready (on
        the full tier, kwok's pod readiness can lag a moment)."""
        return poll(lambda: (found := status()) and complete(found)["message"] == message and found,
                    f"Complete: {message}", timeout_s=120)  # fmt: skip

    def agents_wanted() -> int:
        return int(cluster.get_json("statefulset", "done-agents", "-n", namespace)["spec"]["replicas"])

    try:
        apply(cluster, collective("done", namespace, SPEC))
        reconciler.reconcile(get())
        assert agents_wanted() == 2
        assert complete(status())["reason"] == "NotKnown"  # the memory pod is not ready: nothing is read from it
        # The memory pod ready: on tier 1 its controller's status is written here; with the full tier up (the same
        # apiserver, later in a session) the controller writes it once kwok runs the pod on a (GPU-tainted) node.
        cluster.kubectl("patch", "statefulset", "done-memory", "-n", namespace, "--type=merge", "-p", json.dumps(
            {"spec": {"template": {"spec": {"tolerations": [GPU_TOLERATION]}}}}))  # fmt: skip
        # A StatefulSet does not roll a pod that never got ready: the Pending one goes, its successor tolerates.
        cluster.kubectl("delete", "pod", "done-memory-0", "-n", namespace, "--ignore-not-found", "--wait=false")
        cluster.kubectl("patch", "statefulset", "done-memory", "-n", namespace, "--subresource=status",
                        "--type=merge", "-p", json.dumps({"status": {"replicas": 1, "readyReplicas": 1}}))
        settle(f"0/2 agents finished their {STEPS:,} env steps")

        store.mark_finished(0, STEPS)
        settle(f"1/2 agents finished their {STEPS:,} env steps")
        assert agents_wanted() == 2  # agent 0 waits for agent 1

        store.mark_finished(1, STEPS + 4)
        done = settle(f"all 2 agents finished their {STEPS:,} env steps")
        assert done["phase"] == "Succeeded" and done["completed"] == {"steps": STEPS, "agents": 2}
        assert complete(done)["status"] == "True" and done["gpus"] == 0
        # Released at once (not at the next resync): no agent pods; the memory, Kafka and the rest stay as they are.
        assert agents_wanted() == 0
        assert cluster.get_json("statefulset", "done-memory", "-n", namespace)["spec"]["replicas"] == 1
        assert cluster.get_json("statefulset", "done-kafka", "-n", namespace)["spec"]["replicas"] == 1
        assert get()["spec"]["agents"]["replicas"] == 2  # the user's wish is kept
        assert cluster.get_json("borgcollective", "done", "-n", namespace, "--subresource=scale")["spec"][
            "replicas"] == 2
        succeeded = [e for e in events(cluster, namespace, "done") if e["reason"] == "Succeeded"]
        assert len(succeeded) == 1 and succeeded[0]["type"] == "Normal"
        row = cluster.kubectl("get", "borg", "done", "-n", namespace, "-o", "wide", "--no-headers").stdout.split()
        assert "Succeeded" in row, row
        reconciler.reconcile(get())  # a resync changes nothing
        assert agents_wanted() == 0 and status()["phase"] == "Succeeded"

        # A larger budget: the agents get their pods back (and resume from the model store:
        # tests/memory/test_model_store.py).
        cluster.kubectl("patch", "borgcollective", "done", "-n", namespace, "--type=merge",
                        "-p", json.dumps({"spec": {"agents": {"steps": 2 * STEPS}}}))
        reconciler.reconcile(get())
        assert agents_wanted() == 2
        again = settle(f"0/2 agents finished their {2 * STEPS:,} env steps")
        assert again["phase"] != "Succeeded" and "completed" not in again
    finally:
        client.close()
