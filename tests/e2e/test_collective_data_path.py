"""The rendered collective works, not only parses: its ConfigMap, agent pods, memory monitor and indexer, run as
the pods run them against the harness's real Redis, Kafka and Elasticsearch.

The operator's builders render a small CartPole collective. Its ConfigMap's ``borgdqn.yaml`` is written to a file
verbatim, and two agents run the agent container's command and args, ``$(BORG_POD_NAME)`` expanded from the
container's env (the first two pod names of the agents StatefulSet). What a cluster provides and this machine cannot is
replaced, and nothing else: the Service addresses (Redis, Kafka, Elasticsearch) and the run dir and /tmp
emptyDirs go in through borgdqn's documented ``BORG_SECTION__FIELD`` overrides (or, for the sidecar and the
indexer, by replacing just those argument values); the Redis passwords come from the rendered Secret, as its
secretKeyRef and its volume would deliver them. The memory is the memory pod's Redis container as its image runs
it: the image's entrypoint with the container's env and args, its users (agent, monitor, admin) rendered from the
Secret's files, its port TLS only with the certificate the operator makes (``borg_operator.tls``), execing this
machine's redis-server (the Debian build the image installs); every client verifies it with the CA from its own
pod's Secret volume.

Proven: both members finish their budgets, logged in as the memory's least-privileged agent user (any command its
ACL lacks would fail them); the monitor reads as the read-only monitor user; the shared Redis memory holds each
member's steps under the agent id its pod name gives (``borgdqn.rl.identity.collective_member``), and its model
store each member's last checkpoint; the monitor sidecar and both members' telemetry reach Elasticsearch through
the rendered indexer, attributed to the collective and to each pod; the members explored with their own ladder
epsilons and played their own games; a member whose container restarts in the same pod resumes its finished run
instead of refusing its run dir; each member, done, marks itself finished in Redis and waits to be released
(SIGTERM); a config change rolls the agents, and the new pod of agent k (an empty run dir) resumes from the model
store with its env-step counter kept and the new config.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from elasticsearch import Elasticsearch

from borg_operator import names
from borg_operator.builders import Material
from borg_operator.builders.config import CONFIG_KEY
from borg_operator.builders.kafka import CLIENT_LISTENER
from borg_operator.spec import CONFIG_PATH, KAFKA_CA_FILE, RUN_DIR
from borg_operator.tls import make_kafka_tls, make_memory_tls
from borgdqn.config import BorgConfig
from borgdqn.memory.redis.acl import MONITOR, USERS
from borgdqn.memory.redis.model_store import RedisModelStore, read_finished
from borgdqn.rl.checkpoint import agent_checkpoint_path, read_checkpoint
from borgdqn.rl.identity import AgentIdentity, collective_member
from borgdqn.telemetry.documents import SHARES_INDEX
from borgdqn.telemetry.events import INDICES
from borgdqn.telemetry.kafka_access import KafkaAccess
from borgdqn.telemetry.memory_monitor import LogPublisher, MemoryMonitor
from tests.harness.cache import Progress
from tests.harness.kafka import KafkaServer, ensure_kafka, start_kafka
from tests.harness.process import free_port
from tests.harness.redis import RedisInstall, ensure_redis
from tests.support.conditions import eventually
from tests.support.operator_process import image_properties, render_collective

NAMESPACE = "borg-test"
STEPS = 2000  # env steps per member
NUM_ENVS = 2
LADDER = {"enabled": True, "base": 0.4, "alpha": 7.0}
SPEC: dict[str, Any] = {
    "env": {"id": "CartPole-v1", "numEnvs": NUM_ENVS, "frameStack": 1},
    "agents": {
        "replicas": 2, "gpus": 0, "threads": 1, "steps": STEPS, "seed": 3,
        "resources": {"cpu": "1", "memory": "3Gi"},  # a replica of 8192 steps and a CPU agent
        "learner": {"learningStarts": 200, "batchSize": 32, "updateEvery": 4, "targetUpdatePeriod": 100,
                    "lr": 1e-3, "device": "cpu"},
        "network": {"mlpHidden": [32, 32]},
        # Annealed within the budget, so each member ends on its own ladder epsilon.
        "policy": {"kind": "epsilon_greedy", "epsilon": {"kind": "linear", "start": 1.0, "end": 0.01, "steps": 400}},
        "epsilonLadder": LADDER,
    },
    # Room for both members' steps (partial chunks included): nothing is evicted, so the counts are exact.
    # CartPole checkpoints are a few kB: a small model store fits a small memory pod.
    "memory": {"capacity": 8192, "chunkLength": 16, "outboxSteps": 1024, "persistence": False,
               "modelStoreBytes": 64 << 20, "resources": {"cpu": "1", "memory": "1Gi"}},
    "kafka": {"mode": "managed"},
    "elastic": {"mode": "eck", "count": 1},
}  # fmt: skip
# The keys a cluster's addresses and volumes decide; every other key of the agents' config is the ConfigMap's.
CLUSTER_KEYS = {"replay.redis_url", "replay.redis_ca_file", "telemetry.kafka", "telemetry.kafka_ca_file",
                "telemetry.kafka_cert_file", "telemetry.kafka_key_file", "hive.out"}
CONSOLE_SCRIPT = Path(sys.executable).with_name("borgdqn")  # what `borgdqn` is in the images: the console script
ENTRYPOINT = Path(__file__).resolve().parents[2] / "memory_image" / "entrypoint.py"  # the memory image's
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# -- the pods, as the kubelet would start them ---------------------------------------------------------------------


def by_kind(children: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(child["kind"], child["metadata"]["name"]): child for child in children}


def container(children: Mapping[tuple[str, str], dict[str, Any]], kind: str, name: str,
              container_name: str) -> dict[str, Any]:  # fmt: skip
    pod = children[(kind, name)]["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == container_name)


def secret_values(children: Mapping[tuple[str, str], dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(Secret, key) -> value of every rendered Secret, as a secretKeyRef would read it."""
    return {(name, key): base64.b64decode(value).decode() for (kind, name), child in children.items()
            if kind == "Secret" for key, value in child["data"].items()}  # fmt: skip


def pod_env(spec: Mapping[str, Any], fields: Mapping[str, str],
            secrets: Mapping[tuple[str, str], str]) -> dict[str, str]:  # fmt: skip
    """The container's env as the kubelet resolves it: literals, downward-API fields, Secret keys."""
    out: dict[str, str] = {}
    for item in spec.get("env", []):
        if "value" in item:
            out[item["name"]] = item["value"]
        elif "fieldRef" in item["valueFrom"]:
            out[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            out[item["name"]] = secrets[(ref["name"], ref["key"])]
    return out


def argv(spec: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """command + args with ``$(VAR)`` expanded from the container's env (Kubernetes' substitution)."""
    assert spec["command"] == ["borgdqn"]
    return [str(CONSOLE_SCRIPT), *(_VAR.sub(lambda m: env[m.group(1)], arg) for arg in spec["args"])]


def replace_value(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2 :]]


def drop_flag(args: list[str], flag: str) -> list[str]:
    i = args.index(flag)
    return [*args[:i], *args[i + 2 :]]


def process_env(pod: Mapping[str, str]) -> dict[str, str]:
    """This machine's environment (PATH, OMP_NUM_THREADS, ...) without any BORG_* of its own, plus the pod's."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("BORG_")}, **pod}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def pick_members(config: BorgConfig, statefulset: str) -> list[tuple[str, AgentIdentity]]:
    """The first two pods of the StatefulSet, ``<statefulset>-0`` and ``-1``: agents 0 and 1, at the top of the
    epsilon ladder and at its middle."""
    members = [(f"{statefulset}-{k}", collective_member(config, f"{statefulset}-{k}")) for k in (0, 1)]
    assert [identity.agent_id for _, identity in members] == [0, 1]
    return members


class Processes:
    """The test's own processes, each logging to a file; stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=dict(env), cwd=self.logs)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def alive(self, name: str) -> None:
        assert self.procs[name].poll() is None, f"{name} exited: {self.log(name)[-3000:]}"

    def stop(self, name: str) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def stop_all(self) -> None:
        for name in self.procs:
            self.stop(name)


def secret_mounts(children: Mapping[tuple[str, str], dict[str, Any]], kind: str, name: str, container_name: str,
                  secrets: Mapping[tuple[str, str], str], where: Path,
                  only: tuple[str, ...] | None = None) -> dict[str, Path]:  # fmt: skip
    """The container's Secret volumes (or ``only`` those named) as the kubelet mounts them, a directory of files
    each: mountPath -> dir."""
    pod = children[(kind, name)]["spec"]["template"]["spec"]
    # A Secret volume, or a projected one of several Secrets' keys: (Secret, its items) each.
    volumes = {v["name"]: [(v["secret"]["secretName"], v["secret"]["items"])] for v in pod["volumes"] if "secret" in v}
    volumes |= {v["name"]: [(s["secret"]["name"], s["secret"]["items"]) for s in v["projected"]["sources"]]
                for v in pod["volumes"] if "projected" in v}
    out = {}
    for mount in container(children, kind, name, container_name)["volumeMounts"]:
        if mount["name"] in volumes and (only is None or mount["name"] in only):
            local = where / f"{container_name}-{mount['name']}"
            local.mkdir(parents=True)
            for secret, items in volumes[mount["name"]]:
                for item in items:
                    (local / item["path"]).write_text(secrets[(secret, item["key"])])
            out[mount["mountPath"]] = local
    return out


def moved(value: str, mounts: Mapping[str, Path]) -> str:
    """``value`` with a mount path in it (a whole path, or a file under it) replaced by the directory standing in
    for it."""
    for path, local in mounts.items():
        value = re.sub(rf"{re.escape(path)}(?=/|$)", str(local).replace("\\", "\\\\"), value)
    return value


def start_kafka_pod(children: Mapping[tuple[str, str], dict[str, Any]], cr: str,
                    secrets: Mapping[tuple[str, str], str], where: Path) -> KafkaServer:  # fmt: skip
    """The managed Kafka's broker as its StatefulSet configures it: server.properties by the image's rule from the
    container's env; of those, the listener the clients and the brokers share (its protocol and its
    listener.name.client.* settings, with the files of the pod's Secret volume) runs on the harness's broker, whose
    node id, quorum and data dir stand in for the StatefulSet's. The certificate's names are the cluster's and
    the loopback's (make_kafka_tls's ``also``), since this broker is dialled at 127.0.0.1."""
    broker = container(children, "StatefulSet", f"{cr}-kafka", "kafka")
    props = image_properties(broker["env"])
    protocols = dict(item.split(":") for item in props["listener.security.protocol.map"].split(","))
    assert props["listeners"].startswith(f"{CLIENT_LISTENER}://")
    assert props["inter.broker.listener.name"] == CLIENT_LISTENER  # the brokers too meet on it, with certificates
    assert protocols == {CLIENT_LISTENER: "SSL", "CONTROLLER": "PLAINTEXT"}, "TLS only, but for the quorum"
    mounts = secret_mounts(children, "StatefulSet", f"{cr}-kafka", "kafka", secrets, where)
    prefix = f"listener.name.{CLIENT_LISTENER.lower()}."
    listener = {key: moved(value, mounts) for key, value in props.items() if key.startswith(prefix)}
    assert listener[f"{prefix}ssl.client.auth"] == "required"
    return start_kafka(ensure_kafka(Progress()), listener=(protocols[CLIENT_LISTENER], listener))


def refused_without_certificate(broker: KafkaServer, ca_file: Path) -> None:
    """A client that trusts the broker's CA but shows no certificate of its own bootstraps nothing (so it can
    send nothing), and the broker's log says it refused the handshake."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaConnectionError

    async def start() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=broker.client_bootstrap, request_timeout_ms=5000,
                                    **KafkaAccess(tls=True, ca_file=ca_file).client_options())  # fmt: skip
        try:
            await asyncio.wait_for(producer.start(), timeout=20)
        finally:
            await producer.stop()

    with pytest.raises(KafkaConnectionError, match="Unable to bootstrap"):
        asyncio.run(start())
    eventually(lambda: "SSL handshake failed" in (broker.workdir / "kafka.log").read_text(),
               "the broker's log of the refused handshake", 10, 0.2)


def start_memory(children: Mapping[tuple[str, str], dict[str, Any]], cr: str, secrets: Mapping[tuple[str, str], str],
                 processes: Processes, install: RedisInstall, where: Path) -> redis.Redis:
    """The memory pod's redis container, started as its image starts it; a client of it as the monitor user over
    TLS. What moves: the Secret volumes' mounts (a directory of their files
    each), the port, the data and config dirs."""
    redis_container = container(children, "StatefulSet", f"{cr}-memory", "redis")
    mounts = secret_mounts(children, "StatefulSet", f"{cr}-memory", "redis", secrets, where)
    env = {name: moved(value, mounts) for name, value in pod_env(redis_container, {}, secrets).items()}
    port = free_port()
    env.update(BORG_REDIS_SERVER=str(install.server), BORG_REDIS_PORT=str(port), BORG_REDIS_BIND="127.0.0.1",
               BORG_REDIS_DATA_DIR=str(where / "memory-data"), BORG_REDIS_CONF=str(where / "memory-run" / "redis.conf"),
               LD_LIBRARY_PATH=install.env()["LD_LIBRARY_PATH"])  # fmt: skip
    processes.start("memory", [sys.executable, str(ENTRYPOINT), *redis_container["args"]], process_env(env))
    ca = Path(env["BORG_REDIS_TLS_DIR"]) / "ca.crt"
    client = redis.Redis(port=port, username=MONITOR.name, socket_timeout=5, ssl=True, ssl_ca_certs=str(ca),
                         password=(Path(env["BORG_REDIS_USERS_DIR"]) / MONITOR.secret_key).read_text())

    def answers() -> bool:
        processes.alive("memory")
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    eventually(answers, "the memory's Redis answering its monitor user over TLS", 30, 0.1)
    return client


@pytest.fixture(scope="module")
def redis_install() -> RedisInstall:
    return ensure_redis(Progress())


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


def search(es: Elasticsearch, index: str, collective: str) -> list[dict[str, Any]]:
    es.indices.refresh(index=index)
    found = es.search(index=index, query={"term": {"collective": collective}}, size=10_000)
    return [hit["_source"] for hit in found["hits"]["hits"]]


def metrics(run_dir: Path, agent: int, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics" / f"agent-{agent}.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == kind]


# -- the test ------------------------------------------------------------------------------------------------------


def test_the_rendered_collective_trains_shares_its_memory_and_reports_to_elasticsearch(
        tmp_path: Path, redis_install: RedisInstall, es_server: Any, processes: Processes,
        request: pytest.FixtureRequest) -> None:  # fmt: skip
    cr = f"dp-{uuid.uuid4().hex[:6]}"  # the collective's name: its memory's name and its telemetry's collective
    passwords = {user.secret_key: f"{user.name}-{uuid.uuid4().hex}" for user in USERS}
    material = Material(passwords, make_memory_tls(cr, NAMESPACE),
                        make_kafka_tls(cr, NAMESPACE, also=("127.0.0.1",)))
    children = by_kind(render_collective(cr, NAMESPACE, SPEC, material))
    config_text = children[("ConfigMap", f"{cr}-config")]["data"][CONFIG_KEY]
    rendered = yaml.safe_load(config_text)
    config_file = tmp_path / CONFIG_KEY
    config_file.write_text(config_text)  # verbatim: the ConfigMap volume's file
    config = BorgConfig.model_validate(rendered)
    assert (config.hive.agents, config.replay.backend, config.replay.redis_name, config.telemetry.collective,
            config.hive.out) == (1, "redis", cr, cr, Path(RUN_DIR))  # fmt: skip
    secrets = secret_values(children)
    # The managed Kafka wants TLS and a certificate of its CA from every client.
    broker = start_kafka_pod(children, cr, secrets, tmp_path / "kafka-0")
    request.addfinalizer(broker.stop)
    kafka = broker.client_bootstrap
    refused_without_certificate(broker, Path(moved(KAFKA_CA_FILE, secret_mounts(
        children, "StatefulSet", f"{cr}-agents", "agent", secrets, tmp_path / "stranger"))))
    memory = start_memory(children, cr, secrets, processes, redis_install, tmp_path)
    memory_url = f"rediss://127.0.0.1:{memory.connection_pool.connection_kwargs['port']}/0"

    # The memory pod's monitor sidecar: its Redis is on the pod's loopback (here: the memory's port, over TLS),
    # its password and the memory's CA the Secrets' files.
    monitor = container(children, "StatefulSet", f"{cr}-memory", "monitor")
    monitor_mounts = secret_mounts(children, "StatefulSet", f"{cr}-memory", "monitor", secrets, tmp_path)
    monitor_args = [moved(arg, monitor_mounts) for arg in argv(monitor, {})]
    assert monitor_args[monitor_args.index("--memory") + 1] == "rediss://127.0.0.1:6379/0"
    monitor_args = replace_value(monitor_args, "--memory", memory_url)
    monitor_args = replace_value(monitor_args, "--kafka", kafka)
    assert monitor_args[monitor_args.index("--name") + 1] == cr
    processes.start("monitor", monitor_args, process_env(pod_env(monitor, {}, secrets)))

    # The indexer Deployment's container. The harness's Elasticsearch is plain http with security off, so there
    # is no CA to trust (--ca-file is dropped) and the credentials (ECK's `elastic` user, whose Secret ECK would
    # create) are sent but not checked.
    indexer = container(children, "Deployment", f"{cr}-indexer", "indexer")
    indexer_env = pod_env(indexer, {}, {**secrets, (names.es_elastic_user_secret(cr), "elastic"): "unchecked"})
    assert set(indexer_env) == {"BORG_ES_USERNAME", "BORG_ES_PASSWORD"}
    indexer_mounts = secret_mounts(children, "Deployment", f"{cr}-indexer", "indexer", secrets, tmp_path,
                                   only=("kafka-client",))  # ECK's CA: no ECK here (see --ca-file below)
    indexer_args = [moved(arg, indexer_mounts) for arg in argv(indexer, indexer_env)]
    assert indexer_args[indexer_args.index("--group") + 1] == f"{cr}-indexer"  # a new consumer group per run
    indexer_args = replace_value(indexer_args, "--kafka", kafka)
    indexer_args = replace_value(indexer_args, "--es", es_server.url)
    indexer_args = drop_flag(indexer_args, "--ca-file")
    processes.start("indexer", indexer_args, process_env(indexer_env))

    # Two agent pods of the StatefulSet.
    agent = container(children, "StatefulSet", f"{cr}-agents", "agent")
    assert agent["args"] == ["train", "--config", CONFIG_PATH, "--member", "$(BORG_POD_NAME)", "--wait-when-done"]
    members = pick_members(config, f"{cr}-agents")
    runs: dict[str, tuple[list[str], dict[str, str], Path]] = {}
    for pod, _ in members:
        pod_dir = tmp_path / pod
        (pod_dir / "tmp").mkdir(parents=True)
        env = pod_env(agent, {"metadata.name": pod, "metadata.namespace": NAMESPACE, "spec.nodeName": "node-1"},
                      secrets)  # fmt: skip
        assert env["BORG_REDIS_PASSWORD"] == passwords["agent-password"] and env["HOME"] == "/tmp"
        env["HOME"] = str(pod_dir / "tmp")  # the pod's /tmp emptyDir
        # The memory's CA certificate, Kafka's CA and the client certificate, from the pod's own Secret volumes.
        mounts = secret_mounts(children, "StatefulSet", f"{cr}-agents", "agent", secrets, pod_dir)
        cluster = {  # the Services' addresses, the volumes' paths: nothing else is overridden
            "BORG_REPLAY__REDIS_URL": memory_url,
            "BORG_REPLAY__REDIS_CA_FILE": moved(rendered["replay"]["redis_ca_file"], mounts),
            "BORG_TELEMETRY__KAFKA": kafka,
            **{f"BORG_TELEMETRY__{key.upper()}": moved(rendered["telemetry"][key], mounts)
               for key in ("kafka_ca_file", "kafka_cert_file", "kafka_key_file")},
            "BORG_HIVE__OUT": str(pod_dir / "run"),
        }
        # The ConfigMap volume's file is config_file here: the one path in the args that must move.
        args = [arg.replace(CONFIG_PATH, str(config_file)) for arg in argv(agent, env)]
        assert args[1:] == ["train", "--config", str(config_file), "--member", pod, "--wait-when-done"]
        runs[pod] = (args, process_env({**env, **cluster}), pod_dir / "run")
        processes.start(pod, *runs[pod][:2])

    # Each member, its budget done, says so in the memory's Redis and keeps its pod up until it is released.
    for pod, _ in members:
        eventually(lambda pod=pod: "waiting to be released" in processes.log(pod) or processes.procs[pod].poll()
                   is not None, f"{pod} done and waiting", 300, 0.5)  # fmt: skip
        processes.alive(pod)
    assert read_finished(memory, cr) == {identity.agent_id: STEPS for _, identity in members}
    for pod, _ in members:
        assert processes.stop(pod) == 0, processes.log(pod)[-3000:]  # SIGTERM: released, exits cleanly
    for name in ("monitor", "indexer"):
        processes.alive(name)

    # Each member ran with the ConfigMap's config: only the cluster's addresses and paths differ.
    for pod, identity in members:
        _, env, run_dir = runs[pod]
        assert f"done: {STEPS:,} env steps" in processes.log(pod)
        effective = flatten(yaml.safe_load((run_dir / "config.yaml").read_text()))
        want = flatten(rendered)
        assert set(effective) == set(want)
        assert {key for key in want if effective[key] != want[key]} == CLUSTER_KEYS
        assert effective["replay.redis_url"] == memory_url and effective["telemetry.kafka"] == kafka
        assert effective["hive.out"] == env["BORG_HIVE__OUT"]
        saved, state = read_checkpoint(agent_checkpoint_path(run_dir, identity.agent_id))
        assert flatten(saved.model_dump(mode="json")) == effective
        assert state.agent == identity.agent_id and state.env_steps == STEPS
        assert json.loads((run_dir / "summary.json").read_text())["hive"]["env_steps"] == STEPS

    # The shared memory holds exactly each member's steps, counted under the agent id its pod name gives.
    # And its model store each member's last checkpoint, byte for byte the one in the member's run dir.
    reading = MemoryMonitor(memory, cr, LogPublisher()).read()
    store = RedisModelStore(memory, cr, SPEC["memory"]["modelStoreBytes"])  # reads only: the monitor user may
    entries = store.entries()
    for pod, identity in members:
        assert entries[identity.agent_id].env_steps == STEPS
        assert store.get(identity.agent_id) == agent_checkpoint_path(runs[pod][2], identity.agent_id).read_bytes()
    ids = {identity.agent_id: STEPS for _, identity in members}
    assert reading.per_agent == ids and reading.size == reading.inserted == 2 * STEPS

    # A container restarted in its pod (same run dir): the member resumes its finished run and stops at once.
    first_pod, first = members[0]
    args, env, run_dir = runs[first_pod]
    episodes_before = metrics(run_dir, first.agent_id, "episode")
    restarted = processes.start(f"{first_pod}-restarted", args, env)
    eventually(lambda: "waiting to be released" in processes.log(f"{first_pod}-restarted") or restarted.poll()
               is not None, "the restarted member done and waiting", 300, 0.5)  # fmt: skip
    assert processes.stop(f"{first_pod}-restarted") == 0, processes.log(f"{first_pod}-restarted")[-3000:]
    output = processes.log(f"{first_pod}-restarted")
    assert "already holds a run" not in output
    assert f"done: {STEPS:,} env steps" in output
    assert read_checkpoint(agent_checkpoint_path(run_dir, first.agent_id))[1].env_steps == STEPS
    assert metrics(run_dir, first.agent_id, "episode") == episodes_before, "no further steps were played"
    assert f"resumed env_steps={STEPS}" in (run_dir / "logs" / f"agent-{first.agent_id}.log").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["hive"]["env_steps"] == STEPS

    # Everything reaches Elasticsearch through the indexer, under the collective and each member's pod name.
    def pod_of(doc: Mapping[str, Any]) -> str:
        collective, source, _nonce = doc["source_id"].split("/")
        assert collective == doc["collective"] == cr
        return str(source)

    es = Elasticsearch(es_server.url, request_timeout=30)
    try:

        def indexed() -> bool:
            processes.alive("indexer")
            episodes = search(es, INDICES["episode"], cr)
            training = search(es, INDICES["training"], cr)
            shares = search(es, SHARES_INDEX, cr)
            for pod, identity in members:
                mine = [d for d in episodes if pod_of(d) == pod]
                if len(mine) < len(metrics(runs[pod][2], identity.agent_id, "episode")):
                    return False
                if not any(pod_of(d) == pod and d["env_steps"] == STEPS for d in training):
                    return False
            # The restarted member's final report, from a source of its own (a new process life).
            if len({d["source_id"] for d in training if pod_of(d) == first_pod}) < 2:
                return False
            final = {}
            for doc in shares:  # the monitor's reading after both members finished
                final.setdefault((doc["source_id"], doc["seq"]), {})[doc["agent"]] = doc["steps"]
            return ids in final.values()

        eventually(indexed, "every member's episodes, final reports and the final memory shares indexed", 90, 0.5)
        episodes = search(es, INDICES["episode"], cr)
        training = search(es, INDICES["training"], cr)
        memory = search(es, INDICES["memory"], cr)
        shares = search(es, SHARES_INDEX, cr)
    finally:
        es.close()

    assert {pod_of(d) for d in [*episodes, *training]} == {pod for pod, _ in members}
    assert {pod_of(d) for d in [*memory, *shares]} == {"memory-0"}, "the sidecar reports the collective's memory"
    assert max(d["size"] for d in memory) == 2 * STEPS
    lengths, epsilons = {}, {}
    for pod, identity in members:
        mine = sorted((d for d in episodes if pod_of(d) == pod), key=lambda d: d["episode"])
        records = metrics(runs[pod][2], identity.agent_id, "episode")
        sent = [(r["episode"], r["length"], r["return"]) for r in records]
        assert sent and [(d["episode"], d["length"], d["episode_return"]) for d in mine] == sent
        assert {d["agent"] for d in mine} == {identity.agent_id}
        lengths[pod] = [d["length"] for d in mine[:8]]
        reports = [d for d in training if pod_of(d) == pod]
        assert {d["agent"] for d in reports} == {identity.agent_id}
        last = max(reports, key=lambda d: d["env_steps"])
        # Annealed within the budget to this member's own place on the ladder.
        assert last["epsilon"] == pytest.approx(identity.ladder_epsilon, rel=1e-9)
        epsilons[pod] = last["epsilon"]
    (a, _), (b, _) = members
    assert abs(epsilons[a] - epsilons[b]) > 0.01, "each member explores at its own place on the ladder"
    assert lengths[a] and lengths[a] != lengths[b], "different seeds: the members played different games"

    # The sidecar and the indexer stop on SIGTERM as their pods' containers must; no secret reached a log.
    assert processes.stop("monitor") == 0 and processes.stop("indexer") == 0
    logs = "".join(processes.log(name) for name in processes.procs)
    logs += "".join(p.read_text() for _, _, run_dir in runs.values() for p in (run_dir / "logs").glob("*.log"))
    assert "Traceback" not in logs and not any(password in logs for password in passwords.values())

    # A config change (a new learning rate and a larger budget) rolls the agents: the pod template's checksum
    # changes. The new pod of agent k starts with an empty run dir, resumes from k's checkpoint in the model store
    # with its env-step counter kept, and goes on with the new config.
    changed = {**SPEC, "agents": {**SPEC["agents"], "steps": 2 * STEPS,
                                  "learner": {**SPEC["agents"]["learner"], "lr": 5e-4}}}
    rolled = by_kind(render_collective(cr, NAMESPACE, changed, material))

    def checksum(found: Mapping[tuple[str, str], dict[str, Any]]) -> str:
        template = found[("StatefulSet", f"{cr}-agents")]["spec"]["template"]
        return str(template["metadata"]["annotations"][names.CONFIG_CHECKSUM_ANNOTATION])

    assert checksum(rolled) != checksum(children)
    rolled_config = tmp_path / "rolled" / CONFIG_KEY
    rolled_config.parent.mkdir()
    rolled_config.write_text(rolled[("ConfigMap", f"{cr}-config")]["data"][CONFIG_KEY])
    pod, identity = members[1]
    args, env, _ = runs[pod]
    new_run = tmp_path / f"{pod}-rolled" / "run"
    new_pod = f"{pod}-rolled"
    processes.start(new_pod, [arg.replace(str(config_file), str(rolled_config)) for arg in args],
                    {**env, "BORG_HIVE__OUT": str(new_run)})
    eventually(lambda: "waiting to be released" in processes.log(new_pod) or processes.procs[new_pod].poll()
               is not None, "the rolled member done and waiting", 300, 0.5)  # fmt: skip
    assert processes.stop(new_pod) == 0, processes.log(new_pod)[-3000:]
    saved, state = read_checkpoint(agent_checkpoint_path(new_run, identity.agent_id))
    assert state.env_steps == 2 * STEPS and saved.learner.lr == 5e-4
    assert state.learner["optimizer"]["param_groups"][0]["lr"] == 5e-4, "it trained with the new rate"
    played = metrics(new_run, identity.agent_id, "episode")
    assert played and min(r["env_steps"] for r in played) > STEPS, "nothing before the roll was played again"
    assert "resumes from the model store" in processes.log(new_pod)
    assert f"resumed env_steps={STEPS}" in (new_run / "logs" / f"agent-{identity.agent_id}.log").read_text()
    assert "Traceback" not in processes.log(new_pod) and passwords["agent-password"] not in processes.log(new_pod)
