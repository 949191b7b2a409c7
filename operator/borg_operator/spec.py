"""The `BorgCollective` spec as a typed model, and its one mapping onto borgdqn's config model.

The CRD speaks camelCase, borgdqn's YAML speaks snake_case; the sections the two share (env, learner, network,
policy, epsilon ladder, replay) are the *same* pydantic models, so a field added to `borgdqn.config` shows up
in the CRD (the generator in `crd.py` walks these models) and in the agents' ConfigMap without a second list.
`to_snake`/`to_camel` are the only name mapping; `tests/operator/test_spec.py` holds them to it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from borg_operator.images import DEFAULT_AGENT_IMAGE, DEFAULT_KAFKA_IMAGE, DEFAULT_MEMORY_IMAGE
from borgdqn.config import (
    AssimilationConfig,
    BorgConfig,
    EnvConfig,
    EpsilonGreedyPolicySpec,
    EpsilonLadder,
    HiveConfig,
    LearnerConfig,
    LinearSchedule,
    NetworkConfig,
    PolicySpec,
    ReplayConfig,
    Schedule,
    TelemetryConfig,
    is_union_tag,
)

DEFAULT_ELASTIC_VERSION = "8.19.7"
DEFAULT_STRIMZI_KAFKA_VERSION = "4.1.0"
REDIS_PORT = 6379
GPU_RESOURCE = "nvidia.com/gpu"  # what `agents.gpus` counts: the NVIDIA device plugin's extended resource
KAFKA_PORT = 9092
STRIMZI_TLS_PORT = 9093  # Strimzi's convention for an internal TLS listener (9092 is its plain one)
CONFIG_PATH = "/etc/borgdqn/borgdqn.yaml"
RUN_DIR = "/var/lib/borgdqn/run"
MEMORY_TLS_DIR = "/var/run/secrets/borg-tls"  # the memory's TLS Secret in the pods that dial or serve it
MEMORY_CA_FILE = f"{MEMORY_TLS_DIR}/ca.crt"
# Kafka's CA and the client certificate, whichever Secrets they come from, in every pod that talks to Kafka.
KAFKA_CLIENT_TLS_DIR = "/var/run/secrets/borg-kafka"
KAFKA_CA_FILE, KAFKA_CERT_FILE, KAFKA_KEY_FILE = (f"{KAFKA_CLIENT_TLS_DIR}/{key}"
                                                  for key in ("ca.crt", "client.crt", "client.key"))


class SpecError(ValueError):
    """A spec the schema let through but the operator cannot run; the message is one line for the status."""


def to_camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


_CAPITAL = re.compile(r"(?<!^)(?=[A-Z])")


def to_snake(name: str) -> str:
    return _CAPITAL.sub("_", name).lower()


def snake_keys(value: Any) -> Any:
    """Recursively rename camelCase mapping keys to snake_case (values, e.g. policy kinds, are left alone)."""
    if isinstance(value, dict):
        return {to_snake(key): snake_keys(item) for key, item in value.items()}
    if isinstance(value, list):
        return [snake_keys(item) for item in value]
    return value


def camel_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {to_camel(key): camel_keys(item) for key, item in value.items()}
    if isinstance(value, list):
        return [camel_keys(item) for item in value]
    return value


class CrdModel(BaseModel):
    """Operator-only parts of the spec: camelCase on the wire, snake_case in Python, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


class ResourcesSpec(CrdModel):
    cpu: str = Field(default="4", description="CPU request and limit of each pod, e.g. 4 or 3500m")
    memory: str = Field(default="16Gi", description="memory request and limit of each pod, e.g. 16Gi")


class AgentResourcesSpec(CrdModel):
    cpu: str = Field(default="4", description="CPU request and limit of each agent pod, e.g. 4 or 3500m")
    memory: str = Field(default="", description="memory request and limit of each agent pod, e.g. 16Gi; empty: "
                        "sized from memory.capacity (the agent's replica of the log, ~7.1 KB per Atari step) plus "
                        "6Gi (2Gi without a GPU)")


class StorageSpec(CrdModel):
    size: str = Field(default="20Gi", description="size of the persistent volume claim")
    storage_class_name: str | None = Field(default=None, description="storage class; empty: the cluster default")


class AgentsSpec(CrdModel):
    replicas: int = Field(default=2, ge=0, le=1024, description="agent pods (the scale subresource)")
    image: str = Field(default=DEFAULT_AGENT_IMAGE, description="the agent image (torch, ALE, borgdqn)")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(default="IfNotPresent",
                                                                        description="image pull policy")
    gpus: int = Field(default=1, ge=0, le=16, description="nvidia.com/gpu per agent pod (0: CPU agents)")
    resources: AgentResourcesSpec = Field(default_factory=AgentResourcesSpec,
                                          description="CPU and memory per agent pod")
    node_selector: dict[str, str] = Field(default_factory=dict, description="node labels an agent pod needs")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list,
        description="extra tolerations (the nvidia.com/gpu NoSchedule taint is always tolerated when gpus > 0)",
    )
    priority_class_name: str | None = Field(default=None, description="priority class of the agent pods")
    threads: int = Field(default=4, ge=1, le=256, description="torch threads in each agent")
    steps: int = Field(default=50_000_000, ge=1, description="env steps each agent pod runs before it stops")
    seed: int = Field(default=0, description="base seed; each pod adds its own offset")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="the learner's hyper-parameters")
    network: NetworkConfig = Field(default_factory=NetworkConfig, description="the Q-network")
    policy: PolicySpec = Field(default_factory=EpsilonGreedyPolicySpec, description="the acting policy")
    epsilon_ladder: EpsilonLadder = Field(default_factory=EpsilonLadder, description="Ape-X style epsilons")
    assimilation: AssimilationConfig = Field(
        default_factory=AssimilationConfig,
        description="weak agents adopt strong agents' networks from the model store (population-based training)")

    @model_validator(mode="before")
    @classmethod
    def _snake_sections(cls, data: Any) -> Any:
        # The embedded borgdqn models name their fields in snake_case; the CRD sends camelCase.
        if isinstance(data, dict):
            data = {key: snake_keys(value) if key in _BORGDQN_SECTIONS else value for key, value in data.items()}
        return data


def _replay_field(name: str, **overrides: Any) -> Any:
    """A field of borgdqn's ReplayConfig (type, bounds, description) with the cluster's default, so the CRD's
    memory section and the agents' `replay` section cannot drift apart."""
    return FieldInfo.merge_field_infos(ReplayConfig.model_fields[name], **overrides)


class MemorySpec(CrdModel):
    # Larger defaults than one machine's: a cluster memory is shared by many GPU agents for a long run.
    capacity: int = _replay_field("capacity", default=1_000_000)
    chunk_length: int = _replay_field("chunk_length")
    prioritized: bool = _replay_field("prioritized")
    alpha: float = _replay_field("alpha")
    beta: Schedule = _replay_field(
        "beta", default_factory=lambda: LinearSchedule(start=0.4, end=1.0, steps=10_000_000))
    priority_eps: float = _replay_field("priority_eps")
    outbox_steps: int = _replay_field("outbox_steps")
    model_store_bytes: int = _replay_field("model_store_bytes")
    persistence: bool = Field(default=True, description="append-only file on the volume: the memory survives restarts")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="the memory's volume")
    image: str = Field(default=DEFAULT_MEMORY_IMAGE, description="the memory image (Redis + the monitor)")
    resources: ResourcesSpec = Field(default_factory=lambda: ResourcesSpec(cpu="2", memory="16Gi"),
                                     description="CPU and memory of the memory pod")

    @model_validator(mode="before")
    @classmethod
    def _snake_beta(cls, data: Any) -> Any:
        if isinstance(data, dict) and "beta" in data:
            data = {**data, "beta": snake_keys(data["beta"])}
        return data


class KafkaSpec(CrdModel):
    mode: Literal["managed", "strimzi", "external"] = Field(
        default="managed",
        description="managed: the operator runs a KRaft StatefulSet; strimzi: a Strimzi Kafka resource; "
        "external: bootstrapServers",
    )
    bootstrap_servers: str | None = Field(default=None, description="external mode: HOST:PORT[,HOST:PORT]")
    replicas: int = Field(default=1, ge=1, le=9, description="managed/strimzi: brokers")
    image: str = Field(default=DEFAULT_KAFKA_IMAGE, description="managed: the Kafka image")
    version: str = Field(default=DEFAULT_STRIMZI_KAFKA_VERSION, description="strimzi: the Kafka version")
    storage: StorageSpec = Field(default_factory=lambda: StorageSpec(size="10Gi"), description="broker volumes")
    retention_hours: int = Field(default=168, ge=1, description="how long telemetry stays in Kafka")
    tls: bool | None = Field(
        default=None,
        description="managed: a TLS listener that wants a client certificate (the operator makes the CA and both "
        "certificates in the Secret <name>-kafka-tls); strimzi: Strimzi's tls listener with authentication tls "
        "and a KafkaUser <name>-telemetry; external: TLS to the brokers. Unset: on, but off when external",
    )
    ca_secret: str | None = Field(default=None, description="external, with tls: a Secret whose ca.crt is the "
                                  "brokers' CA (unset: the system's CAs)")
    client_cert_secret: str | None = Field(default=None, description="external, with tls: a Secret whose tls.crt "
                                           "and tls.key log the clients in by mutual TLS")
    login_secret: str | None = Field(default=None, description="external, with tls: a Secret whose username and "
                                     "password log the clients in by SASL/SCRAM-SHA-512")

    @model_validator(mode="after")
    def _external_needs_servers(self) -> KafkaSpec:
        if self.mode == "external" and not self.bootstrap_servers:
            raise ValueError("kafka.bootstrapServers is required when kafka.mode is external")
        given = [field for field, value in (("caSecret", self.ca_secret), ("clientCertSecret", self.client_cert_secret),
                                            ("loginSecret", self.login_secret)) if value]
        if given and self.mode != "external":
            raise ValueError(f"kafka.{given[0]} is for external mode (the operator renders the others' own)")
        if given and not self.tls:
            raise ValueError(f"kafka.{given[0]} needs kafka.tls: true")
        if self.client_cert_secret and self.login_secret:
            raise ValueError("kafka: clientCertSecret or loginSecret, not both")
        return self

    @property
    def secured(self) -> bool:
        """TLS to the brokers (the default of a Kafka the operator runs or asks Strimzi for)."""
        return self.tls if self.tls is not None else self.mode != "external"

    @property
    def client_cert(self) -> bool:
        """The clients present a certificate: always with a TLS Kafka of ours or Strimzi's, with clientCertSecret
        otherwise."""
        return self.secured and (self.mode != "external" or bool(self.client_cert_secret))


INGRESS_NEEDS_HOST_AND_TLS = ("needs host and tlsSecretName when enabled (Kibana's login crosses it), or "
                              "allowInsecure: true")


class IngressSpec(CrdModel):
    enabled: bool = Field(default=False, description="expose Kibana through an Ingress")
    host: str | None = Field(default=None, description="the Ingress host, e.g. kibana.example.org")
    class_name: str | None = Field(default=None, description="ingressClassName; empty: the cluster default")
    tls_secret_name: str | None = Field(default=None, description="TLS secret for the host; empty: no TLS")
    allow_insecure: bool = Field(default=False, description="allow the Ingress without a host or without TLS "
                                 "(Kibana's login then crosses the network in clear): a trusted network only")

    @model_validator(mode="after")
    def _host_and_tls(self) -> IngressSpec:
        if self.enabled and not self.allow_insecure and not (self.host and self.tls_secret_name):
            raise ValueError(INGRESS_NEEDS_HOST_AND_TLS)
        return self


class KibanaSpec(CrdModel):
    count: int = Field(default=1, ge=0, le=16, description="Kibana instances")
    ingress: IngressSpec = Field(default_factory=IngressSpec, description="how users reach Kibana")


class ElasticSpec(CrdModel):
    mode: Literal["eck", "disabled"] = Field(default="eck", description="eck: ECK Elasticsearch + Kibana; disabled")
    version: str = Field(default=DEFAULT_ELASTIC_VERSION, description="Elastic Stack version (8.x)")
    count: int = Field(default=1, ge=1, le=64, description="Elasticsearch nodes")
    storage: StorageSpec = Field(default_factory=lambda: StorageSpec(size="20Gi"), description="data volumes")
    kibana: KibanaSpec = Field(default_factory=KibanaSpec, description="Kibana and its Ingress")


class CollectiveSpec(CrdModel):
    env: EnvConfig = Field(default_factory=EnvConfig, description="the environment every agent plays")
    agents: AgentsSpec = Field(default_factory=AgentsSpec, description="the GPU agents")
    memory: MemorySpec = Field(default_factory=MemorySpec, description="the shared replay memory (Redis)")
    kafka: KafkaSpec = Field(default_factory=KafkaSpec, description="telemetry transport")
    elastic: ElasticSpec = Field(default_factory=ElasticSpec, description="Elasticsearch and Kibana")
    telemetry_buffer_events: int = Field(default=10_000, ge=100, le=10_000_000,
                                         description="events each process buffers while Kafka is away")

    @model_validator(mode="before")
    @classmethod
    def _snake_env(cls, data: Any) -> Any:
        if isinstance(data, dict) and "env" in data:
            data = {**data, "env": snake_keys(data["env"])}
        return data


_BORGDQN_SECTIONS = ("learner", "network", "policy", "epsilonLadder", "epsilon_ladder", "assimilation")


def parse_spec(spec: dict[str, Any]) -> CollectiveSpec:
    """The CR's spec -> the model; SpecError with one line naming the first bad field."""
    try:
        return CollectiveSpec.model_validate(spec)
    except ValidationError as err:
        first = err.errors()[0]
        # pydantic puts the tag of a tagged union (e.g. "linear") into the location: not a field the user wrote.
        where = ".".join(to_camel(str(part)) for part in first["loc"] if not is_union_tag(part))
        msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise SpecError(f"spec.{where}: {msg}" if where else f"spec: {msg}") from None


def memory_host(name: str, namespace: str) -> str:
    return f"{name}-memory.{namespace}.svc"


def kafka_bootstrap(name: str, namespace: str, kafka: KafkaSpec) -> str:
    if kafka.mode == "external":
        assert kafka.bootstrap_servers is not None
        return kafka.bootstrap_servers
    if kafka.mode == "strimzi":
        # Strimzi names the bootstrap Service <cluster>-kafka-bootstrap; our Kafka resource is <name>-kafka.
        return f"{name}-kafka-kafka-bootstrap.{namespace}.svc:{STRIMZI_TLS_PORT if kafka.secured else KAFKA_PORT}"
    return f"{name}-kafka.{namespace}.svc:{KAFKA_PORT}"


def kafka_client_files(kafka: KafkaSpec) -> dict[str, Any]:
    """The telemetry settings (kafka_tls, kafka_ca_file, kafka_cert_file, kafka_key_file) of a pod that talks to
    ``kafka``, its files where the pods mount them (builders/kafka.py: kafka_client)."""
    if not kafka.secured:
        return {"kafka_tls": False}
    ca = kafka.mode != "external" or bool(kafka.ca_secret)
    return {"kafka_tls": True, "kafka_ca_file": Path(KAFKA_CA_FILE) if ca else None,
            "kafka_cert_file": Path(KAFKA_CERT_FILE) if kafka.client_cert else None,
            "kafka_key_file": Path(KAFKA_KEY_FILE) if kafka.client_cert else None}


def to_borg_config(name: str, namespace: str, spec: CollectiveSpec) -> BorgConfig:
    """What one agent pod runs: the spec's shared sections plus the cluster's addresses (one agent per pod)."""
    agents, memory = spec.agents, spec.memory
    try:
        return BorgConfig(
            env=spec.env,
            network=agents.network,
            learner=agents.learner,
            policy=agents.policy,
            epsilon_ladder=agents.epsilon_ladder,
            replay=ReplayConfig(
                backend="redis",
                redis_url=f"rediss://{memory_host(name, namespace)}:{REDIS_PORT}/0",
                redis_ca_file=Path(MEMORY_CA_FILE),
                redis_name=name,
                capacity=memory.capacity,
                chunk_length=memory.chunk_length,
                prioritized=memory.prioritized,
                alpha=memory.alpha,
                beta=memory.beta,
                priority_eps=memory.priority_eps,
                outbox_steps=memory.outbox_steps,
                model_store_bytes=memory.model_store_bytes,
            ),
            hive=HiveConfig(agents=1, steps=agents.steps, seed=agents.seed, out=Path(RUN_DIR),
                            threads_per_agent=agents.threads, live="off", assimilation=agents.assimilation),
            telemetry=TelemetryConfig(kafka=kafka_bootstrap(name, namespace, spec.kafka), collective=name,
                                      buffer_events=spec.telemetry_buffer_events,
                                      **kafka_client_files(spec.kafka)),
        )
    except ValidationError as err:
        first = err.errors()[0]
        raise SpecError(f"{'.'.join(str(p) for p in first['loc']) or 'spec'}: {first['msg']}") from None
