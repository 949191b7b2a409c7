"""Small helpers the tests that use the `kube` fixture share: a namespace per test, apply, poll with a deadline."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from tests.harness.kube import GPU_RESOURCE, KubeCluster

T = TypeVar("T")


class Timeout(AssertionError):
    """`poll` ran out of time (an AssertionError, so that it reads as a test failure; benchmarks use it too)."""


def poll(check: Callable[[], T | None], what: str, timeout_s: float = 60.0, interval_s: float = 0.1) -> T:
    """Calls `check` until it returns something truthy, which it returns; fails with the last value at the deadline."""
    deadline = time.monotonic() + timeout_s
    last = check()
    while not last:
        if time.monotonic() > deadline:
            raise Timeout(f"not {what} after {timeout_s:.0f}s; last seen: {last!r}")
        time.sleep(interval_s)
        last = check()
    return last


_created: list[str] = []  # by new_namespace, in order (see namespaces_deleted_after)


def new_namespace(kube: KubeCluster, prefix: str) -> str:
    """A fresh namespace (the cluster is shared by the whole session, so every test keeps to its own)."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    kube.kubectl("create", "namespace", name)
    _created.append(name)
    return name


@contextmanager
def namespaces_deleted_after(kube: KubeCluster) -> Iterator[None]:
    """Deletes, on exit, every namespace `new_namespace` made meanwhile: a cluster-wide operator started by a
    later test would otherwise adopt the collectives left in them and run their agents on the fake GPUs."""
    first = len(_created)
    try:
        yield
    finally:
        made = _created[first:]
        if made:
            kube.kubectl("delete", "namespace", *made, "--wait=false", check=False)


def token_kubeconfig(kube: KubeCluster, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates with a TokenRequest token of the ServiceAccount (what a pod mounts)."""
    token = kube.kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
    config = json.loads(kube.kubeconfig.read_text())
    config["users"] = [{"name": account, "user": {"token": token}}]
    config["contexts"][0]["context"]["user"] = account
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def apply(kube: KubeCluster, manifest: dict[str, Any], *args: str) -> None:
    kube.kubectl("apply", *args, "-f", "-", input=json.dumps(manifest))


ROOT = Path(__file__).resolve().parents[2]
BORG_CRD = ROOT / "crds" / "borg.dev_borgcollectives.yaml"


def install_borg_crd(kube: KubeCluster) -> None:
    """Installs the committed BorgCollective CRD (idempotent: every test module that needs it may call it).

    Server-side, since the CRD is too large for client-side apply's last-applied annotation, with
    --force-conflicts so that modules applying it under other field managers do not refuse each other.
    """
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(BORG_CRD))
    wait_established(kube, "borgcollectives.borg.dev")


def wait_established(kube: KubeCluster, *crds: str, timeout_s: float = 60.0) -> None:
    """Polls the CRDs' Established condition (`kubectl wait` fails at once on a CRD that has no conditions yet)."""

    def established(name: str) -> bool:
        conditions = kube.get_json("crd", name).get("status", {}).get("conditions") or []
        return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)

    for name in crds:
        poll(partial(established, name), f"CRD {name} established", timeout_s)


def gpu_pods(kube: KubeCluster) -> list[str]:
    """The pods bound to a node and not finished that request nvidia.com/gpu, all namespaces (`ns/name phase`)."""
    held = []
    for pod in kube.get_json("pods", "--all-namespaces")["items"]:
        if not pod["spec"].get("nodeName") or pod["status"].get("phase") in ("Succeeded", "Failed"):
            continue
        if any(int(c.get("resources", {}).get("requests", {}).get(GPU_RESOURCE, 0)) for c in pod["spec"]["containers"]):
            meta = pod["metadata"]
            deleting = " deleting" if meta.get("deletionTimestamp") else ""
            held.append(f"{meta['namespace']}/{meta['name']} {pod['status'].get('phase')}{deleting}")
    return held


def wait_gpus_free(kube: KubeCluster, timeout_s: float = 120.0) -> None:
    """Until no pod holds a fake GPU (pods of earlier tests' namespaces may still be terminating)."""
    deadline = time.monotonic() + timeout_s
    while held := gpu_pods(kube):
        if time.monotonic() > deadline:
            namespaces = kube.kubectl("get", "namespaces", "--no-headers").stdout
            raise Timeout(f"fake GPUs still held after {timeout_s:.0f}s by {held}; namespaces:\n{namespaces}")
        time.sleep(0.5)
