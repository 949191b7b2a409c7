"""One validated configuration model for an agent, the replay memory and the hive.

The CLI builds it from defaults < YAML file < ``BORG_*`` environment variables < flags; the operator renders
the same model into a ConfigMap. Every section forbids unknown keys so that a misspelt field is an error, not
a silent default.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from borgdqn.memory.redis.sizing import DEFAULT_MODEL_STORE_BYTES

ENV_PREFIX = "BORG_"
ENV_NESTING = "__"


class ConfigError(ValueError):
    """A configuration the user gave cannot work; the message is one line that names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- schedules
def _kind(kind: str, description: str) -> Any:
    """A tagged union member's ``kind`` (its literal default) and what that kind does (the CRD says it)."""
    return Field(default=kind, description=description)


def _policy_name() -> Any:
    return Field(default=None, description="a name for this policy in telemetry")


class ConstantSchedule(_Strict):
    kind: Literal["constant"] = _kind("constant", "value")
    value: float = Field(description="the value at every step")


class LinearSchedule(_Strict):
    """From ``start`` to ``end`` over ``steps`` steps (after ``begin``), then ``end``."""

    kind: Literal["linear"] = _kind("linear", "from start to end over steps (after begin steps), then end")
    start: float = Field(description="the value at the start")
    end: float = Field(description="the value at the end (and after it)")
    steps: int = Field(gt=0, description="steps from start to end")
    begin: int = Field(default=0, ge=0, description="steps before the schedule starts to move")


class ExponentialSchedule(_Strict):
    """``start * decay ** (step / steps)``, floored (or capped) at ``end``."""

    kind: Literal["exponential"] = _kind("exponential", "start * decay ** (step / steps), floored (or capped) at end")
    start: float = Field(description="the value at the start")
    end: float = Field(description="the value at the end (and after it)")
    decay: float = Field(gt=0.0, lt=1.0, default=0.1,
                         description="factor the value is multiplied by every `steps` steps")
    steps: int = Field(gt=0, description="steps from start to end")


class PiecewiseSchedule(_Strict):
    """Linear interpolation between ``(step, value)`` points; constant outside them."""

    kind: Literal["piecewise"] = _kind("piecewise", "linear between [step, value] points, constant outside them")
    points: list[tuple[int, float]] = Field(
        min_length=1, description="[step, value] pairs sorted by step; linear between them, constant outside them"
    )

    @model_validator(mode="after")
    def _sorted(self) -> PiecewiseSchedule:
        steps = [p[0] for p in self.points]
        if steps != sorted(steps):
            raise ValueError("points must be sorted by step")
        return self


def yaml_switch(value: Any) -> Any:
    """YAML 1.1 reads a bare on/off as a boolean (in files and in --set): take it as the word that was meant."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


# auto | on | off, whether written as a string or as YAML's on/off/true/false.
Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(yaml_switch)]


Schedule = Annotated[
    ConstantSchedule | LinearSchedule | ExponentialSchedule | PiecewiseSchedule, Field(discriminator="kind")
]


# ---------------------------------------------------------------------------------------------- policies
class RandomPolicySpec(_Strict):
    kind: Literal["random"] = _kind("random", "uniformly random actions")
    name: str | None = _policy_name()


class GreedyPolicySpec(_Strict):
    kind: Literal["greedy"] = _kind("greedy", "the action with the largest Q value")
    name: str | None = _policy_name()


class EpsilonGreedyPolicySpec(_Strict):
    kind: Literal["epsilon_greedy"] = _kind("epsilon_greedy", "a random action with probability epsilon, else greedy")
    name: str | None = _policy_name()
    epsilon: Schedule = Field(
        default_factory=lambda: LinearSchedule(start=1.0, end=0.01, steps=250_000),
        description="the exploration rate over each agent's env steps",
    )


class BoltzmannPolicySpec(_Strict):
    kind: Literal["boltzmann"] = _kind("boltzmann", "actions drawn from softmax(Q / temperature)")
    name: str | None = _policy_name()
    temperature: Schedule = Field(default_factory=lambda: ConstantSchedule(value=1.0),
                                  description="the softmax temperature over each agent's env steps")


class SwitchPolicySpec(_Strict):
    """Acts with ``first`` for the first ``after`` steps of each episode, then with ``second``."""

    kind: Literal["switch"] = _kind("switch", "first for the first `after` steps of each episode, then second")
    name: str | None = _policy_name()
    first: PolicySpec = Field(description="the policy for the first `after` steps of each episode")
    second: PolicySpec = Field(description="the policy for the rest of each episode")
    after: int = Field(gt=0, description="episode step at which the second policy takes over")


class MixtureComponent(_Strict):
    policy: PolicySpec = Field(description="a policy of the mixture")
    weight: Schedule = Field(description="its weight (relative to the others) over each agent's env steps")


class MixturePolicySpec(_Strict):
    """At each episode start a component is drawn with probability proportional to its scheduled weight."""

    kind: Literal["mixture"] = _kind(
        "mixture", "at each episode start, a component drawn with probability proportional to its weight"
    )
    name: str | None = _policy_name()
    components: list[MixtureComponent] = Field(
        min_length=1, description="the policies to draw from, each with a scheduled weight"
    )


PolicySpec = Annotated[
    RandomPolicySpec
    | GreedyPolicySpec
    | EpsilonGreedyPolicySpec
    | BoltzmannPolicySpec
    | SwitchPolicySpec
    | MixturePolicySpec,
    Field(discriminator="kind"),
]
SwitchPolicySpec.model_rebuild()
MixtureComponent.model_rebuild()
MixturePolicySpec.model_rebuild()


class EpsilonLadder(_Strict):
    """Ape-X: agent i of N explores with eps_i = base ** (1 + alpha * i / (N - 1)).

    When enabled, every epsilon-greedy policy of agent i anneals from its schedule's start to eps_i (instead of
    its schedule's end) over the schedule's steps.
    """

    enabled: bool = Field(default=False, description="give agent i its own final epsilon")
    base: float = Field(default=0.4, gt=0.0, le=1.0, description="epsilon of agent 0")
    alpha: float = Field(default=7.0, ge=0.0, description="spread of the ladder")


# --------------------------------------------------------------------------------------------- sections
class EnvConfig(_Strict):
    id: str = Field(default="ALE/Pong-v5", description="any gymnasium id; ALE/* ids get DQN preprocessing")
    num_envs: int = Field(default=8, ge=1, le=1024, description="environments per agent (one vector env)")
    frame_stack: int = Field(default=4, ge=1, le=16, description="1 turns stacking off (e.g. with an LSTM)")
    frame_skip: int = Field(default=4, ge=1, description="ALE frames per agent step (max-pooled)")
    screen_size: int = Field(default=84, ge=16, le=256, description="ALE frames are resized to this square")
    noop_max: int = Field(default=30, ge=0, description="ALE: up to this many no-ops at each reset")
    terminal_on_life_loss: bool = Field(default=False, description="ALE: a lost life ends the learning episode")
    clip_rewards: bool = Field(default=True, description="clip rewards to [-1, 1] for learning only")
    max_episode_steps: int | None = Field(default=27_000, ge=1, description="agent steps per episode")
    sticky_actions: float = Field(default=0.0, ge=0.0, le=1.0, description="ALE repeat_action_probability")


class NetworkConfig(_Strict):
    torso: Literal["auto", "nature_cnn", "mlp"] = Field(
        default="auto", description="auto: CNN for images, MLP for vectors"
    )
    mlp_hidden: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [256, 256], min_length=1, description="MLP torso layer widths"
    )
    dueling: bool = Field(default=True, description="dueling head: Q = V + A - mean(A)")
    lstm: bool = Field(default=False, description="recurrent core; sequences with burn-in replace stacking")
    lstm_hidden: int = Field(default=512, gt=0, description="LSTM state size")


class LearnerConfig(_Strict):
    gamma: float = Field(default=0.99, gt=0.0, le=1.0, description="discount")
    n_step: int = Field(default=3, ge=1, le=100, description="steps of the bootstrapped return")
    double: bool = Field(default=True, description="Double DQN: online argmax, target value")
    lr: float = Field(default=1e-4, gt=0.0, description="Adam learning rate")
    adam_eps: float = Field(default=1.5e-4, gt=0.0, description="Adam epsilon")
    batch_size: int = Field(default=32, ge=1, description="transitions (or sequences) per update")
    huber_delta: float = Field(default=1.0, gt=0.0, description="Huber loss threshold")
    max_grad_norm: float | None = Field(default=10.0, gt=0.0, description="global gradient norm clip; null: off")
    target_update: Literal["hard", "soft"] = Field(default="hard", description="copy every period, or Polyak")
    target_update_period: int = Field(default=2000, ge=1, description="updates between hard target copies")
    tau: float = Field(default=0.005, gt=0.0, le=1.0, description="soft target update rate")
    learning_starts: int = Field(default=20_000, ge=0, description="steps in the memory before learning")
    update_every: int = Field(default=4, ge=1, description="agent env steps (summed over its envs) per gradient update")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    mixed_precision: Switch = Field(default="auto", description="auto: bf16 on CUDA")
    compile: bool = Field(default=False, description="torch.compile the online network")
    burn_in: int = Field(default=20, ge=0, description="LSTM: steps replayed only to warm up the state")
    sequence_length: int = Field(default=40, ge=1, description="LSTM: trained steps per sampled sequence")
    concurrent: Switch = Field(
        default="auto",
        description="learn in a thread of its own while the agent acts, at the same update_every ratio "
        "(auto: on where the learner runs on a GPU)",
    )
    actor_sync_every: int = Field(
        default=10, ge=1, description="concurrent: updates between copies of the online weights to the actor"
    )
    rate_limit_slack: int = Field(
        default=16, ge=1, description="concurrent: updates the learner may owe before the actor waits for it"
    )

    @property
    def sampled_length(self) -> int:
        """LSTM: the steps of one sampled sequence (burn-in, trained steps, and the n steps after them)."""
        return self.burn_in + self.sequence_length + self.n_step


class ReplayConfig(_Strict):
    backend: Literal["shared", "redis"] = Field(
        default="shared", description="shared: one machine, /dev/shm; redis: the Redis memory at replay.redis_url"
    )
    redis_url: str = Field(
        default="",
        description="redis://HOST:PORT/DB of the Redis memory (rediss:// over TLS); its user and password come from "
        "BORG_REDIS_USERNAME and BORG_REDIS_PASSWORD",
    )
    redis_ca_file: Path | None = Field(
        default=None,
        description="with a rediss:// URL: the CA certificate (PEM) that signed the memory's (unset: the system's CAs)",
    )
    redis_name: str = Field(
        default="hive", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="the memory's name (key prefix) on that Redis"
    )
    capacity: int = Field(default=250_000, ge=64, description="steps stored, shared by all agents")
    chunk_length: int = Field(default=32, ge=1, le=4096, description="steps per chunk an agent adds")
    prioritized: bool = Field(default=True, description="proportional prioritized replay")
    alpha: float = Field(default=0.6, ge=0.0, description="priority exponent")
    beta: Schedule = Field(
        default_factory=lambda: LinearSchedule(start=0.4, end=1.0, steps=1_000_000),
        description="importance-weight exponent over hive env steps",
    )
    priority_eps: float = Field(default=1e-6, gt=0.0, description="added to |TD| so no step starves")
    outbox_steps: int = Field(
        default=20_000,
        ge=256,
        description="redis: own steps an agent queues while Redis is away; beyond this the oldest chunks are dropped",
    )
    model_store_bytes: int = Field(
        default=DEFAULT_MODEL_STORE_BYTES,
        ge=1 << 20,
        description="redis, a collective's agents: bytes of the model store in the memory's Redis (each agent's "
        "latest checkpoint, ~27 MB for Atari's network); a checkpoint past it stays in the pod's run dir only",
    )


class AssimilationConfig(_Strict):
    """Population-based training's exploit/explore step between the hive's agents (see docs/assimilation.md)."""

    enabled: bool = Field(default=False, description="weak agents adopt strong agents' networks from the store")
    every: int = Field(default=100_000, ge=1, description="env steps per agent between its assimilation checks")
    bottom: float = Field(default=0.25, gt=0.0, lt=1.0, description="fraction of the hive (by mean return) that "
                          "adopts another agent's state")
    top: float = Field(default=0.25, gt=0.0, lt=1.0, description="fraction of the hive whose states are adopted")
    perturb: bool = Field(default=True, description="after adopting, scale the learning rate and epsilon floor")
    factors: tuple[float, float] = Field(default=(0.8, 1.25), description="the two scales a perturbation picks "
                                         "from, at random")
    lr_bounds: tuple[float, float] = Field(default=(1e-6, 1e-2), description="perturbed learning rates stay within")
    epsilon_floor_bounds: tuple[float, float] = Field(default=(0.0, 0.5), description="perturbed epsilon floors "
                                                      "stay within")

    @model_validator(mode="after")
    def _coherent(self) -> AssimilationConfig:
        if self.bottom + self.top > 1.0:
            raise ValueError("hive.assimilation: bottom + top must not exceed 1 (no agent both adopts and gives)")
        if any(f <= 0.0 for f in self.factors):
            raise ValueError("hive.assimilation.factors must be positive")
        low, high = self.lr_bounds
        if not 0.0 < low <= high:
            raise ValueError("hive.assimilation.lr_bounds must be [low, high] with 0 < low <= high")
        low, high = self.epsilon_floor_bounds
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError("hive.assimilation.epsilon_floor_bounds must be [low, high] within [0, 1]")
        return self


class HiveConfig(_Strict):
    agents: int = Field(default=2, ge=1, le=256, description="agent processes")
    steps: int = Field(default=2_000_000, ge=1, description="total env steps over the whole hive")
    stop_at_mean_return: float | None = Field(
        default=None,
        description="stop as soon as an agent's mean return over 20 episodes reaches this (stop_when says who "
        "stops; null: run every step)",
    )
    stop_when: Literal["first", "each"] = Field(
        default="first",
        description="with stop_at_mean_return: first: the first agent that reaches it stops the hive; each: each "
        "agent stops when it reaches it (as Ray Tune stops a trial), the hive once every agent has stopped",
    )
    seed: int = Field(default=0, description="base seed of envs, networks and policies")
    out: Path = Field(default=Path("runs/hive"), description="run directory")
    threads_per_agent: int = Field(default=1, ge=1, description="torch threads in each agent process")
    checkpoint_every: int = Field(default=100_000, ge=1, description="env steps per agent between saves")
    report_every_s: float = Field(default=2.0, gt=0.0, description="seconds between train records")
    live: Switch = Field(default="auto", description="rich live view (auto: on a TTY)")
    assimilation: AssimilationConfig = Field(default_factory=AssimilationConfig)
    learner_by_agent: dict[int, dict[str, Any]] = Field(
        default_factory=dict,
        description="learner settings of single agents over `learner`, e.g. {2: {lr: 1.0e-6}} (a sweep in one hive)",
    )

    @field_validator("learner_by_agent")
    @classmethod
    def _agents(cls, value: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        for agent, settings in value.items():
            if agent < 0:
                raise ValueError(f"agent {agent}: agent ids are >= 0")
            try:
                LearnerConfig.model_validate(settings)
            except ValidationError as err:
                raise ValueError(f"agent {agent}: learner.{describe_validation_error(err)}") from None
        return value


_KAFKA_ADDRESS = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def parse_kafka_bootstrap(text: str) -> list[str]:
    """``HOST:PORT[,HOST:PORT...]`` -> the addresses; ValueError (one line) otherwise."""
    servers = [part.strip() for part in text.split(",") if part.strip()]
    if not servers:
        raise ValueError("no Kafka address: expected HOST:PORT[,HOST:PORT]")
    for server in servers:
        match = _KAFKA_ADDRESS.match(server)
        if match is None or not 0 < int(match.group(1)) < 65536:
            raise ValueError(f"{server!r} is not HOST:PORT (e.g. kafka:9092)")
    return servers


class TelemetryConfig(_Strict):
    kafka: str = Field(default="", description="HOST:PORT[,HOST:PORT] of Kafka for live telemetry; empty: off")
    collective: str = Field(default="", description="the name on every event (empty: the run directory's name)")
    buffer_events: int = Field(
        default=10_000,
        ge=100,
        le=10_000_000,
        description="events each process holds while Kafka is away; then the oldest are dropped (and counted)",
    )
    kafka_tls: bool = Field(
        default=False,
        description="TLS to Kafka; with BORG_KAFKA_USERNAME and BORG_KAFKA_PASSWORD also a SASL/SCRAM-SHA-512 login",
    )
    kafka_ca_file: Path | None = Field(
        default=None, description="with kafka_tls: the CA certificate (PEM) of the brokers (unset: the system's CAs)"
    )
    kafka_cert_file: Path | None = Field(
        default=None, description="with kafka_tls: this client's certificate (PEM), for a Kafka that wants mutual TLS"
    )
    kafka_key_file: Path | None = Field(
        default=None, description="with kafka_cert_file: its private key (PEM; unset: in the certificate's file)"
    )

    @field_validator("kafka")
    @classmethod
    def _bootstrap(cls, value: str) -> str:
        return ",".join(parse_kafka_bootstrap(value)) if value.strip() else ""

    @field_validator("collective")
    @classmethod
    def _name(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9_.-]{1,63}", value):
            raise ValueError("use 1-63 letters, digits, '_', '.', '-'")
        return value

    @model_validator(mode="after")
    def _tls(self) -> TelemetryConfig:
        for name in ("kafka_ca_file", "kafka_cert_file", "kafka_key_file"):
            if getattr(self, name) is not None and not self.kafka_tls:
                raise ValueError(f"telemetry.{name} needs telemetry.kafka_tls")
        if self.kafka_key_file is not None and self.kafka_cert_file is None:
            raise ValueError("telemetry.kafka_key_file needs telemetry.kafka_cert_file")
        return self


class BorgConfig(_Strict):
    env: EnvConfig = Field(default_factory=EnvConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    policy: PolicySpec = Field(default_factory=EpsilonGreedyPolicySpec)
    epsilon_ladder: EpsilonLadder = Field(default_factory=EpsilonLadder)
    hive: HiveConfig = Field(default_factory=HiveConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)

    @model_validator(mode="after")
    def _coherent(self) -> BorgConfig:
        if self.network.lstm and self.learner.sequence_length < self.learner.n_step:
            raise ValueError("learner.sequence_length must be >= learner.n_step when network.lstm is on")
        if self.replay.chunk_length > self.replay.capacity // 4:
            raise ValueError("replay.chunk_length must be at most a quarter of replay.capacity")
        if self.learner.batch_size > self.replay.capacity:
            raise ValueError("learner.batch_size must not exceed replay.capacity")
        if self.replay.backend == "redis":
            url = urlsplit(self.replay.redis_url)
            if url.scheme not in ("redis", "rediss") or not url.hostname:
                raise ValueError("replay.redis_url must be redis://HOST:PORT/DB when replay.backend is redis")
            if self.replay.redis_ca_file is not None and url.scheme != "rediss":
                raise ValueError("replay.redis_ca_file needs a rediss:// replay.redis_url (TLS)")
            if url.password or url.username:
                raise ValueError(
                    "replay.redis_url: give the password in BORG_REDIS_PASSWORD, not in the URL "
                    "(a URL shows in process lists, configs and logs)"
                )
        return self


def agent_config(config: BorgConfig, agent: int) -> BorgConfig:
    """Agent ``agent``'s config: its ``hive.learner_by_agent`` settings over ``learner`` (the rest is the hive's)."""
    over = config.hive.learner_by_agent.get(agent)
    if not over:
        return config
    learner = LearnerConfig.model_validate(_deep_merge(config.learner.model_dump(), over))
    return config.model_copy(update={"learner": learner})


# ---------------------------------------------------------------------------------------------- loading
def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        # A policy or schedule of another kind replaces the one beneath: their fields do not mix.
        under = out.get(key)
        other_kind = isinstance(value, Mapping) and isinstance(under, dict) and value.get("kind", under.get("kind")) \
            != under.get("kind")
        if isinstance(value, Mapping) and isinstance(under, dict) and not other_kind:
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``learner.lr=3e-4`` -> ("learner.lr", 3e-4); values are YAML scalars (or YAML lists/maps)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. learner.lr=3e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({err.__class__.__name__})") from err
    return key.strip(), value


def environment_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``BORG_LEARNER__LR=3e-4`` -> {"learner": {"lr": 3e-4}}; section and field names are case-insensitive."""
    tree: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or ENV_NESTING not in name:
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace(ENV_NESTING, ".")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"{name}: value is not valid YAML ({err.__class__.__name__})") from err
        _set_path(tree, dotted, value)
    return tree


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def describe_validation_error(err: ValidationError) -> str:
    """The first problem as one line: ``learner.lr: Input should be greater than 0 (got -1)``."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not is_union_tag(p))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    got = first.get("input")
    shown = "" if isinstance(got, dict | list) or first["type"] == "missing" else f" (got {got!r})"
    more = len(err.errors()) - 1
    suffix = f"; and {more} more problem{'s' if more > 1 else ''}" if more else ""
    if not loc:  # a rule across fields: its message names them
        return f"{msg}{suffix}"
    return f"{loc}: {msg}{shown}{suffix}"


def is_union_tag(part: Any) -> bool:
    # pydantic puts the discriminator value (e.g. "linear") into the location of tagged unions.
    return isinstance(part, str) and part in {
        "constant", "linear", "exponential", "piecewise",
        "random", "greedy", "epsilon_greedy", "boltzmann", "switch", "mixture",
    }  # fmt: skip


def build_config(
    base: Mapping[str, Any] | None = None,
    *,
    yaml_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    preset: bool = False,
) -> BorgConfig:
    """Merge defaults < (with ``preset``) the env id's preset (borgdqn/presets.py) < base (a resumed run's saved
    config) < YAML < environment < overrides (dotted keys), section by section, and validate; raises ConfigError."""
    tree: dict[str, Any] = dict(base or {})
    if yaml_path is not None:
        tree = _deep_merge(tree, read_yaml(yaml_path))
    tree = _deep_merge(tree, environment_overrides(os.environ if environ is None else environ))
    for dotted, value in (overrides or {}).items():
        _set_path(tree, dotted, value)
    if preset:
        from borgdqn.presets import preset_for

        env_id = (tree.get("env") or {}).get("id", EnvConfig().id)
        chosen = preset_for(env_id) if isinstance(env_id, str) else None
        if chosen is not None:
            tree = _deep_merge(copy.deepcopy(dict(chosen.settings)), tree)
    try:
        return BorgConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err)) from None


def dump_config(config: BorgConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
