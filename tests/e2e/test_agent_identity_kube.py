"""Agent k stays agent k on a cluster: the agents StatefulSet's pods, made by the real controllers and run by kwok.

Full tier (kube-controller-manager, kube-scheduler, kwok's fake nodes; the operator a real process): 8 agents get
the 8 ordinals 0..7 and so 8 distinct agent ids; a deleted pod's replacement has its name and so its id; scaling
down keeps the lower ordinals running untouched and scaling up brings the higher ones back under their old names.
The ids are what ``borgdqn train --member <pod name>`` derives in the pod (``borgdqn.rl.identity``), applied here to
the names the controllers gave. CPU agents, so that the fake nodes' GPUs do not bound the count.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from borg_operator import names
from borgdqn.config import BorgConfig, HiveConfig, ReplayConfig
from borgdqn.rl.identity import collective_member
from tests.harness.kube import GPU_RESOURCE, KubeCluster
from tests.support.kube_helpers import Timeout, apply, namespaces_deleted_after, new_namespace, poll
from tests.support.operator_process import Operator, cluster_picture, collective, install_crds

# The fake nodes are GPU nodes, tainted as such: CPU agents tolerate the taint to land there.
SPEC = {"agents": {"replicas": 8, "gpus": 0, "resources": {"cpu": "1", "memory": "8Gi"},
                   "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]},
        "memory": {"persistence": False, "capacity": 100_000}, "elastic": {"mode": "disabled"}}
CONFIG = BorgConfig(hive=HiveConfig(agents=1), replay=ReplayConfig(backend="redis", redis_url="redis://m:6379/0"))


@pytest.fixture(scope="module")
def cluster(kube_full: KubeCluster) -> Iterator[KubeCluster]:
    install_crds(kube_full)
    with namespaces_deleted_after(kube_full):
        yield kube_full


def running_agents(kube: KubeCluster, namespace: str, count: int) -> dict[str, str] | None:
    """{pod name: uid} of the agent pods once exactly ``count`` exist and all are Running."""
    pods = kube.get_json("pods", "-n", namespace, "-l", names.selector_string("id"))["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    if len(live) != count or any(p["status"].get("phase") != "Running" for p in live):
        return None
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in live}


def test_agent_k_keeps_its_id_through_pod_loss_and_scaling(cluster: KubeCluster, tmp_path: Path) -> None:
    namespace = new_namespace(cluster, "ids")
    operator = Operator(cluster, tmp_path, "--namespace", namespace).start()

    def wait(count: int, what: str) -> dict[str, str]:
        try:
            return poll(lambda: running_agents(cluster, namespace, count), what, timeout_s=120)
        except Timeout as err:
            raise Timeout(f"{err}\n{cluster_picture(cluster, namespace, 'id')}") from None

    try:
        apply(cluster, collective("id", namespace, SPEC))
        eight = wait(8, "8 agent pods Running")
        assert sorted(eight) == sorted(f"id-agents-{k}" for k in range(8))
        members = {pod: collective_member(CONFIG, pod) for pod in eight}
        assert sorted(m.agent_id for m in members.values()) == list(range(8))  # 8 distinct ids
        assert len({m.stream_base for m in members.values()}) == 8 and len({m.seed for m in members.values()}) == 8

        # A lost pod: its replacement is a new pod under the same name, so the same agent.
        cluster.kubectl("delete", "pod", "id-agents-3", "-n", namespace, "--wait=false")
        replaced: dict[str, Any] = poll(
            lambda: (found := running_agents(cluster, namespace, 8)) and found["id-agents-3"] != eight["id-agents-3"]
            and found, "id-agents-3 replaced", timeout_s=120)  # fmt: skip
        assert collective_member(CONFIG, "id-agents-3") == members["id-agents-3"]
        assert {pod: uid for pod, uid in replaced.items() if pod != "id-agents-3"} == \
            {pod: uid for pod, uid in eight.items() if pod != "id-agents-3"}  # nobody else moved

        # kubectl scale down, then up: the lower ordinals run on untouched, the higher ones come back by name.
        cluster.kubectl("scale", "borgcollective/id", "--replicas=3", "-n", namespace)
        three = wait(3, "3 agent pods Running")
        assert three == {pod: replaced[pod] for pod in ("id-agents-0", "id-agents-1", "id-agents-2")}
        cluster.kubectl("scale", "borgcollective/id", "--replicas=5", "-n", namespace)
        five = wait(5, "5 agent pods Running")
        assert sorted(five) == sorted(f"id-agents-{k}" for k in range(5))
        assert sorted(collective_member(CONFIG, pod).agent_id for pod in five) == list(range(5))
    finally:
        operator.stop()
        print(f"--- the operator's log (tail) ---\n{operator.output()[-3000:]}")
