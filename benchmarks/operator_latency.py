"""How fast the operator answers, on the test control plane, and what it costs in memory.

Starts the harness's Kubernetes (tier 1: etcd + kube-apiserver, built and cached by `tests/harness`), installs the
BorgCollective CRD and ECK's CRDs, runs `python -m borg_operator` (cluster-wide, as a subprocess, the way a pod
runs it) and measures, over `--runs` fresh collectives (the default spec: 16 children, ECK included):

* **apply -> all children**: from starting `kubectl apply -f` of a collective to every child the builders render
  existing (polled through one keep-alive client, about every 30 ms); kubectl's own start-up is included;
* **scale -> StatefulSet**: from starting `kubectl scale borgcollective/NAME --replicas=5` to the agents
  StatefulSet's spec saying 5;
* **reconcile**: the operator's own figure for one reconcile (its Prometheus histogram), first and repeated;
* **operator RSS**: resident memory of the operator process after the runs (and its peak, VmHWM).

The baseline, measured in the same run against the same apiserver: the same 16 children rendered up front and
sent with one `kubectl apply --server-side` (no operator in the loop; ownerReferences left out), and
`kubectl scale statefulset/NAME-agents --replicas=5` on that StatefulSet directly. The ratio is ours / baseline:
what the operator adds on top of the apiserver's own work.

    python benchmarks/operator_latency.py [--runs 5]

Targets (issue 6): apply -> children < 2 s, scale -> agents < 1 s, RSS < 150 MB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from kubernetes.dynamic import DynamicClient  # noqa: E402

from borg_operator import names  # noqa: E402
from borg_operator.apply import Applier, discovery_cache_file  # noqa: E402
from borg_operator.builders import OWNED_KINDS, Material  # noqa: E402
from borg_operator.material import fresh_passwords  # noqa: E402
from borg_operator.tls import make_kafka_tls, make_memory_tls  # noqa: E402
from tests.harness.cache import Progress  # noqa: E402
from tests.harness.kube import KubeCluster, ensure_kube, start_kube  # noqa: E402
from tests.support.kube_helpers import new_namespace, poll  # noqa: E402
from tests.support.operator_process import (  # noqa: E402
    Operator,
    collective,
    expected_children,
    install_crds,
    render_collective,
)


def kubectl_async(kube: KubeCluster, *args: str, input: str | None = None) -> subprocess.Popen[str]:
    assert kube.install is not None
    proc = subprocess.Popen([str(kube.install.kubectl), "--kubeconfig", str(kube.kubeconfig), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=kube.tool_env())
    if input is not None:
        assert proc.stdin is not None
        proc.stdin.write(input)
        proc.stdin.close()
    return proc


def existing(applier: Applier, namespace: str, name: str) -> set[tuple[str, str]]:
    selector = ",".join(f"{k}={v}" for k, v in names.instance_selector(name).items())
    found = set()
    for api_version, kind, _ in OWNED_KINDS:
        for item in applier.list(api_version, kind, namespace, selector) or []:
            found.add((kind, item["metadata"]["name"]))
    return found


def status_of(proc: subprocess.Popen[str], what: str) -> None:
    if proc.wait(timeout=60) != 0:
        raise SystemExit(f"{what} failed: {proc.stderr.read() if proc.stderr else ''}")


def reconcile_seconds(operator: Operator) -> tuple[float, float]:
    samples = operator.metrics()
    return (samples.get("borg_operator_reconcile_duration_seconds_sum", 0.0),
            samples.get("borg_operator_reconcile_duration_seconds_count", 0.0))


def vm_hwm(operator: Operator) -> int:
    assert operator.proc is not None
    for line in Path(f"/proc/{operator.proc.pgid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def one_run(kube: KubeCluster, operator: Operator, applier: Applier, name: str) -> tuple[float, float, float | None]:
    """(apply -> children, scale -> agents, the creating reconcile's own time) for a fresh collective."""
    namespace = new_namespace(kube, "bench")
    want = expected_children(name, namespace)
    before = reconcile_seconds(operator)
    started = time.monotonic()
    proc = kubectl_async(kube, "apply", "-f", "-", input=json.dumps(collective(name, namespace)))
    poll(lambda: existing(applier, namespace, name) >= want, "all children", 60, 0.01)
    took = time.monotonic() - started
    status_of(proc, "kubectl apply")
    time.sleep(1.0)  # let the status refresh after the reconcile finish before the next step
    after = reconcile_seconds(operator)
    reconcile = (after[0] - before[0]) / (after[1] - before[1]) if after[1] > before[1] else None

    scaled = time_scale_to_5(kube, applier, namespace, name, f"borgcollective/{name}")
    return took, scaled, reconcile


def time_scale_to_5(kube: KubeCluster, applier: Applier, namespace: str, name: str, target: str) -> float:
    """Seconds from starting `kubectl scale TARGET --replicas=5` to the agents StatefulSet's spec saying 5."""

    def scaled_to_5() -> bool:
        agents = applier.get("apps/v1", "StatefulSet", namespace, names.agents(name)) or {}
        return bool(agents.get("spec", {}).get("replicas") == 5)

    started = time.monotonic()
    proc = kubectl_async(kube, "scale", target, "--replicas=5", "-n", namespace)
    poll(scaled_to_5, "5 replicas", 60, 0.01)
    scaled = time.monotonic() - started
    status_of(proc, f"kubectl scale {target}")
    return scaled


def baseline_run(kube: KubeCluster, applier: Applier, name: str) -> tuple[float, float]:
    """(apply -> children, scale -> agents) without the operator: pre-rendered children, one server-side apply."""
    namespace = new_namespace(kube, "base")
    rendered = render_collective(name, namespace, {}, Material(
        fresh_passwords(), make_memory_tls(name, namespace), make_kafka_tls(name, namespace)))
    want = {(child["kind"], child["metadata"]["name"]) for child in rendered}
    body = json.dumps({"apiVersion": "v1", "kind": "List", "items": rendered})
    started = time.monotonic()
    proc = kubectl_async(kube, "apply", "--server-side", "--field-manager=baseline", "-f", "-", input=body)
    poll(lambda: existing(applier, namespace, name) >= want, "all children (baseline)", 60, 0.01)
    took = time.monotonic() - started
    status_of(proc, "kubectl apply (baseline)")

    return took, time_scale_to_5(kube, applier, namespace, name, f"statefulset/{names.agents(name)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    kube = start_kube(ensure_kube(Progress()))
    workdir = Path(tempfile.mkdtemp(prefix="borg-operator-bench-"))
    operator = None
    try:
        install_crds(kube)
        operator = Operator(kube, workdir, resync_s=30.0).start()
        applier = Applier(DynamicClient(kube.api_client(), cache_file=discovery_cache_file()))

        apply_s: list[float] = []
        scale_s: list[float] = []
        base_apply_s: list[float] = []
        base_scale_s: list[float] = []
        reconciles: list[float] = []
        for run in range(args.runs + 1):  # run 0 warms up (discovery, the apiserver's caches): not counted
            # Alternating with the baseline, so that both see the same apiserver (its caches, etcd's size).
            took, scaled, reconcile = one_run(kube, operator, applier, f"b{run}")
            base_took, base_scaled = baseline_run(kube, applier, f"d{run}")
            if run == 0:
                print(f"warm-up: apply -> children {took:.2f}s (baseline {base_took:.2f}s), scale -> StatefulSet "
                      f"{scaled:.2f}s (baseline {base_scaled:.2f}s)", flush=True)
                continue
            apply_s.append(took)
            scale_s.append(scaled)
            base_apply_s.append(base_took)
            base_scale_s.append(base_scaled)
            if reconcile is not None:
                reconciles.append(reconcile)
        time.sleep(2)
        rss, peak = operator.rss(), vm_hwm(operator)
        total, count = reconcile_seconds(operator)

        def row(what: str, values: list[float], base: list[float] | None, target: str) -> str:
            ours = statistics.median(values)
            if base is None:
                return f"| {what} | {ours:.2f} s | {max(values):.2f} s | - | - | {target} |"
            baseline = statistics.median(base)
            return (f"| {what} | {ours:.2f} s | {max(values):.2f} s | {baseline:.2f} s | {ours / baseline:.2f} "
                    f"| {target} |")

        print(f"\nborg-operator on the test control plane (tier 1), {args.runs} collectives of 16 children each")
        print("| measure | median | worst | baseline (median) | ratio | target |")
        print("| --- | --- | --- | --- | --- | --- |")
        print(row("`kubectl apply` -> all children exist", apply_s, base_apply_s, "< 2 s"))
        print(row("`kubectl scale --replicas=5` -> agents StatefulSet at 5", scale_s, base_scale_s, "< 1 s"))
        print(row("one reconcile (operator's histogram, creating)", reconciles, None, "-"))
        print(f"| mean reconcile over all {count:.0f} (incl. no-op resyncs and scales) | {total / count:.2f} s | - "
              "| - | - | - |")
        print(f"| operator RSS after the runs (peak) | {rss / 2**20:.0f} MiB ({peak / 2**20:.0f} MiB) | - | - | - "
              "| < 150 MB |")
    finally:
        if operator is not None:
            operator.stop()
        kube.stop()


if __name__ == "__main__":
    main()
