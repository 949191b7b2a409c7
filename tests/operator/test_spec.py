"""The BorgCollective spec and borgdqn's config model are one mapping (no cluster needed).

The CRD (generated from the spec models) names every field of borgdqn's shared sections in camelCase with the
same default; the defaults the apiserver would fill in are the models' defaults; `to_borg_config` carries every
value into what the agents run; names map both ways; a bad spec is one line that names the field.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import annotated_types
import pytest
import yaml
from pydantic import BaseModel

from borg_operator.crd import crd
from borg_operator.schema import dump
from borg_operator.spec import (
    AgentsSpec,
    CollectiveSpec,
    ElasticSpec,
    IngressSpec,
    KafkaSpec,
    KibanaSpec,
    MemorySpec,
    ResourcesSpec,
    SpecError,
    StorageSpec,
    camel_keys,
    parse_spec,
    snake_keys,
    to_borg_config,
    to_camel,
    to_snake,
)
from borgdqn.config import (
    BoltzmannPolicySpec,
    BorgConfig,
    ConstantSchedule,
    EnvConfig,
    EpsilonGreedyPolicySpec,
    EpsilonLadder,
    ExponentialSchedule,
    GreedyPolicySpec,
    LearnerConfig,
    LinearSchedule,
    MixtureComponent,
    MixturePolicySpec,
    NetworkConfig,
    PiecewiseSchedule,
    RandomPolicySpec,
    ReplayConfig,
    SwitchPolicySpec,
    build_config,
    dump_config,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("borgcollective-*.yaml"))
ALL_MODELS: list[type[BaseModel]] = [
    CollectiveSpec, AgentsSpec, MemorySpec, KafkaSpec, ElasticSpec, KibanaSpec, IngressSpec, ResourcesSpec,
    StorageSpec, EnvConfig, LearnerConfig, NetworkConfig, EpsilonLadder, ConstantSchedule, LinearSchedule,
    ExponentialSchedule, PiecewiseSchedule, RandomPolicySpec, GreedyPolicySpec, EpsilonGreedyPolicySpec,
    BoltzmannPolicySpec, SwitchPolicySpec, MixturePolicySpec, MixtureComponent,
]
# borgdqn's sections as the CRD embeds them, and where.
SECTIONS: list[tuple[type[BaseModel], tuple[str, ...]]] = [
    (EnvConfig, ("env",)),
    (LearnerConfig, ("agents", "learner")),
    (NetworkConfig, ("agents", "network")),
    (EpsilonLadder, ("agents", "epsilonLadder")),
]
# The memory's replay fields and their names in borgdqn's ReplayConfig.
REPLAY_FIELDS = {"capacity": "capacity", "chunk_length": "chunk_length", "prioritized": "prioritized",
                 "alpha": "alpha", "beta": "beta", "priority_eps": "priority_eps",
                 "outbox_steps": "outbox_steps", "model_store_bytes": "model_store_bytes"}


def spec_schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def schema_at(*path: str) -> dict[str, Any]:
    node = spec_schema()
    for part in path:
        node = node["properties"][part]
    return node


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting as the apiserver does it: absent properties get their default, then recurse."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for key, sub in schema["properties"].items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = apply_defaults(out[key], sub)
        return out
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


# ------------------------------------------------------------------------------------------------- the mapping
@pytest.mark.parametrize(("model", "path"), SECTIONS, ids=[m.__name__ for m, _ in SECTIONS])
def test_every_borgdqn_field_is_in_the_crd_camelcased_with_its_default_bounds_and_description(
        model: type[BaseModel], path: tuple[str, ...]) -> None:
    section = schema_at(*path)
    assert set(section["properties"]) == {to_camel(name) for name in model.model_fields}
    for name, info in model.model_fields.items():
        prop = section["properties"][to_camel(name)]
        default = info.get_default(call_default_factory=True)
        if default is None:
            assert "default" not in prop, name
            assert prop["nullable"] is True, name
        else:
            assert prop["default"] == dump(default), name
        assert prop["description"] == info.description, name
        for bound in info.metadata:
            if isinstance(bound, annotated_types.Ge):
                assert prop["minimum"] == bound.ge and "exclusiveMinimum" not in prop, name
            if isinstance(bound, annotated_types.Gt):
                assert (prop["minimum"], prop["exclusiveMinimum"]) == (bound.gt, True), name
            if isinstance(bound, annotated_types.Le):
                assert prop["maximum"] == bound.le, name
    assert section["default"] == {}  # the properties' own defaults fill it


def test_enums_bounds_and_types_come_from_the_models() -> None:
    assert schema_at("agents", "learner", "targetUpdate")["enum"] == ["hard", "soft"]
    assert schema_at("agents", "network", "torso")["enum"] == ["auto", "nature_cnn", "mlp"]
    assert schema_at("kafka", "mode")["enum"] == ["managed", "strimzi", "external"]
    assert schema_at("elastic", "mode")["enum"] == ["eck", "disabled"]
    replicas = schema_at("agents", "replicas")
    assert (replicas["type"], replicas["minimum"], replicas["maximum"], replicas["default"]) == ("integer", 0, 1024, 2)
    lr = schema_at("agents", "learner", "lr")
    assert (lr["type"], lr["minimum"], lr["exclusiveMinimum"]) == ("number", 0.0, True)
    assert schema_at("agents", "learner", "maxGradNorm")["nullable"] is True
    hidden = schema_at("agents", "network", "mlpHidden")
    assert hidden["items"] == {"type": "integer", "format": "int64", "minimum": 0, "exclusiveMinimum": True}
    assert hidden["minItems"] == 1
    points = schema_at("memory", "beta")["properties"]["points"]
    assert points["items"] == {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
    assert schema_at("agents", "nodeSelector")["additionalProperties"] == {"type": "string"}
    toleration = schema_at("agents", "tolerations")["items"]["properties"]
    assert set(toleration) == {"key", "operator", "value", "effect", "tolerationSeconds"}


def test_the_memorys_replay_fields_are_borgdqns_with_the_same_types_and_bounds() -> None:
    for ours, theirs in REPLAY_FIELDS.items():
        mine, replay = MemorySpec.model_fields[ours], ReplayConfig.model_fields[theirs]
        assert mine.annotation == replay.annotation, ours
        assert mine.metadata == replay.metadata, ours


def test_the_defaults_the_apiserver_fills_in_are_the_models_defaults() -> None:
    filled = apply_defaults({}, spec_schema())
    assert filled == dump(CollectiveSpec())
    assert parse_spec(filled) == CollectiveSpec()
    # A section given in part gets the rest from the schema, as pydantic does from the model.
    partial = {"memory": {"resources": {"cpu": "8"}, "storage": {"storageClassName": "fast"}}, "kafka": {}}
    assert apply_defaults(partial, spec_schema()) == dump(parse_spec(partial))


def walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for key, sub in schema.get("properties", {}).items():
        found += walk(sub, f"{path}.{key}")
    if "items" in schema:
        found += walk(schema["items"], f"{path}[]")
    return found


def unknown_to(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Paths in `value` that `schema` does not declare (and so the apiserver would prune)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in schema:
        return []
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        return [p for key, item in value.items()
                for p in ([f"{path}.{key}"] if key not in properties else unknown_to(properties[key], item,
                                                                                      f"{path}.{key}"))]
    if isinstance(value, list) and "items" in schema:
        return [p for item in value for p in unknown_to(schema["items"], item, f"{path}[]")]
    return []


def test_every_property_is_described_and_every_model_field_is_in_the_crd() -> None:
    root = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    undescribed = [path for path, node in walk(root)
                   if path not in ("", ".metadata") and not path.endswith("[]") and not node.get("description")]
    assert undescribed == []
    # The full spec sets every field of every section, and policies and schedules of every kind.
    assert unknown_to(spec_schema(), dump(parse_spec(full_spec()))) == []
    assert unknown_to(spec_schema(), {"agents": {"learnr": {}}}) == [".agents.learnr"]


def model_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


@pytest.mark.parametrize("model", ALL_MODELS, ids=[m.__name__ for m in ALL_MODELS])
def test_field_names_round_trip_between_snake_and_camel_case(model: type[BaseModel]) -> None:
    for name in model_names(model):
        assert to_snake(to_camel(name)) == name
        alias = model.model_fields[name].alias
        assert alias in (None, to_camel(name))


def test_camel_and_snake_keys_are_inverse_on_a_whole_spec_and_leave_values_alone() -> None:
    spec = full_spec()
    assert camel_keys(snake_keys(spec)) == spec
    assert snake_keys(spec)["agents"]["policy"]["components"][0]["policy"]["kind"] == "epsilon_greedy"


# --------------------------------------------------------------------------------------- to_borg_config
def test_the_default_spec_becomes_a_valid_config_with_the_clusters_addresses() -> None:
    spec = parse_spec({})
    config = to_borg_config("pong", "games", spec)
    assert BorgConfig.model_validate(config.model_dump()) == config
    assert config.env == EnvConfig()
    assert (config.learner, config.network, config.epsilon_ladder) == (LearnerConfig(), NetworkConfig(),
                                                                       EpsilonLadder())
    assert config.policy == EpsilonGreedyPolicySpec()
    replay = config.replay
    assert (replay.backend, replay.redis_url, replay.redis_name) == ("redis", "rediss://pong-memory.games.svc:6379/0",
                                                                     "pong")
    assert str(replay.redis_ca_file) == "/var/run/secrets/borg-tls/ca.crt"  # TLS only, verified against its CA
    assert (replay.capacity, replay.chunk_length, replay.outbox_steps) == (1_000_000, 32, 20_000)
    assert replay.beta == LinearSchedule(start=0.4, end=1.0, steps=10_000_000)
    assert (config.hive.agents, config.hive.steps, config.hive.threads_per_agent) == (1, 50_000_000, 4)
    assert config.hive.live == "off"
    assert config.telemetry.kafka == "pong-kafka.games.svc:9092"
    assert config.telemetry.collective == "pong"
    assert config.telemetry.buffer_events == 10_000


def full_spec() -> dict[str, Any]:
    """A spec (camelCase, as in a manifest) that changes every field of every section from its default."""
    return {
        "env": {"id": "ALE/Breakout-v5", "numEnvs": 4, "frameStack": 2, "frameSkip": 3, "screenSize": 64,
                "noopMax": 10, "terminalOnLifeLoss": True, "clipRewards": False, "maxEpisodeSteps": None,
                "stickyActions": 0.25},
        "agents": {
            "replicas": 5, "image": "registry.example/agent:1", "imagePullPolicy": "Always", "gpus": 2,
            "resources": {"cpu": "3500m", "memory": "12Gi"}, "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
            "priorityClassName": "high", "threads": 8, "steps": 1000, "seed": 42,
            "learner": {"gamma": 0.97, "nStep": 5, "double": False, "lr": 3e-4, "adamEps": 1e-8, "batchSize": 128,
                        "huberDelta": 2.0, "maxGradNorm": None, "targetUpdate": "soft", "targetUpdatePeriod": 500,
                        "tau": 0.01, "learningStarts": 5000, "updateEvery": 2, "device": "cuda:1",
                        "mixedPrecision": "off", "compile": True, "burnIn": 10, "sequenceLength": 20,
                        "concurrent": "on", "actorSyncEvery": 25, "rateLimitSlack": 8},
            "network": {"torso": "mlp", "mlpHidden": [64, 32], "dueling": False, "lstm": True, "lstmHidden": 128},
            "policy": {"kind": "mixture", "name": "mix", "components": [
                {"policy": {"kind": "epsilon_greedy", "name": "explore",
                            "epsilon": {"kind": "exponential", "start": 1.0, "end": 0.05, "decay": 0.5,
                                        "steps": 1000}},
                 "weight": {"kind": "piecewise", "points": [[0, 1.0], [10_000, 0.2]]}},
                {"policy": {"kind": "switch", "first": {"kind": "random"},
                            "second": {"kind": "boltzmann", "temperature": {"kind": "constant", "value": 0.5}},
                            "after": 30},
                 "weight": {"kind": "linear", "start": 0.0, "end": 1.0, "steps": 10_000, "begin": 100}},
                {"policy": {"kind": "greedy"}, "weight": {"kind": "constant", "value": 0.1}},
            ]},
            "epsilonLadder": {"enabled": True, "base": 0.3, "alpha": 5.0},
            "assimilation": {"enabled": True, "every": 50_000, "bottom": 0.2, "top": 0.3, "perturb": False,
                             "factors": [0.5, 2.0], "lrBounds": [1e-5, 1e-3], "epsilonFloorBounds": [0.01, 0.2]},
        },
        "memory": {"capacity": 500_000, "chunkLength": 16, "prioritized": False, "alpha": 0.5,
                   "beta": {"kind": "constant", "value": 1.0}, "priorityEps": 1e-5, "outboxSteps": 4096,
                   "modelStoreBytes": 2 << 30,
                   "persistence": False, "storage": {"size": "5Gi", "storageClassName": "fast"},
                   "image": "registry.example/memory:1", "resources": {"cpu": "1", "memory": "4Gi"}},
        "kafka": {"mode": "external", "bootstrapServers": "kafka-0.example:9092,kafka-1.example:9092", "replicas": 3,
                  "image": "registry.example/kafka:1", "version": "4.0.0",
                  "storage": {"size": "1Gi", "storageClassName": "slow"}, "retentionHours": 24,
                  "tls": True, "caSecret": "kafka-ca", "clientCertSecret": "kafka-client"},
        "elastic": {"mode": "disabled", "version": "8.18.0", "count": 3,
                    "storage": {"size": "2Gi", "storageClassName": "slow"},
                    "kibana": {"count": 2, "ingress": {"enabled": True, "host": "kibana.example.org",
                                                       "className": "nginx", "tlsSecretName": "kibana-tls",
                                                       "allowInsecure": True}}},
        "telemetryBufferEvents": 500,
    }


def changed_fields(model: BaseModel) -> list[str]:
    """Fields of a model (recursively into model-typed fields) still at their default."""
    same = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if info.is_required():
            continue
        default = info.get_default(call_default_factory=True)
        if isinstance(value, BaseModel) and type(value) is type(default) and name not in ("policy", "beta"):
            same += [f"{name}.{inner}" for inner in changed_fields(value)]
        elif value == default:
            same.append(name)
    return same


def test_the_full_spec_changes_every_field_and_the_config_carries_every_value() -> None:
    spec = parse_spec(full_spec())
    # A field added to a section must be added to full_spec() too. kafka.loginSecret excludes clientCertSecret
    # (tests/telemetry/test_kafka_tls.py renders it).
    assert changed_fields(spec) == ["kafka.login_secret"]
    config = to_borg_config("breakout", "ml", spec)
    assert config.env == spec.env
    assert config.learner == spec.agents.learner
    assert config.network == spec.agents.network
    assert config.policy == spec.agents.policy
    assert config.epsilon_ladder == spec.agents.epsilon_ladder
    assert config.hive.assimilation == spec.agents.assimilation
    assert config.hive.assimilation.epsilon_floor_bounds == (0.01, 0.2)  # camelCase undone
    for ours, theirs in REPLAY_FIELDS.items():
        assert getattr(config.replay, theirs) == getattr(spec.memory, ours), ours
    assert config.replay.redis_url == "rediss://breakout-memory.ml.svc:6379/0"
    assert (config.hive.steps, config.hive.seed, config.hive.threads_per_agent) == (1000, 42, 8)
    assert config.telemetry.kafka == "kafka-0.example:9092,kafka-1.example:9092"
    assert config.telemetry.buffer_events == 500
    assert (config.telemetry.kafka_tls, config.telemetry.kafka_ca_file, config.telemetry.kafka_cert_file,
            config.telemetry.kafka_key_file) == (True, *(Path(f"/var/run/secrets/borg-kafka/{name}")
                                                        for name in ("ca.crt", "client.crt", "client.key")))
    # The nested policies (the CRD keeps them opaque) arrive typed, with the manifest's camelCase undone.
    assert config.policy.kind == "mixture"
    switch = config.policy.components[1].policy
    assert isinstance(switch, SwitchPolicySpec)
    assert switch.second == BoltzmannPolicySpec(temperature=ConstantSchedule(value=0.5))
    # What the ConfigMap holds reads back as the same config in the agent.
    assert build_config(yaml.safe_load(dump_config(config)), environ={}) == config


def test_strimzi_mode_points_agents_at_strimzis_bootstrap_service() -> None:
    config = to_borg_config("pong", "games", parse_spec({"kafka": {"mode": "strimzi"}}))
    assert config.telemetry.kafka == "pong-kafka-kafka-bootstrap.games.svc:9093"  # its tls listener
    plain = to_borg_config("pong", "games", parse_spec({"kafka": {"mode": "strimzi", "tls": False}}))
    assert plain.telemetry.kafka == "pong-kafka-kafka-bootstrap.games.svc:9092"


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_the_examples_parse_and_become_configs(example: Path) -> None:
    manifest = yaml.safe_load(example.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("borg.dev/v1alpha1", "BorgCollective")
    to_borg_config(manifest["metadata"]["name"], "default", parse_spec(manifest["spec"]))


def test_there_is_a_minimal_and_a_full_example() -> None:
    assert [path.name for path in EXAMPLES] == ["borgcollective-minimal.yaml", "borgcollective-pong.yaml"]


# ---------------------------------------------------------------------------------------------- bad specs
@pytest.mark.parametrize(("spec", "expected"), [
    ({"agents": {"replicas": -1}}, "spec.agents.replicas: Input should be greater than or equal to 0"),
    ({"agents": {"replicas": "two"}}, "spec.agents.replicas: Input should be a valid integer"),
    ({"agents": {"learner": {"lr": 0}}}, "spec.agents.learner.lr: Input should be greater than 0"),
    ({"agents": {"learner": {"nStepp": 2}}}, "spec.agents.learner.nStepp: unknown field"),
    ({"agents": {"policy": {"kind": "clever"}}}, "spec.agents.policy: Input tag 'clever'"),
    ({"agents": {"policy": {"kind": "switch", "first": {"kind": "random"}, "second": {"kind": "nope"}, "after": 3}}},
     "spec.agents.policy.second: Input tag 'nope'"),
    ({"agents": {"policy": {"kind": "epsilon_greedy", "epsilon": {"kind": "linear", "start": 1, "end": 0,
                                                                   "steps": 0}}}},
     "spec.agents.policy.epsilon.steps: Input should be greater than 0"),
    ({"memory": {"beta": {"kind": "piecewise", "points": [[10, 1.0], [0, 0.5]]}}},
     "spec.memory.beta: points must be sorted by step"),
    ({"env": {"numEnvs": 0}}, "spec.env.numEnvs: Input should be greater than or equal to 1"),
    ({"kafka": {"mode": "external"}}, "spec.kafka: kafka.bootstrapServers is required when kafka.mode is external"),
    ({"elastic": {"kibana": {"ingress": {"host": 5}}}}, "spec.elastic.kibana.ingress.host: Input should be a valid"),
    ({"elastic": {"kibana": {"ingress": {"enabled": True, "host": "kibana.example.org"}}}},
     "spec.elastic.kibana.ingress: needs host and tlsSecretName when enabled"),
    ({"elastic": {"kibana": {"ingress": {"enabled": True, "tlsSecretName": "kibana-tls"}}}},
     "spec.elastic.kibana.ingress: needs host and tlsSecretName when enabled"),
    ({"unknownSection": {}}, "spec.unknownSection: unknown field"),
], ids=lambda value: str(value)[:40] if isinstance(value, str) else None)
def test_a_bad_spec_is_one_line_that_names_the_field(spec: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec(spec)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(expected), message


def test_the_docs_name_every_immutable_field() -> None:
    from borg_operator.crd import IMMUTABLE

    text = (ROOT / "docs" / "operator.md").read_text()
    assert [path for path in IMMUTABLE if f"`{path}`" not in text] == []
