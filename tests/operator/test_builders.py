"""The builders (spec -> children): golden manifests for the examples, what matters in them, and every rendered
object through the real apiserver's server-side dry-run, with ECK's and Strimzi's real CRDs installed.

Regenerate the golden files after an intended change: `BORG_UPDATE_GOLDEN=1 pytest tests/operator/test_builders.py`
and read the diff.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from borg_operator import names
from borg_operator.builders import (
    APPLIED_KINDS,
    OWNED_KINDS,
    Material,
    build_children,
    build_secrets,
    children_kinds,
    config_checksum,
)
from borg_operator.builders.agents import GPU_RESOURCE, GPU_TOLERATION
from borg_operator.builders.config import CONFIG_KEY, config_yaml
from borg_operator.builders.kafka import cluster_id
from borg_operator.builders.memory import redis_maxmemory
from borg_operator.builders.secrets import build_redis_secret
from borg_operator.spec import SpecError, kafka_bootstrap, parse_spec, to_borg_config
from borg_operator.tls import CA_FILE, CERT_FILE, KAFKA_TLS_KEYS, KEY_FILE
from borgdqn.config import build_config
from borgdqn.memory.redis.acl import USERS
from borgdqn.memory.redis.sizing import replica_bytes
from tests.harness.cache import Progress
from tests.harness.kube import KubeCluster, eck_crds, strimzi_crds
from tests.support.kube_helpers import install_borg_crd, namespaces_deleted_after, new_namespace, wait_established
from tests.support.operator_process import render_collective

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "operator"
EXAMPLES = {"minimal": ROOT / "examples" / "borgcollective-minimal.yaml",
            "full": ROOT / "examples" / "borgcollective-pong.yaml"}
NAMESPACE = "borg"
# A stand-in password for the golden files (the reconciler generates the real one).
GOLDEN_PASSWORDS = {user.secret_key: f"golden-{user.secret_key}-not-a-real-secret" for user in USERS}
GOLDEN_TLS = {key: f"golden-{key}-not-a-real-pem" for key in (CA_FILE, CERT_FILE, KEY_FILE)}
GOLDEN_KAFKA_TLS = {key: f"golden-kafka-{key}-not-a-real-pem" for key in KAFKA_TLS_KEYS}
UPDATE = os.environ.get("BORG_UPDATE_GOLDEN") == "1"

# Variants beside the examples, for what the examples leave out.
VARIANTS: dict[str, dict[str, Any]] = {
    "cpu-external": {
        "agents": {"gpus": 0, "replicas": 3, "tolerations": [{"key": "spot", "operator": "Exists"}]},
        "memory": {"persistence": False, "capacity": 100_000, "resources": {"cpu": "1", "memory": "2Gi"}},
        "kafka": {"mode": "external", "bootstrapServers": "kafka-0.shared:9092,kafka-1.shared:9092"},
        "elastic": {"mode": "disabled"},
    },
    "no-kibana": {"elastic": {"kibana": {"count": 0, "ingress": {"enabled": True, "allowInsecure": True}}},
                  "kafka": {"replicas": 3, "storage": {"storageClassName": "standard"}}},
}


def example(which: str) -> tuple[str, dict[str, Any]]:
    manifest = yaml.safe_load(EXAMPLES[which].read_text())
    return manifest["metadata"]["name"], manifest.get("spec") or {}


GOLDEN_MATERIAL = Material(GOLDEN_PASSWORDS, GOLDEN_TLS, GOLDEN_KAFKA_TLS)


def render(name: str, spec: dict[str, Any], namespace: str = NAMESPACE,
           passwords: Mapping[str, str] = GOLDEN_PASSWORDS) -> list[dict[str, Any]]:
    """The create-once Secrets, then the applied children."""
    return render_collective(name, namespace, spec, Material(passwords, GOLDEN_TLS, GOLDEN_KAFKA_TLS))


def all_renders() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    for which in EXAMPLES:
        yield which, render(*example(which))
    for variant, spec in VARIANTS.items():
        yield variant, render(variant, spec)


def by_kind(children: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [c for c in children if c["kind"] == kind and (name is None or c["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {[c['kind'] for c in children]}"
    return found[0]


def pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return dict(manifest["spec"]["template"]["spec"])


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


# --- golden --------------------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # Multi-line strings (the ConfigMap's borgdqn.yaml) as blocks, so a diff shows the line that changed.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_all(children: list[dict[str, Any]]) -> str:
    return yaml.dump_all(children, Dumper=_Dumper, sort_keys=False, width=120)


@pytest.mark.parametrize("which", sorted(EXAMPLES))
def test_the_examples_render_the_golden_children(which: str) -> None:
    path = GOLDEN / f"{which}.yaml"
    rendered = dump_all(render(*example(which)))
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rendered)
    assert path.is_file(), f"{path} is missing: run with BORG_UPDATE_GOLDEN=1"
    assert rendered == path.read_text(), (
        f"the children of {EXAMPLES[which].name} changed: if intended, regenerate with BORG_UPDATE_GOLDEN=1 and "
        f"review the diff of {path.relative_to(ROOT)}")
    assert list(yaml.safe_load_all(path.read_text())) == render(*example(which))  # the file loads back


def test_rendering_is_deterministic_and_does_not_share_state() -> None:
    name, spec = example("full")
    first, second = render(name, spec), render(name, spec)
    assert first == second
    first[-1]["metadata"]["labels"]["mutated"] = "yes"
    assert "mutated" not in render(name, spec)[-1]["metadata"]["labels"]


# --- order, kinds, labels ------------------------------------------------------------------------------------


def test_children_come_in_the_documented_order() -> None:
    kinds = [(c["kind"], c["metadata"]["name"]) for c in render(*example("minimal"))]
    assert kinds == [
        ("Secret", "pong-minimal-redis"), ("Secret", "pong-minimal-memory-tls"), ("Secret", "pong-minimal-kafka-tls"),
        ("ConfigMap", "pong-minimal-config"), ("StatefulSet", "pong-minimal-memory"),
        ("Service", "pong-minimal-memory-headless"),
        ("Service", "pong-minimal-memory"), ("PodDisruptionBudget", "pong-minimal-memory"),
        ("StatefulSet", "pong-minimal-kafka"),
        ("Service", "pong-minimal-kafka-headless"), ("Service", "pong-minimal-kafka"),
        ("Elasticsearch", "pong-minimal-es"), ("Kibana", "pong-minimal-kibana"),
        ("Deployment", "pong-minimal-indexer"), ("Job", "pong-minimal-kibana-setup"),
        ("StatefulSet", "pong-minimal-agents"),
        ("NetworkPolicy", "pong-minimal-memory"), ("NetworkPolicy", "pong-minimal-kafka"),
    ]
    full = [(c["kind"], c["metadata"]["name"]) for c in render(*example("full"))]
    assert ("Kafka", "pong-kafka") in full and ("KafkaNodePool", "pong") in full
    assert ("Ingress", "pong-kibana") in full
    assert not any(kind == "StatefulSet" and name == "pong-kafka" for kind, name in full)


def test_every_child_is_an_owned_kind_in_the_namespace_and_labelled() -> None:
    owned = {(api, kind) for api, kind, _ in OWNED_KINDS}
    assert set(children_kinds()) == owned
    assert len({plural for _, _, plural in OWNED_KINDS}) == len(OWNED_KINDS)
    for which, children in all_renders():
        cr = children[0]["metadata"]["labels"][names.LABEL_INSTANCE]
        for child in children:
            where = f"{which}: {child['kind']}/{child['metadata']['name']}"
            assert (child["apiVersion"], child["kind"]) in owned, where
            assert child["metadata"]["namespace"] == NAMESPACE, where
            assert child["metadata"]["name"].startswith(f"{cr}"), where
            labels = child["metadata"]["labels"]
            assert labels.items() >= names.labels(cr, labels[names.LABEL_COMPONENT]).items(), where
            assert "ownerReferences" not in child["metadata"], where  # the reconciler adds them
            template = child.get("spec", {}).get("template")
            if template is not None:  # a controller's pods: labelled too, and matching its selector
                assert template["metadata"]["labels"] == labels, where
                if "selector" in child["spec"]:
                    assert child["spec"]["selector"]["matchLabels"].items() <= labels.items(), where


def test_the_selector_string_selects_the_agent_pods() -> None:
    agents = by_kind(render(*example("full")), "StatefulSet", "pong-agents")
    selector = dict(part.split("=") for part in names.selector_string("pong").split(","))
    assert selector == agents["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/component": "agent", "app.kubernetes.io/instance": "pong",
                        "app.kubernetes.io/name": "borg-dqn"}
    assert selector.items() <= agents["spec"]["template"]["metadata"]["labels"].items()


# --- agents --------------------------------------------------------------------------------------------------


def test_agents_ask_for_their_gpus_and_tolerate_the_gpu_taint() -> None:
    name, spec = example("full")
    agents = by_kind(render(name, spec), "StatefulSet", "pong-agents")
    assert agents["spec"]["replicas"] == 8
    pod = pod_spec(agents)
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["limits"] == resources["requests"] == {"cpu": "6", "memory": "24Gi", GPU_RESOURCE: "1"}
    assert pod["tolerations"] == [GPU_TOLERATION, {"key": "dedicated", "operator": "Equal", "value": "training",
                                                   "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["priorityClassName"] == "borg-training"
    # Agent k is pod pong-agents-<k>, and a config rolls one pod at a time, none extra (no spare GPU needed).
    assert agents["kind"] == "StatefulSet" and agents["metadata"]["name"] == "pong-agents"
    assert agents["spec"]["updateStrategy"] == {"type": "RollingUpdate"}
    assert agents["spec"]["podManagementPolicy"] == "Parallel"  # scaling starts every new ordinal at once

    two = render(name, {**spec, "agents": {**spec["agents"], "gpus": 2, "tolerations": [GPU_TOLERATION]}})
    pod = pod_spec(by_kind(two, "StatefulSet", "pong-agents"))
    assert pod["containers"][0]["resources"]["limits"][GPU_RESOURCE] == "2"
    assert pod["tolerations"] == [GPU_TOLERATION]  # the user's own GPU toleration is not doubled


def test_a_completed_collective_keeps_every_child_but_gives_its_agents_no_pods() -> None:
    name, spec = example("full")
    running = build_children(name, NAMESPACE, parse_spec(spec), GOLDEN_MATERIAL)
    completed = build_children(name, NAMESPACE, parse_spec(spec), GOLDEN_MATERIAL, completed=True)
    assert by_kind(running, "StatefulSet", "pong-agents")["spec"]["replicas"] == 8
    assert by_kind(completed, "StatefulSet", "pong-agents")["spec"]["replicas"] == 0
    # The memory, Kafka, Elasticsearch, Kibana and the rest stay for inspection, unchanged.
    assert [c for c in completed if c["metadata"]["name"] != "pong-agents"] == \
        [c for c in running if c["metadata"]["name"] != "pong-agents"]


def test_cpu_agents_neither_ask_for_nor_tolerate_gpus() -> None:
    pod = pod_spec(by_kind(render("cpu-external", VARIANTS["cpu-external"]), "StatefulSet", "cpu-external-agents"))
    resources = pod["containers"][0]["resources"]
    assert GPU_RESOURCE not in resources["limits"] and GPU_RESOURCE not in resources["requests"]
    assert pod["tolerations"] == [{"key": "spot", "operator": "Exists"}]
    assert "nodeSelector" not in pod and "priorityClassName" not in pod


def test_agents_run_the_config_with_identity_and_the_password_from_the_secret() -> None:
    children = render(*example("minimal"))
    pod = pod_spec(by_kind(children, "StatefulSet", "pong-minimal-agents"))
    (container,) = pod["containers"]
    # Kubernetes expands $(BORG_POD_NAME) in args: each pod is its own member of the collective.
    assert container["command"] + container["args"] == ["borgdqn", "train", "--config", "/etc/borgdqn/borgdqn.yaml",
                                                         "--member", "$(BORG_POD_NAME)", "--wait-when-done"]
    variables = env_of(container)
    assert variables["BORG_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert variables["BORG_POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert variables["BORG_NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    # The memory's least-privileged agent user, its password (and no other) from the Secret.
    assert variables["BORG_REDIS_USERNAME"] == "borg-agent"
    assert variables["BORG_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "pong-minimal-redis",
                                                                 "key": "agent-password"}}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert mounts["/etc/borgdqn"]["readOnly"] is True
    assert {"/tmp", "/dev/shm", "/var/lib/borgdqn/run"} <= mounts.keys()
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "pong-minimal-config"
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
    # The memory's CA certificate (not its key) to verify the memory's TLS certificate with.
    assert volumes["memory-ca"]["secret"] == {"secretName": "pong-minimal-memory-tls", "defaultMode": 0o400,
                                              "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    assert mounts["/var/run/secrets/borg-tls"] == {"name": "memory-ca", "mountPath": "/var/run/secrets/borg-tls",
                                                   "readOnly": True}
    # Kafka's CA and the client certificate and key of a managed Kafka, not its brokers' key.
    assert volumes["kafka-client"]["projected"]["sources"] == [{"secret": {"name": "pong-minimal-kafka-tls", "items": [
        {"key": key, "path": key} for key in ("ca.crt", "client.crt", "client.key")]}}]
    assert mounts["/var/run/secrets/borg-kafka"]["readOnly"] is True
    assert all("emptyDir" in volumes[mount["name"]] for path, mount in mounts.items()
               if path not in ("/etc/borgdqn", "/var/run/secrets/borg-tls", "/var/run/secrets/borg-kafka"))


def test_the_config_map_is_what_borgdqn_reads_and_its_checksum_rolls_the_agents(tmp_path: Path) -> None:
    name, spec = example("full")
    children = render(name, spec)
    text = by_kind(children, "ConfigMap")["data"][CONFIG_KEY]
    (tmp_path / CONFIG_KEY).write_text(text)
    # What `borgdqn train --config` builds from it (no BORG_* variables in the way) is the spec's config.
    assert build_config(yaml_path=tmp_path / CONFIG_KEY, environ={}) == to_borg_config(name, NAMESPACE,
                                                                                       parse_spec(spec))
    annotations = by_kind(children, "StatefulSet", "pong-agents")["spec"]["template"]["metadata"]["annotations"]
    checksum = annotations[names.CONFIG_CHECKSUM_ANNOTATION]
    assert checksum == config_checksum(config_yaml(name, NAMESPACE, parse_spec(spec)))
    assert len(checksum) == 64 and int(checksum, 16) >= 0

    def agents_checksum(agents: dict[str, Any]) -> str:
        changed = render(name, {**spec, "agents": {**spec["agents"], **agents}})
        template = by_kind(changed, "StatefulSet", "pong-agents")["spec"]["template"]
        return str(template["metadata"]["annotations"][names.CONFIG_CHECKSUM_ANNOTATION])

    learner = spec["agents"]["learner"]
    assert agents_checksum({"learner": {**learner, "lr": 1e-4}}) != checksum  # a hyper-parameter rolls the pods
    assert agents_checksum({"replicas": 3}) == checksum  # scaling does not restart the running agents
    assert agents_checksum({"image": "ghcr.io/borg-dqn/borgdqn-agent:0.2.0"}) == checksum


def test_config_yaml_carries_the_cluster_addresses() -> None:
    spec = parse_spec(VARIANTS["cpu-external"])
    config = yaml.safe_load(config_yaml("cpu-external", NAMESPACE, spec))
    assert config["replay"]["backend"] == "redis"
    assert config["replay"]["redis_url"] == "rediss://cpu-external-memory.borg.svc:6379/0"  # TLS only
    assert config["replay"]["redis_ca_file"] == "/var/run/secrets/borg-tls/ca.crt"
    assert config["replay"]["redis_name"] == "cpu-external"
    assert config["telemetry"] == {"kafka": "kafka-0.shared:9092,kafka-1.shared:9092",
                                   "collective": "cpu-external", "buffer_events": 10_000,
                                   "kafka_tls": False, "kafka_ca_file": None, "kafka_cert_file": None,
                                   "kafka_key_file": None}
    assert config["hive"]["agents"] == 1


# --- hardening and secrets -----------------------------------------------------------------------------------


def test_every_pod_runs_non_root_read_only_without_a_token() -> None:
    for which, children in all_renders():
        checked = 0
        for child in children:
            if "template" not in child.get("spec", {}):
                continue
            where = f"{which}: {child['kind']}/{child['metadata']['name']}"
            pod = pod_spec(child)
            assert pod["automountServiceAccountToken"] is False, where
            assert pod["enableServiceLinks"] is False, where
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for container in pod["containers"]:
                context = container["securityContext"]
                assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, where
                assert context["readOnlyRootFilesystem"] is True, where
                assert context["allowPrivilegeEscalation"] is False, where
                assert context["capabilities"] == {"drop": ["ALL"]}, where
                assert container["resources"]["requests"] == container["resources"]["limits"], where
                checked += 1
        assert checked >= 3, which  # at least the agent, Redis and the monitor


def test_the_create_once_secrets_are_built_apart_from_the_applied_children() -> None:
    for which, spec in [*((w, example(w)[1]) for w in EXAMPLES), *VARIANTS.items()]:
        parsed = parse_spec(spec)
        assert not [c for c in build_children(which, NAMESPACE, parsed, GOLDEN_MATERIAL) if c["kind"] == "Secret"]
        secrets = {s["metadata"]["name"]: s for s in build_secrets(which, NAMESPACE, parsed, GOLDEN_MATERIAL)}
        managed_tls = parsed.kafka.mode == "managed" and parsed.kafka.secured
        assert set(secrets) == {f"{which}-redis", f"{which}-memory-tls", *([f"{which}-kafka-tls"] * managed_tls)}
        assert all(secret["immutable"] is True for secret in secrets.values())
    # The reconciler applies and prunes every owned kind but Secrets (it may not list them).
    assert ("v1", "Secret") not in APPLIED_KINDS
    assert set(APPLIED_KINDS) == set(children_kinds()) - {("v1", "Secret")}


def test_the_passwords_are_in_the_secret_and_nowhere_else() -> None:
    passwords = {user.secret_key: f"Zq7-unmistakable-{user.name}-9Xk" for user in USERS}
    encoded = {key: base64.b64encode(password.encode()).decode() for key, password in passwords.items()}
    for which in EXAMPLES:
        name, spec = example(which)
        children = render(name, spec, passwords=passwords)
        secret = by_kind(children, "Secret", f"{name}-redis")
        assert secret["data"] == {"agent-password": encoded["agent-password"],
                                  "monitor-password": encoded["monitor-password"],
                                  "admin-password": encoded["admin-password"]}
        assert secret["immutable"] is True and secret["type"] == "Opaque"
        assert "stringData" not in secret
        for child in children:
            text = json.dumps(child)
            for key, password in passwords.items():
                assert password not in text, f"{which}: {child['kind']}/{child['metadata']['name']}"
                if child is not secret:
                    assert encoded[key] not in text, f"{which}: {child['kind']}/{child['metadata']['name']}"


def test_a_password_redis_would_refuse_is_refused_here() -> None:
    for bad in ("", "with-newline\n"):
        with pytest.raises(ValueError, match="admin-password must be non-empty printable"):
            build_redis_secret("pong", NAMESPACE, {**GOLDEN_PASSWORDS, "admin-password": bad})
    with pytest.raises(ValueError, match="monitor-password"):
        build_redis_secret("pong", NAMESPACE, {"agent-password": "a", "admin-password": "b"})


def test_the_memory_pod_renders_every_user_and_its_monitor_holds_only_its_password() -> None:
    name, spec = example("full")
    children = render(name, spec)
    sts = pod_spec(by_kind(children, "StatefulSet", "pong-memory"))
    redis, monitor = sts["containers"]
    volumes = {volume["name"]: volume["secret"] for volume in sts["volumes"] if "secret" in volume}
    mounted = {container["name"]: [volumes[m["name"]] for m in container["volumeMounts"] if m["name"] in volumes]
               for container in (redis, monitor)}
    # Redis renders every user from the Secret; the monitor sidecar holds its own password and no other.
    # Redis serves TLS with the certificate and its key; the monitor gets the CA only.
    assert [(v["secretName"], [item["key"] for item in v["items"]]) for v in mounted["redis"]] == [
        ("pong-redis", ["agent-password", "monitor-password", "admin-password"]),
        ("pong-memory-tls", ["ca.crt", "tls.crt", "tls.key"])]
    assert [(v["secretName"], [item["key"] for item in v["items"]]) for v in mounted["monitor"]] == [
        ("pong-redis", ["monitor-password"]), ("pong-memory-tls", ["ca.crt"])]
    assert all(v["defaultMode"] == 0o400 for v in volumes.values())
    assert env_of(redis)["BORG_REDIS_TLS_DIR"] == "/var/run/secrets/borg-tls"
    assert "--tls --cacert /var/run/secrets/borg-tls/ca.crt" in redis["readinessProbe"]["exec"]["command"][2]
    tls = by_kind(children, "Secret", "pong-memory-tls")
    assert tls["immutable"] is True and sorted(tls["data"]) == ["ca.crt", "tls.crt", "tls.key"]
    assert env_of(redis)["BORG_REDIS_USERS_DIR"] == "/var/run/secrets/borg"
    assert env_of(redis)["BORG_MEMORY_NAME"] == "pong"  # the agents' replay.redis_name
    assert env_of(monitor)["BORG_REDIS_USERNAME"] == "borg-monitor"
    assert "--user borg-monitor" in redis["readinessProbe"]["exec"]["command"][2]


# --- memory --------------------------------------------------------------------------------------------------


def test_the_memory_statefulset_runs_redis_and_the_monitor() -> None:
    name, spec = example("full")
    children = render(name, spec)
    sts = by_kind(children, "StatefulSet", "pong-memory")
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["serviceName"] == "pong-memory-headless"
    redis, monitor = pod_spec(sts)["containers"]
    assert redis["args"] == ["redis-server"]  # the image's config: AOF on
    assert env_of(redis)["BORG_MEMORY_CAPACITY"] == "1000000"
    assert env_of(redis)["BORG_MEMORY_CHUNK_LENGTH"] == "32"
    assert redis["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}
    assert redis["readinessProbe"]["exec"]["command"][0] == "sh"
    assert "REDISCLI_AUTH" in redis["readinessProbe"]["exec"]["command"][2]
    assert monitor["command"] + monitor["args"] == [
        "borgdqn", "memory-monitor", "--memory", "rediss://127.0.0.1:6379/0",
        "--ca-file", "/var/run/secrets/borg-tls/ca.crt", "--name", "pong",
        "--password-file", "/var/run/secrets/borg/monitor-password",
        "--kafka", "pong-kafka-kafka-bootstrap.borg.svc:9093", "--collective", "pong",
        "--kafka-tls", "--kafka-ca-file", "/var/run/secrets/borg-kafka/ca.crt",
        "--kafka-cert-file", "/var/run/secrets/borg-kafka/client.crt",
        "--kafka-key-file", "/var/run/secrets/borg-kafka/client.key"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    volumes = {volume["name"]: volume for volume in pod_spec(sts)["volumes"]}
    assert "data" not in volumes  # the claim template provides it
    assert volumes["redis-users"]["secret"]["secretName"] == "pong-redis"
    assert volumes["conf"]["emptyDir"]["medium"] == "Memory"  # the rendered config holds the password

    headless = by_kind(children, "Service", "pong-memory-headless")
    client = by_kind(children, "Service", "pong-memory")
    assert headless["spec"]["clusterIP"] == "None"
    assert client["spec"]["ports"][0]["port"] == 6379
    assert by_kind(children, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 0


def test_a_memory_without_persistence_has_no_volume_claim_and_no_aof() -> None:
    children = render("cpu-external", VARIANTS["cpu-external"])
    sts = by_kind(children, "StatefulSet", "cpu-external-memory")
    assert "volumeClaimTemplates" not in sts["spec"]
    redis = pod_spec(sts)["containers"][0]
    assert redis["args"] == ["redis-server", "--appendonly", "no"]
    assert {"name": "data", "emptyDir": {}} in pod_spec(sts)["volumes"]


def test_a_memory_limit_below_redis_maxmemory_is_a_spec_error() -> None:
    spec = {"memory": {"capacity": 2_000_000, "resources": {"memory": "2Gi"}}}
    assert redis_maxmemory(parse_spec(spec)) > 2 * 2**30
    with pytest.raises(SpecError, match=r"memory\.resources\.memory 2Gi is not above Redis' maxmemory"):
        render("pong", spec)
    render("pong", {"memory": {"capacity": 2_000_000, "resources": {"memory": "6Gi"}}})


def test_agent_pods_are_sized_for_their_replica_and_a_pod_too_small_for_it_is_refused() -> None:
    def agent_memory(spec: dict[str, Any]) -> str:
        container = pod_spec(by_kind(render("pong", spec), "StatefulSet", "pong-agents"))["containers"][0]
        assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"]
        return str(container["resources"]["limits"]["memory"])

    # Sized from the capacity: the replica (~7.1 KB per 84x84 step, the embedded memory's own layout) plus 6Gi.
    sizes = {capacity: agent_memory({"memory": {"capacity": capacity}})
             for capacity in (100_000, 250_000, 1_000_000, 2_000_000)}
    assert sizes == {100_000: "7Gi", 250_000: "8Gi", 1_000_000: "13Gi", 2_000_000: "20Gi"}
    # Each figure holds the replica the agent will allocate, and no more than a GiB beyond it.
    for capacity, size in sizes.items():
        need = replica_bytes(capacity, (84, 84)) + 6 * 2**30
        assert need <= int(size.removesuffix("Gi")) * 2**30 < need + 2**30
    assert agent_memory({"memory": {"capacity": 1_000_000}, "agents": {"resources": {"memory": "24Gi"}}}) == "24Gi"
    with pytest.raises(SpecError, match=r"^agents\.resources\.memory 8Gi cannot hold an agent's replica of the log: "
                                        r"memory\.capacity 1000000 needs 13Gi per agent pod"):
        render("pong", {"memory": {"capacity": 1_000_000}, "agents": {"resources": {"memory": "8Gi"}}})
    with pytest.raises(SpecError, match="is not a quantity"):
        render("pong", {"agents": {"resources": {"memory": "lots"}}})


# --- Kafka ---------------------------------------------------------------------------------------------------


def test_a_managed_kafka_is_a_kraft_statefulset_of_the_apache_image() -> None:
    name, spec = example("minimal")
    children = render(name, {**spec, "kafka": {"replicas": 3}})
    sts = by_kind(children, "StatefulSet", "pong-minimal-kafka")
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    (container,) = pod_spec(sts)["containers"]
    assert container["image"].startswith("apache/kafka:")
    variables = env_of(container)
    assert variables["KAFKA_NODE_ID"] == {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
    assert variables["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert variables["KAFKA_CONTROLLER_QUORUM_VOTERS"] == ",".join(
        f"{i}@pong-minimal-kafka-{i}.pong-minimal-kafka-headless.borg.svc:9093" for i in range(3))
    assert variables["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
    assert variables["CLUSTER_ID"] == cluster_id("pong-minimal", NAMESPACE)
    assert by_kind(children, "Service", "pong-minimal-kafka")["spec"]["ports"][0]["port"] == 9092
    assert by_kind(children, "Service", "pong-minimal-kafka-headless")["spec"]["clusterIP"] == "None"


def test_cluster_ids_are_stable_valid_and_distinct() -> None:
    ids = {cluster_id(f"c{i}", namespace) for i in range(200) for namespace in ("a", "b")}
    assert len(ids) == 400
    for text in ids:
        assert len(text) == 22 and not text.startswith("-")
        assert len(base64.urlsafe_b64decode(text + "==")) == 16
    assert cluster_id("pong", "borg") == cluster_id("pong", "borg")


def test_strimzi_mode_renders_a_kafka_with_a_kraft_node_pool() -> None:
    children = render(*example("full"))
    kafka = by_kind(children, "Kafka")
    pool = by_kind(children, "KafkaNodePool")
    assert kafka["apiVersion"] == pool["apiVersion"] == "kafka.strimzi.io/v1"
    assert kafka["metadata"]["name"] == "pong-kafka"
    assert kafka["metadata"]["annotations"] == {"strimzi.io/kraft": "enabled", "strimzi.io/node-pools": "enabled"}
    assert kafka["spec"]["kafka"]["version"] == "4.1.0"
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    # TLS only, and a certificate of Strimzi's clients CA from every client: the KafkaUser's.
    assert (listener["name"], listener["port"], listener["type"], listener["tls"], listener["authentication"]) == \
        ("tls", 9093, "internal", True, {"type": "tls"})
    assert kafka["spec"]["entityOperator"] == {"userOperator": {}}
    user = by_kind(children, "KafkaUser")
    assert user["metadata"]["name"] == "pong-telemetry" and user["spec"] == {"authentication": {"type": "tls"}}
    assert user["metadata"]["labels"]["strimzi.io/cluster"] == "pong-kafka"
    peers = [peer["podSelector"]["matchLabels"][names.LABEL_COMPONENT] for peer in listener["networkPolicyPeers"]]
    assert peers == ["agent", "memory", "indexer"]
    assert kafka["spec"]["kafka"]["config"]["log.retention.hours"] == 72
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == "pong-kafka"
    assert pool["spec"]["replicas"] == 3 and pool["spec"]["roles"] == ["controller", "broker"]
    (volume,) = pool["spec"]["storage"]["volumes"]
    assert (volume["size"], volume["class"], volume["kraftMetadata"]) == ("50Gi", "fast-ssd", "shared")
    # The bootstrap Service Strimzi creates for it is what every client is given.
    assert kafka_bootstrap("pong", NAMESPACE, parse_spec(example("full")[1]).kafka) == \
        "pong-kafka-kafka-bootstrap.borg.svc:9093"
    assert not any(c["kind"] == "NetworkPolicy" and c["metadata"]["name"] == "pong-kafka" for c in children)


def test_external_kafka_and_disabled_elastic_render_neither() -> None:
    children = render("cpu-external", VARIANTS["cpu-external"])
    kinds = [c["kind"] for c in children]
    assert kinds == ["Secret", "Secret", "ConfigMap", "StatefulSet", "Service", "Service", "PodDisruptionBudget",
                     "StatefulSet", "NetworkPolicy"]
    monitor = pod_spec(by_kind(children, "StatefulSet", "cpu-external-memory"))["containers"][1]
    assert monitor["args"][monitor["args"].index("--kafka") + 1] == "kafka-0.shared:9092,kafka-1.shared:9092"


# --- Elastic, indexer, Kibana --------------------------------------------------------------------------------


def test_eck_elasticsearch_kibana_and_the_ingress() -> None:
    children = render(*example("full"))
    es = by_kind(children, "Elasticsearch")
    assert es["metadata"]["name"] == "pong-es"
    (node_set,) = es["spec"]["nodeSets"]
    assert node_set["count"] == 3
    assert node_set["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "200Gi"
    kibana = by_kind(children, "Kibana")
    assert kibana["spec"]["elasticsearchRef"] == {"name": "pong-es"}
    assert kibana["spec"]["version"] == es["spec"]["version"] == "8.19.7"
    ingress = by_kind(children, "Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "kibana-tls", "hosts": ["kibana.borg.example.org"]}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "kibana.borg.example.org"
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "pong-kibana-kb-http",
                                                              "port": {"number": 5601}}


def test_the_indexer_and_the_setup_job_log_in_with_ecks_elastic_user() -> None:
    children = render(*example("full"))
    indexer = pod_spec(by_kind(children, "Deployment", "pong-indexer"))
    (container,) = indexer["containers"]
    args = container["args"]
    assert args[:5] == ["indexer", "--kafka", "pong-kafka-kafka-bootstrap.borg.svc:9093", "--es",
                        "https://pong-es-es-http:9200"]
    assert args[args.index("--ca-file") + 1] == "/etc/borg/ca/ca.crt"
    assert args[args.index("--replicas") + 1] == "1"  # 3 Elasticsearch nodes: one replica per index
    assert env_of(container) == {
        "BORG_ES_USERNAME": "elastic",
        "BORG_ES_PASSWORD": {"secretKeyRef": {"name": "pong-es-es-elastic-user", "key": "elastic"}}}
    ca = next(v for v in indexer["volumes"] if v["name"] == "ca")
    assert ca["secret"]["secretName"] == "pong-es-es-http-certs-public"

    job = by_kind(children, "Job")
    assert job["metadata"]["name"] == "pong-kibana-setup"
    assert job["spec"]["backoffLimit"] > 0 and job["spec"]["ttlSecondsAfterFinished"] > 0
    (setup,) = pod_spec(job)["containers"]
    assert setup["args"][:3] == ["kibana-setup", "--kibana", "https://pong-kibana-kb-http:5601"]
    assert env_of(setup) == {
        "BORG_KIBANA_USERNAME": "elastic",
        "BORG_KIBANA_PASSWORD": {"secretKeyRef": {"name": "pong-es-es-elastic-user", "key": "elastic"}}}
    ca = next(v for v in pod_spec(job)["volumes"] if v["name"] == "ca")
    assert ca["secret"]["secretName"] == "pong-kibana-kb-http-certs-public"
    assert pod_spec(job)["restartPolicy"] == "Never"


def test_without_kibana_there_is_no_setup_job_nor_ingress() -> None:
    children = render("no-kibana", VARIANTS["no-kibana"])
    kinds = {c["kind"] for c in children}
    assert {"Elasticsearch", "Deployment"} <= kinds
    assert not kinds & {"Kibana", "Job", "Ingress"}
    indexer = by_kind(children, "Deployment", "no-kibana-indexer")
    args = pod_spec(indexer)["containers"][0]["args"]
    assert args[args.index("--replicas") + 1] == "0"  # one Elasticsearch node: no replicas


# --- network -------------------------------------------------------------------------------------------------


def test_network_policies_let_only_the_right_pods_in() -> None:
    children = render(*example("minimal"))
    memory = by_kind(children, "NetworkPolicy", "pong-minimal-memory")
    (rule,) = memory["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    peers = rule["from"]
    assert [p["podSelector"]["matchLabels"].get(names.LABEL_COMPONENT) for p in peers[:2]] == ["agent", "memory"]
    assert peers[2] == {"namespaceSelector": {}, "podSelector": {"matchLabels": {names.LABEL_NAME: "borg-operator"}}}
    assert all(p["podSelector"]["matchLabels"][names.LABEL_INSTANCE] == "pong-minimal" for p in peers[:2])

    kafka = by_kind(children, "NetworkPolicy", "pong-minimal-kafka")
    among, clients = kafka["spec"]["ingress"]
    assert [p["port"] for p in among["ports"]] == [9092, 9093]
    assert [p["podSelector"]["matchLabels"][names.LABEL_COMPONENT] for p in clients["from"]] == \
        ["agent", "memory", "indexer"]
    assert [p["port"] for p in clients["ports"]] == [9092]


# --- names ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "limit"), [
    ({"elastic": {"mode": "disabled"}}, names.MAX_NAME),
    ({}, names.MAX_NAME_ECK),
    ({"kafka": {"mode": "strimzi"}, "elastic": {"mode": "disabled"}}, names.MAX_NAME_STRIMZI),
])
def test_names_too_long_for_a_child_are_spec_errors(spec: dict[str, Any], limit: int) -> None:
    render("a" * limit, spec)
    with pytest.raises(SpecError, match=f"at most {limit}"):
        render("a" * (limit + 1), spec)
    children = render("a" * limit, spec)
    for child in children:
        if child["kind"] == "StatefulSet":
            assert len(child["metadata"]["name"]) + 1 + 10 <= 63  # its pods' controller-revision-hash label
        if child["kind"] in ("Service", "Elasticsearch", "Kibana"):
            assert len(child["metadata"]["name"]) <= (63 if child["kind"] == "Service" else 36)
        if child["kind"] == "KafkaNodePool":  # Strimzi's node (pod) names: <kafka>-<pool>-<node id>
            assert len(f"{by_kind(children, 'Kafka')['metadata']['name']}-{child['metadata']['name']}-999") <= 63


# --- the real apiserver --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crds_installed(kube: KubeCluster) -> Iterator[KubeCluster]:
    """The BorgCollective CRD, ECK's CRDs and Strimzi's `Kafka`, `KafkaNodePool` and `KafkaUser` CRDs, Established."""
    install_borg_crd(kube)
    files = [*eck_crds(Progress()), *strimzi_crds(Progress())]
    # Server-side: these CRDs are too large for client-side apply's last-applied annotation.
    kube.kubectl("apply", "--server-side", "--force-conflicts", *(arg for path in files for arg in ("-f", str(path))))
    wait_established(kube, "elasticsearches.elasticsearch.k8s.elastic.co", "kibanas.kibana.k8s.elastic.co",
                     "kafkas.kafka.strimzi.io", "kafkanodepools.kafka.strimzi.io", "kafkausers.kafka.strimzi.io")
    with namespaces_deleted_after(kube):
        yield kube


@pytest.mark.integration
def test_every_rendered_object_passes_the_apiservers_server_side_dry_run(crds_installed: KubeCluster) -> None:
    kube = crds_installed
    namespace = new_namespace(kube, "builders")
    objects: list[dict[str, Any]] = []
    for which in EXAMPLES:
        name, spec = example(which)
        manifest = yaml.safe_load(EXAMPLES[which].read_text())
        objects.append({**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}})
        objects.extend(render(name, spec, namespace=namespace))
    for variant, spec in VARIANTS.items():
        objects.extend(render(variant, spec, namespace=namespace))
    # One request per object, strict field validation (kubectl's default): an unknown or misspelt field fails.
    result = kube.kubectl("apply", "--server-side", "--dry-run=server", "--field-manager=borg-operator", "-f", "-",
                          input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}), check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(objects), result.stdout
    assert all(line.endswith("serverside-applied (server dry run)") for line in lines), result.stdout
    kinds = {obj["kind"] for obj in objects}
    assert {"Kafka", "KafkaNodePool", "Elasticsearch", "Kibana", "BorgCollective", "Ingress", "Job"} <= kinds
    # A dry run stores nothing.
    assert kube.get_json("deployments,statefulsets,kafkas,elasticsearches", "-n", namespace)["items"] == []


@pytest.mark.integration
def test_strimzis_real_schema_refuses_what_its_operator_would(crds_installed: KubeCluster) -> None:
    """The generated CRDs are the real schemas, not a permissive stand-in: a pool without roles is refused."""
    kube = crds_installed
    namespace = new_namespace(kube, "strimzi")
    pool = by_kind(render(*example("full"), namespace=namespace), "KafkaNodePool")
    del pool["spec"]["roles"]
    rejected = kube.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pool), check=False)
    assert rejected.returncode != 0
    assert "spec.roles: Required value" in rejected.stderr

