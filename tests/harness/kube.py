"""A real Kubernetes control plane on 127.0.0.1, envtest-style, in two tiers.

Tier 1 (`start_kube`): etcd and kube-apiserver with TLS, client-certificate authentication, RBAC and
service-account tokens (TokenRequest), plus kubectl and helm. It stores, validates, defaults and authorizes
objects exactly as a cluster does, but nothing acts on them: no controllers, no scheduler, no nodes. Without
the serviceaccount controller a new namespace gets no `default` ServiceAccount, so the ServiceAccount admission
plugin refuses a Pod there unless the test creates that account (Deployments and Jobs are stored either way).

Tier 2 (`KubeCluster.add_full_tier`): kube-controller-manager and kube-scheduler, and kwok, which plays the
kubelets of a few fake GPU nodes (it marks them Ready and turns their scheduled pods Running; no container
ever runs). Deployments, ReplicaSets, garbage collection, scheduling with taints and extended resources
(`nvidia.com/gpu`) all happen for real.

Every binary is built from source by `gobuild` (pinned by the wrapper modules in `gomod/`) and cached, so only
the first run on a machine pays for the build. Certificates, keys and kubeconfigs are generated afresh per
cluster into its temp dir.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from borg_operator.spec import GPU_RESOURCE
from tests.harness.cache import Progress
from tests.harness.errors import HarnessError
from tests.harness.gobuild import GoTool, go_binaries, go_module_dir
from tests.harness.process import RunningPart, ServerProcess, free_port, make_workdir, start_server, wait_until

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

KUBE_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
HELM_VERSION = "v3.22.0"
KWOK_VERSION = "v0.8.0"
ECK_MODULE = "github.com/elastic/cloud-on-k8s/v3"
PROMETHEUS_OPERATOR_MODULE = "github.com/prometheus-operator/prometheus-operator"

# Without these, the binaries report v0.0.0 (helm: v3.22), and kubectl and helm warn about version skew.
# etcd and kwok carry their versions in their source.
KUBE_LDFLAGS = " ".join(["-s", "-w", *(
    f"-X {package}.{name}={value}"
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
    for name, value in (("gitVersion", KUBE_VERSION), ("gitMajor", "1"), ("gitMinor", "36"))
)])
_HELM_LDFLAGS = f"-s -w -X helm.sh/helm/v3/internal/version.version={HELM_VERSION}"

# Measured cold (empty Go build cache, modules already downloaded) on 2 cores, in the order ensure_kube builds
# them: kubectl and kube-scheduler are quick because they reuse what kube-apiserver and the controller-manager
# compiled. Downloading the modules adds well under a minute.
_KUBE_TIER1 = (
    GoTool("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver", expect="~5 min"),
    GoTool("kubectl", "k8s.io/kubernetes/cmd/kubectl", expect="~30 s"),
)
_KUBE_TIER2 = (
    GoTool("kube-controller-manager", "k8s.io/kubernetes/cmd/kube-controller-manager", expect="~1 min"),
    GoTool("kube-scheduler", "k8s.io/kubernetes/cmd/kube-scheduler", expect="~10 s"),
)

SERVICE_CIDR = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
FAKE_NODE_ANNOTATION_VALUE = "fake"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
# The stages kwokctl installs by default: nodes become Ready and keep a lease, pods go Running, complete and
# are removed once deleted (there is no kubelet to finish a graceful deletion).
_KWOK_STAGES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)


@dataclass(frozen=True)
class KubeInstall:
    """Paths of the built binaries; the tier-2 ones are None unless `ensure_kube(full=True)` built them."""

    etcd: Path
    kube_apiserver: Path
    kubectl: Path
    helm: Path
    kube_controller_manager: Path | None = None
    kube_scheduler: Path | None = None
    kwok: Path | None = None
    kwok_source: Path | None = None  # kwok's module source: its default stages live there

    @property
    def full(self) -> bool:
        return None not in (self.kube_controller_manager, self.kube_scheduler, self.kwok, self.kwok_source)


def ensure_kube(progress: Progress, full: bool = False) -> KubeInstall:
    """Builds what tier 1 needs (and tier 2's binaries too when `full`), or finds them in the cache."""
    etcd = go_binaries(progress, "etcd", ETCD_VERSION,
                       [GoTool("etcd", "go.etcd.io/etcd/server/v3", expect="~1.5 min")], ldflags="-s -w")
    kube = go_binaries(progress, "kubernetes", KUBE_VERSION, [*_KUBE_TIER1, *(_KUBE_TIER2 if full else ())],
                       ldflags=KUBE_LDFLAGS)
    helm = go_binaries(progress, "helm", HELM_VERSION,
                       [GoTool("helm", "helm.sh/helm/v3/cmd/helm", expect="~1.5 min")], ldflags=_HELM_LDFLAGS)
    install = KubeInstall(etcd=etcd["etcd"], kube_apiserver=kube["kube-apiserver"], kubectl=kube["kubectl"],
                          helm=helm["helm"])
    if not full:
        return install
    kwok = go_binaries(progress, "kwok", KWOK_VERSION,
                       [GoTool("kwok", "sigs.k8s.io/kwok/cmd/kwok", expect="~1.5 min")], ldflags="-s -w")
    return KubeInstall(etcd=install.etcd, kube_apiserver=install.kube_apiserver, kubectl=install.kubectl,
                       helm=install.helm, kube_controller_manager=kube["kube-controller-manager"],
                       kube_scheduler=kube["kube-scheduler"], kwok=kwok["kwok"],
                       kwok_source=go_module_dir(progress, "kwok", "sigs.k8s.io/kwok"))


def eck_crds(progress: Progress) -> list[Path]:
    """The CustomResourceDefinitions of ECK (Elastic Cloud on Kubernetes), from its Go module at the pinned version."""
    source = go_module_dir(progress, "eck", ECK_MODULE)
    crds = sorted(path for path in (source / "config" / "crds" / "v1" / "resources").glob("*.yaml")
                  if path.name != "kustomization.yaml")
    if not crds:
        raise HarnessError(f"{ECK_MODULE}: no CRDs under {source}/config/crds/v1/resources")
    return crds


def service_monitor_crd(progress: Progress) -> Path:
    """The Prometheus operator's ServiceMonitor CRD at the pinned version (the operator chart's optional
    ServiceMonitor is dry-run against it)."""
    source = go_module_dir(progress, "prometheus", PROMETHEUS_OPERATOR_MODULE)
    crd = source / "example" / "prometheus-operator-crd" / "monitoring.coreos.com_servicemonitors.yaml"
    if not crd.is_file():
        raise HarnessError(f"{PROMETHEUS_OPERATOR_MODULE}: no ServiceMonitor CRD at {crd}")
    return crd


def strimzi_crds(progress: Progress) -> list[Path]:
    """Strimzi's `Kafka` and `KafkaNodePool` CRDs at the pinned version (generated from Maven Central's
    io.strimzi:api by Strimzi's own CRD generator; see tests/harness/strimzi.py)."""
    from tests.harness.strimzi import strimzi_crds as generate  # Maven and Java 21 only when a test asks

    return generate(progress)


# --- certificates -------------------------------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


@dataclass(frozen=True)
class _Pki:
    """A throwaway CA in the cluster's workdir that signs the apiserver's serving cert and every client cert."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"

    @staticmethod
    def create(directory: Path) -> _Pki:
        directory.mkdir(parents=True)
        pki = _Pki(directory)
        # EC P-256 rather than RSA: generating RSA keys costs seconds of CPU on a loaded 2-core machine.
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "borgdqn-test-ca")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=365))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        pki.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(pki.ca_key, _pem_key(key))
        # The service-account signing pair: the apiserver signs tokens (TokenRequest) with the private key and
        # verifies them with the public one; the controller-manager signs legacy token secrets with it.
        sa_key = ec.generate_private_key(ec.SECP256R1())
        _write_private(pki.sa_key, _pem_key(sa_key))
        pki.sa_pub.write_bytes(sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))
        return pki

    def issue(self, name: str, common_name: str, organizations: Sequence[str] = (), *, server: bool = False,
              dns: Sequence[str] = (), ips: Sequence[str] = ()) -> tuple[Path, Path]:
        """Writes `<name>.crt` and `<name>.key` signed by the CA; returns their paths."""
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca_cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([
            *(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ])
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=365))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                                content_commitment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=False, crl_sign=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if dns or ips:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                *(x509.DNSName(host) for host in dns),
                *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips),
            ]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(key_path, _pem_key(key))
        return cert_path, key_path

    def kubeconfig(self, path: Path, server: str, user: str, cert: Path, key: Path) -> Path:
        """A kubeconfig with the CA and the client credentials embedded, so it stands alone."""
        def b64(file: Path) -> str:
            return base64.b64encode(file.read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "borgdqn", "cluster": {"server": server,
                                                          "certificate-authority-data": b64(self.ca_cert)}}],
            "users": [{"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
            "contexts": [{"name": "borgdqn", "context": {"cluster": "borgdqn", "user": user,
                                                          "namespace": "default"}}],
            "current-context": "borgdqn",
            "preferences": {},
        }
        # JSON is YAML, and every client reads it; 0600 because it holds a key (and helm warns otherwise).
        _write_private(path, json.dumps(config, indent=2).encode())
        return path

    def client_context(self, cert: Path, key: Path) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        context.load_cert_chain(str(cert), str(key))
        return context


def _https_get(url: str, context: ssl.SSLContext) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, context=context, timeout=5) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _insecure_healthz(port: int) -> bool:
    """The component's own /healthz; it serves a self-signed cert of its own, so none is verified."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    status, body = _https_get(f"https://127.0.0.1:{port}/healthz", context)
    return status == 200 and body.strip() == "ok"


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bool(response.status == 200)


# --- the cluster --------------------------------------------------------------------------------------------


class ToolError(subprocess.CalledProcessError):
    """A kubectl or helm command failed; unlike CalledProcessError, its message includes the command's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr:\n{self.stderr}\nstdout:\n{self.output}"


@dataclass
class KubeCluster(RunningPart):
    """A running control plane. `kubeconfig` authenticates as cluster admin (O=system:masters)."""

    install: KubeInstall | None = None
    kubeconfig: Path = Path()
    server: str = ""
    detach: bool = False
    fake_nodes: list[str] = field(default_factory=list)

    @property
    def pki(self) -> _Pki:
        return _Pki(self.workdir / "pki")

    @property
    def ca_cert(self) -> Path:
        """The CA that signed the apiserver's serving certificate (for clients that authenticate otherwise)."""
        return self.pki.ca_cert

    def tool_env(self) -> dict[str, str]:
        """Environment for kubectl and helm: everything they cache or configure stays in the workdir."""
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KUBECACHEDIR": str(self.workdir / "kube-cache"),
            "HELM_CACHE_HOME": str(self.workdir / "helm" / "cache"),
            "HELM_CONFIG_HOME": str(self.workdir / "helm" / "config"),
            "HELM_DATA_HOME": str(self.workdir / "helm" / "data"),
        }

    def _run(self, binary: Path, args: Sequence[str], input: str | None, check: bool,
             timeout_s: float) -> subprocess.CompletedProcess[str]:
        cmd = [str(binary), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, env=self.tool_env(),
                                timeout=timeout_s, check=False)
        if check and result.returncode != 0:
            raise ToolError(result.returncode, cmd, result.stdout, result.stderr)
        return result

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """Runs kubectl as cluster admin; raises ToolError (with stderr) on failure when `check`."""
        assert self.install is not None
        return self._run(self.install.kubectl, args, input, check, timeout_s)

    def helm(self, *args: str, input: str | None = None, check: bool = True,
             timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        """Runs helm against this cluster, its caches and config in the workdir."""
        assert self.install is not None
        return self._run(self.install.helm, args, input, check, timeout_s)

    def api_client(self) -> ApiClient:
        """A python `kubernetes` client for this cluster (as admin); close it when done."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    @property
    def full(self) -> bool:
        return any(proc.name == "kwok" for proc in self.processes)

    def add_full_tier(self, install: KubeInstall, nodes: int = 2, gpus_per_node: int = 2, gpu_taint: bool = True,
                      *, detach: bool | None = None) -> None:
        """Adds controller-manager, scheduler and kwok with `nodes` fake GPU nodes; does nothing if already added.

        The new processes join `processes`, so they stop with the cluster. On failure the ones this call
        started are stopped again and the cluster stays a working tier-1 cluster. `detach` defaults to what
        `start_kube` was given.
        """
        if self.full:
            return
        if detach is not None:
            self.detach = detach
        if not install.full:
            raise HarnessError("kube: add_full_tier needs the binaries of ensure_kube(progress, full=True)")
        assert install.kube_controller_manager and install.kube_scheduler and install.kwok and install.kwok_source
        started = len(self.processes)
        try:
            self.add_control_loops(install)
            kwok = self._start_kwok(install.kwok, install.kwok_source)
            names = [f"kwok-gpu-{index}" for index in range(nodes)]
            for name in names:
                self.kubectl("apply", "-f", "-", input=json.dumps(fake_gpu_node(name, gpus_per_node, gpu_taint)))
            wait_until(kwok, lambda: self.nodes_schedulable(names), f"making {nodes} fake nodes Ready",
                       timeout_s=120)
            self.fake_nodes = names
        except BaseException:
            for proc in reversed(self.processes[started:]):
                proc.stop()
            del self.processes[started:]
            raise

    def add_control_loops(self, install: KubeInstall) -> None:
        """Adds kube-controller-manager and kube-scheduler (the part of the full tier a real node needs too);
        does nothing if they run already. The caller stops them again if a later step fails."""
        if any(proc.name == "kube-controller-manager" for proc in self.processes):
            return
        assert install.kube_controller_manager and install.kube_scheduler
        self.install = install
        controller_manager = self._start_controller_manager(install.kube_controller_manager)
        self._start_scheduler(install.kube_scheduler)
        # The serviceaccount controller gives every namespace its `default` account, which the
        # ServiceAccount admission plugin requires of every pod; wait so the first Deployment does not race it.
        wait_until(controller_manager, lambda: self.kubectl("get", "serviceaccount", "default",
                                                            check=False).returncode == 0,
                   "creating the default ServiceAccount", timeout_s=60)

    def _start_controller_manager(self, binary: Path) -> ServerProcess:
        cert, key = self.pki.issue("kube-controller-manager", "system:kube-controller-manager")
        kubeconfig = self.pki.kubeconfig(self.workdir / "kube-controller-manager.kubeconfig", self.server,
                                         "system:kube-controller-manager", cert, key)
        port = free_port()
        proc = start_server("kube-controller-manager", [
            binary,
            f"--kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'kube-controller-manager'}",
            "--leader-elect=false",
            # Each controller acts as its own ServiceAccount, with the narrow RBAC roles a cluster gives it.
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self.pki.sa_key}",
            f"--root-ca-file={self.pki.ca_cert}",
            # Controllers that need a cloud, node CIDRs or signing keys switch themselves off without them.
            "--controllers=*",
        ], self.workdir / "kube-controller-manager.log", detach=self.detach)
        self.processes.append(proc)
        wait_until(proc, lambda: _insecure_healthz(port), "healthy", timeout_s=90)
        return proc

    def _start_scheduler(self, binary: Path) -> ServerProcess:
        cert, key = self.pki.issue("kube-scheduler", "system:kube-scheduler")
        kubeconfig = self.pki.kubeconfig(self.workdir / "kube-scheduler.kubeconfig", self.server,
                                         "system:kube-scheduler", cert, key)
        port = free_port()
        proc = start_server("kube-scheduler", [
            binary,
            f"--kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            "--leader-elect=false",
        ], self.workdir / "kube-scheduler.log", detach=self.detach)
        self.processes.append(proc)
        wait_until(proc, lambda: _insecure_healthz(port), "healthy", timeout_s=90)
        return proc

    def _start_kwok(self, binary: Path, source: Path) -> ServerProcess:
        # kwok alone (unlike kwokctl) has no built-in stages: hand it kwokctl's defaults from its own module.
        stages = []
        for relative in _KWOK_STAGES:
            path = source / relative
            if not path.is_file():
                raise HarnessError(f"kwok {KWOK_VERSION}: stage file {path} is missing from its module")
            stages.append(path.read_text())
        config = self.workdir / "kwok.yaml"
        config.write_text("\n---\n".join(stages))
        cert, key = self.pki.issue("kwok", "kwok", ["system:masters"])
        kubeconfig = self.pki.kubeconfig(self.workdir / "kwok.kubeconfig", self.server, "kwok", cert, key)
        proc = start_server("kwok", [
            binary,
            f"--kubeconfig={kubeconfig}",
            f"--config={config}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}={FAKE_NODE_ANNOTATION_VALUE}",
            # Pod IPs from a range that overlaps neither the service range nor anything on the host.
            "--cidr=10.244.0.1/16",
            "--node-ip=10.250.0.1",
        ], self.workdir / "kwok.log",
            # kwok reads ~/.kwok/kwok.yaml when it exists; its work dir points elsewhere so no stray config counts.
            env={**os.environ, "KWOK_WORKDIR": str(self.workdir / "kwok")}, detach=self.detach)
        self.processes.append(proc)
        return proc

    def nodes_schedulable(self, names: Sequence[str]) -> bool:
        nodes = {item["metadata"]["name"]: item for item in self.get_json("nodes")["items"]}
        for name in names:
            node = nodes.get(name)
            if node is None:
                return False
            ready = [c for c in node.get("status", {}).get("conditions", []) if c["type"] == "Ready"]
            if not ready or ready[0]["status"] != "True":
                return False
            # The node lifecycle controller lifts the not-ready taint only after it has seen the node Ready.
            if any(t["key"].startswith("node.kubernetes.io/") for t in node["spec"].get("taints", [])):
                return False
        return True


def fake_gpu_node(name: str, gpus: int, gpu_taint: bool = True) -> dict[str, Any]:
    """A Node that kwok manages, shaped like a GPU node pool's node (GPU Operator labels, GPU taint)."""
    capacity = {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "500Gi", GPU_RESOURCE: str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {FAKE_NODE_ANNOTATION: FAKE_NODE_ANNOTATION_VALUE, "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.count": str(gpus),
                "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
            },
        },
        "spec": {"taints": [GPU_TAINT] if gpu_taint else []},
        # Nodes may carry a status from creation on; the scheduler reads capacity from here.
        "status": {"capacity": capacity, "allocatable": capacity,
                   "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux",
                                "kubeletVersion": KUBE_VERSION}},
    }


def start_kube(install: KubeInstall, *, detach: bool = False, node_ip: str | None = None) -> KubeCluster:
    """etcd + kube-apiserver on 127.0.0.1 (free ports, temp dir), ready for kubectl, helm and python clients.

    With `node_ip` (the real-node tier) the apiserver also listens on that address and publishes it as the
    `kubernetes` Service's endpoint, so that pods reach it the way they do in a cluster (in-cluster config).
    """
    workdir = make_workdir("kube")
    part = KubeCluster(name="kube", workdir=workdir, install=install, detach=detach)
    try:
        pki = _Pki.create(workdir / "pki")
        etcd_port, peer_port = free_port(), free_port()
        etcd = start_server("etcd", [
            install.etcd,
            "--name=default",
            f"--data-dir={workdir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
            "--initial-cluster-state=new",
            # A test cluster loses nothing worth an fsync; skipping them makes every write fast.
            "--unsafe-no-fsync",
            "--quota-backend-bytes=536870912",
            "--auto-compaction-mode=periodic",
            "--auto-compaction-retention=5m",
            "--log-level=warn",
        ], workdir / "etcd.log", detach=detach)
        part.processes.append(etcd)
        wait_until(etcd, lambda: http_ok(f"http://127.0.0.1:{etcd_port}/health"), "healthy", timeout_s=30)

        serving_cert, serving_key = pki.issue(
            "apiserver", "kube-apiserver", server=True,
            dns=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local"],
            ips=["127.0.0.1", str(next(ipaddress.ip_network(SERVICE_CIDR).hosts())), *([node_ip] if node_ip else [])])
        admin_cert, admin_key = pki.issue("admin", "borgdqn-admin", ["system:masters"])
        # What the apiserver shows a kubelet for `kubectl logs` and `exec` (a real node checks it).
        kubelet_client_cert, kubelet_client_key = pki.issue("apiserver-kubelet-client",
                                                            "kube-apiserver-kubelet-client")
        port = free_port()
        part.server = f"https://127.0.0.1:{port}"
        if node_ip:
            reachable = ["--bind-address=0.0.0.0", f"--advertise-address={node_ip}", "--endpoint-reconciler-type=lease"]
        else:
            # The reconciler would publish 127.0.0.1 as the kubernetes Service endpoint, which validation refuses
            # (loopback); without a real node nothing reaches the apiserver through that Service.
            reachable = ["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none"]
        apiserver = start_server("kube-apiserver", [
            install.kube_apiserver,
            *reachable,
            f"--secure-port={port}",
            f"--cert-dir={workdir / 'apiserver'}",
            f"--tls-cert-file={serving_cert}",
            f"--tls-private-key-file={serving_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            "--profiling=false",
            # A real node's name resolves nowhere but in the cluster: reach kubelets by their address.
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            f"--kubelet-client-certificate={kubelet_client_cert}",
            f"--kubelet-client-key={kubelet_client_key}",
        ], workdir / "kube-apiserver.log", detach=detach)
        part.processes.append(apiserver)
        admin = pki.client_context(admin_cert, admin_key)

        def ready() -> bool:
            status, _ = _https_get(f"{part.server}/readyz", admin)
            return status == 200

        wait_until(apiserver, ready, "ready (/readyz)", timeout_s=120)
        part.kubeconfig = pki.kubeconfig(workdir / "admin.kubeconfig", part.server, "borgdqn-admin", admin_cert,
                                         admin_key)

        # /readyz covers the post-start hooks, but the bootstrap controller creates namespaces on its own
        # schedule: wait until what every test takes for granted exists.
        def bootstrapped() -> bool:
            paths = ("/api/v1/namespaces/default", "/api/v1/namespaces/kube-system",
                     "/api/v1/namespaces/default/services/kubernetes",
                     "/apis/rbac.authorization.k8s.io/v1/clusterroles/cluster-admin")
            return all(_https_get(part.server + path, admin)[0] == 200 for path in paths)

        wait_until(apiserver, bootstrapped, "bootstrapped (default namespace, cluster-admin role)", timeout_s=60)
        wait_until(apiserver, lambda: part.kubectl("get", "namespace", "default", check=False).returncode == 0,
                   "answering kubectl", timeout_s=30)
        part.exports = {"KUBECONFIG": str(part.kubeconfig)}
        return part
    except BaseException:
        part.stop()
        raise
