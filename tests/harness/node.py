"""Tier 3: a real Kubernetes node on this machine, joined to a harness control plane, where pods really run.

containerd + runc run the containers, a CNI bridge gives pods addresses, kubelet and kube-proxy are built from
the Kubernetes module the harness pins, CoreDNS (a build with only the plugins a test cluster needs) answers
cluster names on the node's address, and kube-router's policy controller (its firewall part only) enforces
NetworkPolicies with iptables and ipsets. The node advertises `nvidia.com/gpu` as a count: there are no devices and
no CUDA in it. No registry exists here, so images reach containerd as archives (`tests/harness/images.py`) and
pods use `imagePullPolicy: Never`.

What a node changes on the machine is undone when it stops: the sysctls kubelet and kube-proxy set, the
iptables rules of kube-proxy, kubelet and the CNI plugins (saved before, restored after), the bridge, the network
namespaces and mounts of the pods, the processes (containers and their shims included). Three settings this VM
kind needs (docs/test-harness.md): containerd's `restrict_oom_score_adj` (root here lacks CAP_SYS_RESOURCE),
kubelet's `failCgroupV1: false` with the cgroupfs driver (a cgroup v1 hybrid), and no swap check.
Only one real node can run on a machine at a time (one bridge, one set of iptables rules); it needs root.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.cache import Progress, cache_root, locked, require_tool, run_logged
from tests.harness.errors import HarnessError
from tests.harness.gobuild import GoTool, go_binaries, go_module_dir
from tests.harness.images import BuiltImage, ensure_pause, oci_archive_without
from tests.harness.kube import GPU_RESOURCE, KUBE_LDFLAGS, KUBE_VERSION, SERVICE_CIDR, KubeCluster, http_ok
from tests.harness.process import RunningPart, ServerProcess, free_port, start_server, wait_until

COREDNS_VERSION = "v1.15.0"
KUBE_ROUTER_VERSION = "v2.1.0"  # the only kube-router the Go module proxy here serves
NODE_NAME = "borg-node-0"
BRIDGE = "borg0"
POD_SUBNET = "10.88.0.0/24"
CLUSTER_DOMAIN = "cluster.local"
# Debian packages of the node (root installs them once with apt; nothing starts by itself without systemd).
PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "ipset", "conntrack", "buildah",
            "debootstrap", "gcc")
_TOOLS = ("containerd", "ctr", "runc", "iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore",
          "ipset", "conntrack", "buildah", "debootstrap", "gcc", "ip")
CNI_BIN_DIR = Path("/usr/lib/cni")
# Host settings kubelet (protectKernelDefaults off) and kube-proxy change, restored when the node stops.
_SYSCTLS = ("kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory", "net/ipv4/conf/all/route_localnet",
            "net/ipv4/ip_forward")
_NETNS_DIR = Path("/run/netns")
_WORKDIR_PREFIX = "borgdqn_node-"  # not "borgdqn-*": the stale-dir sweeper must never rmtree through a mount


@dataclass(frozen=True)
class NodeInstall:
    kubelet: Path
    kube_proxy: Path
    coredns: Path
    kube_router: Path
    pause: BuiltImage


def _missing_packages() -> list[str]:
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if not (CNI_BIN_DIR / "bridge").is_file():
        missing.append("CNI plugins")
    return missing


def ensure_packages(progress: Progress) -> None:
    """The node's and the image builds' Debian packages, installed with apt when missing (root)."""
    if not _missing_packages():
        return
    with locked("apt"):  # one apt at a time (the image builds and the node install side by side)
        missing = _missing_packages()
        if not missing:
            return
        if os.geteuid() != 0:
            raise HarnessError(f"real node: {', '.join(missing)} missing; as root: apt-get install -y "
                               f"{' '.join(PACKAGES)}")
        log = cache_root() / "logs" / "apt-node.log"
        with progress.step(f"Installing the node's Debian packages ({', '.join(PACKAGES)})", expect="~30 s"):
            run_logged(["apt-get", "update", "-q"], log, "apt-get update")
            run_logged(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], log,
                       "apt-get install (real node)")


def ensure_node(progress: Progress) -> NodeInstall:
    """The node's packages, kubelet, kube-proxy, CoreDNS and the pause image (built once, then cached)."""
    ensure_packages(progress)
    kube = go_binaries(progress, "kubelet", KUBE_VERSION, [
        GoTool("kubelet", "k8s.io/kubernetes/cmd/kubelet", expect="~30 s after kube-apiserver, ~4 min alone"),
        GoTool("kube-proxy", "k8s.io/kubernetes/cmd/kube-proxy", expect="~10 s"),
    ], ldflags=KUBE_LDFLAGS)
    coredns = go_binaries(progress, "coredns", COREDNS_VERSION,
                          [GoTool("coredns", "borgdqn.test/harness/coredns", expect="~2 min")], ldflags="-s -w")
    kube_router = go_binaries(progress, "kube-router", KUBE_ROUTER_VERSION, [
        GoTool("kube-router", "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router", expect="~2 min")],
        ldflags="-s -w")
    source = go_module_dir(progress, "kubelet", "k8s.io/kubernetes")
    pause = ensure_pause(progress, source / "build" / "pause" / "linux" / "pause.c")
    return NodeInstall(kubelet=kube["kubelet"], kube_proxy=kube["kube-proxy"], coredns=coredns["coredns"],
                       kube_router=kube_router["kube-router"], pause=pause)


def node_ip() -> str:
    """The machine's first global IPv4 address: what pods reach the host (apiserver, DNS) at."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True,
                         check=False).stdout
    for line in out.splitlines():
        match = re.search(r"\binet (\d+\.\d+\.\d+\.\d+)/", line)
        if match:
            return match.group(1)
    raise HarnessError("real node: this machine has no global IPv4 address for the node")


def _read_sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return None


def mounts_under(prefix: str) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as rows:
        for row in rows:
            mountpoint = row.split()[4].replace("\\040", " ")
            if mountpoint == prefix or mountpoint.startswith(prefix.rstrip("/") + "/"):
                found.append(mountpoint)
    return found


def _unmount_all(prefix: str) -> list[str]:
    """Unmounts every mount at or below `prefix`, deepest first; returns the ones that stayed."""
    for _ in range(5):
        mounts = mounts_under(prefix)
        if not mounts:
            return []
        for mountpoint in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)
    return mounts_under(prefix)


def processes_mentioning(needle: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry))
    return pids


@dataclass
class RealNode(RunningPart):
    """A running node: its processes, the cluster it joined, and what it must restore when it stops."""

    cluster: KubeCluster | None = None
    node_name: str = NODE_NAME
    node_ip: str = ""
    images: dict[str, str] = field(default_factory=dict)  # image name -> reference pods use
    _stopped: bool = False

    @property
    def socket(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    def _ctr_command(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args]

    def ctr(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._ctr_command(*args), capture_output=True, text=True, timeout=timeout_s,
                              check=False)

    def import_image(self, image: BuiltImage) -> int:
        """Hands an image to the node's containerd (pods then run it with imagePullPolicy: Never), without the
        layers containerd holds already; returns the bytes of layers it sent."""
        present = set(self.ctr("content", "list", "--quiet", timeout_s=30).stdout.split())
        with subprocess.Popen(self._ctr_command("images", "import", "--all-platforms", "-"), stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as ctr:
            assert ctr.stdin is not None and ctr.stderr is not None
            try:
                sent = oci_archive_without(image, present, ctr.stdin)
            except BrokenPipeError:
                sent = -1  # ctr stopped reading: its error follows
            finally:
                ctr.stdin.close()
            error = ctr.stderr.read().decode(errors="replace").strip()
        if ctr.returncode != 0 or sent < 0:
            raise HarnessError(f"real node: importing {image.reference} failed: {error}")
        self.images[image.name] = image.reference
        return sent

    def image_references(self) -> set[str]:
        return set(self.ctr("images", "list", "--quiet", timeout_s=30).stdout.split())

    def remove_containers(self) -> None:
        """Removes every container (and its snapshot) from containerd's metadata, which outlives the node."""
        containers = self.ctr("containers", "list", "--quiet", timeout_s=30).stdout.split()
        if containers:
            self.ctr("containers", "delete", *containers, timeout_s=120)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        problems = self._teardown()
        if problems:
            raise HarnessError("real node: teardown left " + "; ".join(problems))

    # --- teardown --------------------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Cordons the node and deletes its pods through the API, so that kubelet stops them and the CNI plugin
        releases their addresses and rules (what a forced kill would leave behind)."""
        cluster = self.cluster
        if cluster is None or not any(proc.name == "kubelet" and proc.alive() for proc in self.processes):
            return
        with contextlib.suppress(Exception):
            cluster.kubectl("cordon", self.node_name, check=False, timeout_s=30)
            cluster.kubectl("delete", "pods", "--all-namespaces", f"--field-selector=spec.nodeName={self.node_name}",
                            "--grace-period=5", "--wait=false", check=False, timeout_s=60)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if not self.ctr("tasks", "list", "-q", timeout_s=10).stdout.strip():
                    break
                time.sleep(0.5)

    def _teardown(self) -> list[str]:
        self._drain()
        for proc in reversed(self.processes):
            if proc.name != "containerd":
                proc.stop()
        # Whatever still runs (a pod that ignored the drain): kill its tasks, then containerd and its shims.
        if any(proc.name == "containerd" and proc.alive() for proc in self.processes):
            for task in self.ctr("tasks", "list", "-q", timeout_s=10).stdout.split():
                self.ctr("tasks", "kill", "--signal", "SIGKILL", task, timeout_s=10)
            self.remove_containers()
        for proc in self.processes:
            if proc.name == "containerd":
                proc.stop()
        return restore_host()


def host_state_dir() -> Path:
    """What the machine looked like before the node started, kept until the node is gone: a node whose test
    process was killed is cleaned up by the next start from here."""
    return cache_root() / "run" / "real-node"


def _save_host_state(workdir: Path) -> None:
    state = host_state_dir()
    state.mkdir(parents=True)
    for family in ("iptables", "ip6tables"):
        result = subprocess.run([f"{family}-save"], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise HarnessError(f"real node: {family}-save failed: {result.stderr.strip()}")
        (state / f"{family}.rules").write_text(result.stdout)
    netns = sorted(entry.name for entry in _NETNS_DIR.iterdir()) if _NETNS_DIR.is_dir() else []
    sysctls = {name: value for name in _SYSCTLS if (value := _read_sysctl(name)) is not None}
    (state / "state.json").write_text(json.dumps({"workdir": str(workdir), "netns": netns, "sysctls": sysctls,
                                                  "ipsets": _ipsets()}))


def _ipsets() -> list[str]:
    result = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise HarnessError(f"real node: ipset list failed: {result.stderr.strip()}")
    return sorted(result.stdout.split())


def restore_host() -> list[str]:
    """Undoes what a node did to the machine (from the state saved when it started); returns what it could not.

    Kills what is left of the node's processes, unmounts its pods' network namespaces and its mounts, deletes
    the bridge, puts back the iptables rules, the ipsets and the sysctls, removes kubelet's cgroups and the workdir.
    """
    state_dir = host_state_dir()
    try:
        state = json.loads((state_dir / "state.json").read_text())
    except (OSError, ValueError):
        return []
    problems: list[str] = []
    workdir = Path(state["workdir"])
    for pid in processes_mentioning(str(workdir)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    # The pods' network namespaces (named by containerd's CNI code under /run/netns) and every mount of
    # kubelet and containerd in the workdir.
    if _NETNS_DIR.is_dir():
        for entry in _NETNS_DIR.iterdir():
            if entry.name not in state["netns"] and entry.name.startswith("cni-"):
                subprocess.run(["umount", "-l", str(entry)], capture_output=True, check=False)
                with contextlib.suppress(OSError):
                    entry.unlink()
    stuck = _unmount_all(str(workdir))
    if stuck:
        problems.append(f"mounts {stuck}")
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, check=False)
    for family in ("iptables", "ip6tables"):
        saved = state_dir / f"{family}.rules"
        if saved.is_file():
            problems.extend(_restore_rules(family, saved.read_text()))
    # kube-router's sets, destroyable once the restored rules no longer use them.
    for name in sorted(set(_ipsets()) - set(state.get("ipsets", []))):
        result = subprocess.run(["ipset", "destroy", name], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            problems.append(f"ipset {name} not destroyed ({result.stderr.strip()})")
    for name, value in state["sysctls"].items():
        try:
            Path("/proc/sys", name).write_text(value)
        except OSError as exc:
            problems.append(f"sysctl {name} not restored ({exc})")
    _remove_kubepods_cgroups()
    if not stuck:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)
    return problems


_TABLES = ("filter", "nat", "mangle", "raw")


def _restore_rules(family: str, saved: str) -> list[str]:
    """Puts back the rules saved before the node started. `*-restore` replaces only the tables in its input,
    and a table without rules is not in a dump at all: those are flushed and their chains deleted."""
    problems = []
    for table in _TABLES:
        if f"*{table}" not in saved.splitlines():
            for args in (["-F"], ["-X"]):
                subprocess.run([family, "-t", table, *args], capture_output=True, check=False)
    if saved.strip():
        result = subprocess.run([f"{family}-restore"], input=saved, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            problems.append(f"{family}-restore failed: {result.stderr.strip()}")
    return problems


def _remove_kubepods_cgroups() -> None:
    """kubelet's cgroupfs driver makes `kubepods` in every hierarchy; remove them (empty once pods are gone)."""
    root = Path("/sys/fs/cgroup")
    with contextlib.suppress(OSError):
        for hierarchy in root.iterdir():
            top = hierarchy / "kubepods"
            if not top.is_dir():
                continue
            for directory in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                                    reverse=True):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


# --- bring-up ------------------------------------------------------------------------------------------------


def containerd_root() -> Path:
    """containerd's content store and snapshots, kept between nodes: an image imported once (the agent image is
    5 GB) is there for the next node. Containers are removed when a node stops or starts; old images when a
    node starts with newer ones."""
    return cache_root() / "node-containerd"


def _containerd_config(workdir: Path, pause: str) -> str:
    # restrict_oom_score_adj: containerd would give sandboxes a negative oom_score_adj, which needs
    # CAP_SYS_RESOURCE; root lacks it on this VM kind and every sandbox fails ("can't get final child's PID").
    return f"""version = 2
root = "{containerd_root()}"
state = "{workdir}/containerd/state"
[grpc]
  address = "{workdir}/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{workdir}/cni/net.d"
"""


def _cni_config(workdir: Path) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "borg-node",
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": True, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}],
                      "dataDir": str(workdir / "cni" / "ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def _kubelet_config(node: RealNode, ca: Path, port: int, healthz_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{node.socket}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,  # since 1.35 kubelet refuses cgroup v1 unless told; this VM kind is a v1 hybrid
        "failSwapOn": False,
        "cgroupsPerQOS": True,
        "enforceNodeAllocatable": ["pods"],
        "address": node.node_ip,
        "port": port,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "readOnlyPort": 0,
        # Only clients with a certificate of the harness CA (the apiserver, for logs and exec); any of them
        # may do anything: this node serves one test cluster.
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": str(ca)}},
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDNS": [node.node_ip],
        "clusterDomain": CLUSTER_DOMAIN,
        "serializeImagePulls": False,
        # The imported images can never be pulled again: never collect them, and evict nothing for disk.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "maxPods": 60,
    }


def _corefile(node: RealNode, kubeconfig: Path, health_port: int, ready_port: int) -> str:
    return f""".:53 {{
    bind {node.node_ip}
    errors
    health 127.0.0.1:{health_port}
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} borgdqn
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""


# CoreDNS reads Services, EndpointSlices, Namespaces and Pods; nothing else (its usual ClusterRole).
_COREDNS_RULES = [
    {"apiGroups": [""], "resources": ["services", "pods", "namespaces", "endpoints"], "verbs": ["list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
]
# kube-router's policy controller watches these (its informers start for all of them) and writes nothing.
_KUBE_ROUTER_RULES = [
    {"apiGroups": [""], "resources": ["pods", "namespaces", "nodes", "services", "endpoints"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["list", "watch"]},
]


def _client_kubeconfig(node: RealNode, cluster: KubeCluster, name: str, rules: list[dict[str, Any]]) -> Path:
    """A kubeconfig for the user `borgdqn-test:<name>` (a certificate of the harness CA), bound cluster-wide to
    a ClusterRole of exactly `rules`."""
    user = f"borgdqn-test:{name}"
    rbac = "rbac.authorization.k8s.io"
    for item in (
        {"apiVersion": f"{rbac}/v1", "kind": "ClusterRole", "metadata": {"name": user}, "rules": rules},
        {"apiVersion": f"{rbac}/v1", "kind": "ClusterRoleBinding", "metadata": {"name": user},
         "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": user},
         "subjects": [{"apiGroup": rbac, "kind": "User", "name": user}]},
    ):
        cluster.kubectl("apply", "-f", "-", input=json.dumps(item))
    cert, key = cluster.pki.issue(name, user)
    return cluster.pki.kubeconfig(node.workdir / f"{name}.kubeconfig", cluster.server, user, cert, key)


def start_real_node(cluster: KubeCluster, install: NodeInstall, images: Sequence[BuiltImage] = (),
                    gpus: int = 4, progress: Progress | None = None) -> RealNode:
    """Joins a node to `cluster` (which must run with `node_ip` and its control loops) and imports `images`.

    On failure everything started is stopped and restored, and the error carries the failing part's log tail.
    """
    if os.geteuid() != 0:
        raise HarnessError("real node: needs root (containerd, kubelet, iptables)")
    progress = progress or Progress()
    with locked("real-node"):
        _clear_the_way(progress)
        workdir = Path(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX))
        _save_host_state(workdir)
    node = RealNode(name="node", workdir=workdir, cluster=cluster, node_ip=node_ip())
    try:
        _start_containerd(node, install)
        _hand_images(node, install.pause, images, progress)
        _start_kubelet(node, install, cluster, gpus)
        _start_kube_proxy(node, install, cluster)
        _start_coredns(node, install, cluster)
        _start_network_policies(node, install, cluster)
        node.exports = {"BORGDQN_REAL_NODE": node.node_name}
        return node
    except BaseException:
        with contextlib.suppress(HarnessError):
            node.stop()
        raise


def _clear_the_way(progress: Progress) -> None:
    """One node per machine: refuses while another runs, and first cleans up after one whose process died."""
    state_file = host_state_dir() / "state.json"
    if state_file.exists():
        try:
            workdir = json.loads(state_file.read_text())["workdir"]
        except (OSError, ValueError, KeyError):
            workdir = ""
        alive = [pid for pid in processes_mentioning(workdir) if workdir] if workdir else []
        if any(Path(f"/proc/{pid}/exe").resolve().name in ("kubelet", "containerd") for pid in alive):
            raise HarnessError(f"real node: another real node runs on this machine (its dir {workdir}); stop it "
                               "first (Ctrl-C on its `python -m tests.harness up --real-node`)")
        progress.say(f"real node: cleaning up after a node that did not stop ({workdir})")
        problems = restore_host()
        if problems:
            raise HarnessError("real node: could not clean up after the last node: " + "; ".join(problems))
    elif Path(f"/sys/class/net/{BRIDGE}").exists():
        raise HarnessError(f"real node: bridge {BRIDGE} exists but no node state was recorded; remove it "
                           f"(ip link delete {BRIDGE}) if nothing uses it")


def _start_containerd(node: RealNode, install: NodeInstall) -> ServerProcess:
    config = node.workdir / "containerd.toml"
    (node.workdir / "containerd").mkdir()
    cni = node.workdir / "cni" / "net.d"
    cni.mkdir(parents=True)
    (cni / "10-borg-node.conflist").write_text(json.dumps(_cni_config(node.workdir), indent=2))
    config.write_text(_containerd_config(node.workdir, install.pause.reference))
    proc = start_server("containerd", [require_tool("containerd", "run the node's containers"), "--config", config],
                        node.workdir / "containerd.log")
    node.processes.append(proc)
    wait_until(proc, lambda: node.ctr("version", timeout_s=5).returncode == 0, "answering on its socket",
               timeout_s=30)
    return proc


def _hand_images(node: RealNode, pause: BuiltImage, images: Sequence[BuiltImage], progress: Progress) -> None:
    """Leaves containerd with exactly the pause image and `images`: imports those it lacks (their references
    name their inputs' hash, so a present one is the same image), then removes the others and any container
    left behind by a node that did not stop. New before old: an image rebuilt over the same base shares its
    layers' snapshots with the one it replaces, and the import unpacks only what changed."""
    node.remove_containers()
    present = node.image_references()
    node.import_image(pause)  # tiny, and its tag does not name its source
    for image in images:
        if image.reference in present:
            node.images[image.name] = image.reference
            continue
        with progress.step(f"Importing {image.reference} into the node's containerd",
                           expect="~60 s for all the agent's layers, seconds for a new top layer"):
            sent = node.import_image(image)
        progress.say(f"{image.name}: {sent / 1e6:.0f} MB of layers sent to containerd")
    stale = sorted(present - {pause.reference, *(image.reference for image in images)})
    if stale:
        node.ctr("images", "remove", *stale, timeout_s=120)  # containerd collects the layers no image uses


def _start_kubelet(node: RealNode, install: NodeInstall, cluster: KubeCluster, gpus: int) -> ServerProcess:
    pki = cluster.pki
    cert, key = pki.issue("kubelet", f"system:node:{node.node_name}", ["system:nodes"])
    kubeconfig = pki.kubeconfig(node.workdir / "kubelet.kubeconfig", _reachable_server(cluster, node),
                                f"system:node:{node.node_name}", cert, key)
    config = node.workdir / "kubelet.yaml"
    config.write_text(json.dumps(_kubelet_config(node, pki.ca_cert, free_port(), free_port()), indent=2))
    proc = start_server("kubelet", [
        install.kubelet,
        f"--config={config}",
        f"--kubeconfig={kubeconfig}",
        f"--root-dir={node.workdir / 'kubelet'}",
        f"--cert-dir={node.workdir / 'kubelet-pki'}",
        f"--hostname-override={node.node_name}",
        f"--node-ip={node.node_ip}",
        "--v=1",
    ], node.workdir / "kubelet.log")
    node.processes.append(proc)
    wait_until(proc, lambda: cluster.nodes_schedulable([node.node_name]), "Ready (the node registered)",
               timeout_s=90)
    # The documented way to advertise an extended resource: a JSON patch of the node's status.
    patch = [{"op": "add", "path": f"/status/capacity/{GPU_RESOURCE.replace('/', '~1')}", "value": str(gpus)}]
    cluster.kubectl("patch", "node", node.node_name, "--subresource=status", "--type=json", "-p", json.dumps(patch))
    wait_until(proc, lambda: cluster.get_json("node", node.node_name)["status"].get("allocatable", {})
               .get(GPU_RESOURCE) == str(gpus), f"advertising {gpus} {GPU_RESOURCE}", timeout_s=60)
    return proc


def _reachable_server(cluster: KubeCluster, node: RealNode) -> str:
    return cluster.server.replace("127.0.0.1", node.node_ip)


def _start_kube_proxy(node: RealNode, install: NodeInstall, cluster: KubeCluster) -> ServerProcess:
    pki = cluster.pki
    cert, key = pki.issue("kube-proxy", "system:kube-proxy")  # bound to system:node-proxier by the bootstrap roles
    kubeconfig = pki.kubeconfig(node.workdir / "kube-proxy.kubeconfig", cluster.server, "system:kube-proxy", cert,
                                key)
    healthz = free_port()
    proc = start_server("kube-proxy", [
        install.kube_proxy,
        f"--kubeconfig={kubeconfig}",
        "--proxy-mode=iptables",
        f"--hostname-override={node.node_name}",
        f"--cluster-cidr={POD_SUBNET}",
        # 0: leave the host's conntrack table size alone (it is not ours to change, and the VM refuses it).
        "--conntrack-max-per-core=0",
        f"--healthz-bind-address=127.0.0.1:{healthz}",
        f"--metrics-bind-address=127.0.0.1:{free_port()}",
    ], node.workdir / "kube-proxy.log")
    node.processes.append(proc)
    wait_until(proc, lambda: http_ok(f"http://127.0.0.1:{healthz}/healthz"), "healthy", timeout_s=60)
    return proc


def _start_coredns(node: RealNode, install: NodeInstall, cluster: KubeCluster) -> ServerProcess:
    kubeconfig = _client_kubeconfig(node, cluster, "coredns", _COREDNS_RULES)
    health, ready = free_port(), free_port()
    corefile = node.workdir / "Corefile"
    corefile.write_text(_corefile(node, kubeconfig, health, ready))
    proc = start_server("coredns", [install.coredns, "-conf", corefile], node.workdir / "coredns.log",
                        cwd=node.workdir)
    node.processes.append(proc)
    wait_until(proc, lambda: http_ok(f"http://127.0.0.1:{ready}/ready"), "ready (synced with the apiserver)",
               timeout_s=60)
    return proc


def _start_network_policies(node: RealNode, install: NodeInstall, cluster: KubeCluster) -> ServerProcess:
    """kube-router with only its firewall: the NetworkPolicies of pods on this node become iptables rules and
    ipsets (routing is the bridge's, Services are kube-proxy's)."""
    kubeconfig = _client_kubeconfig(node, cluster, "kube-router", _KUBE_ROUTER_RULES)
    health = free_port()
    proc = start_server("kube-router", [
        install.kube_router,
        f"--kubeconfig={kubeconfig}",
        f"--hostname-override={node.node_name}",
        "--run-firewall=true",
        "--run-router=false",
        "--run-service-proxy=false",
        "--enable-cni=false",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--health-port={health}",
        "--metrics-port=0",
    ], node.workdir / "kube-router.log")
    node.processes.append(proc)
    # Healthy from the start; its first full sync is done when FORWARD jumps to its chain.
    wait_until(proc, lambda: http_ok(f"http://127.0.0.1:{health}/healthz") and "KUBE-ROUTER-FORWARD" in
               subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True, check=False).stdout,
               "syncing NetworkPolicies into iptables", timeout_s=60)
    return proc
