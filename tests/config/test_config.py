"""The one config model: layering (defaults < YAML < BORG_* < flags) and one-line errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from borgdqn.config import (
    BorgConfig,
    ConfigError,
    EpsilonGreedyPolicySpec,
    LinearSchedule,
    MixturePolicySpec,
    build_config,
    dump_config,
    environment_overrides,
    parse_override,
)


def test_defaults_are_pong_with_two_agents() -> None:
    config = build_config(environ={})
    assert config.env.id == "ALE/Pong-v5"
    assert config.env.frame_stack == 4
    assert config.hive.agents == 2
    assert isinstance(config.policy, EpsilonGreedyPolicySpec)


def test_layers_override_in_order(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learner: {lr: 0.5, gamma: 0.9}\nhive: {agents: 3, seed: 7}\n")
    config = build_config(
        yaml_path=path,
        environ={"BORG_LEARNER__LR": "0.25", "BORG_HIVE__SEED": "8", "UNRELATED": "x"},
        overrides={"hive.seed": 9},
    )
    assert config.learner.lr == 0.25  # env beats YAML
    assert config.learner.gamma == 0.9  # YAML beats default
    assert config.hive.agents == 3
    assert config.hive.seed == 9  # flags beat env


def test_nested_policy_mixture_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        """
policy:
  kind: mixture
  components:
    - policy: {kind: random}
      weight: {kind: piecewise, points: [[0, 1.0], [50000, 1.0], [50001, 0.2]]}
    - policy: {kind: epsilon_greedy, epsilon: {kind: linear, start: 1.0, end: 0.05, steps: 1000}}
      weight: {kind: piecewise, points: [[0, 0.0], [50000, 0.0], [50001, 0.8]]}
"""
    )
    config = build_config(yaml_path=path, environ={})
    assert isinstance(config.policy, MixturePolicySpec)
    inner = config.policy.components[1].policy
    assert isinstance(inner, EpsilonGreedyPolicySpec)
    assert isinstance(inner.epsilon, LinearSchedule) and inner.epsilon.end == 0.05


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"learner.lr": -1}, "learner.lr: Input should be greater than 0 (got -1)"),
        ({"learner.lrr": 1}, "learner.lrr: unknown field"),
        ({"env.frame_stack": 0}, "env.frame_stack: Input should be greater than or equal to 1 (got 0)"),
        ({"policy.kind": "softmax"}, "policy: Input tag 'softmax' found using 'kind' does not match"),
        ({"hive.agents": "many"}, "hive.agents: Input should be a valid integer"),
    ],
)
def test_bad_values_are_one_line_naming_the_field(overrides: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(environ={}, overrides=overrides)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(expected)


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match=r"^learner.batch_size must not exceed replay\.capacity$"):
        build_config(environ={}, overrides={"replay.capacity": 64, "replay.chunk_length": 8, "learner.batch_size": 128})
    with pytest.raises(ConfigError, match=r"^replay.chunk_length must be at most a quarter of replay.capacity$"):
        build_config(environ={}, overrides={"replay.capacity": 100, "replay.chunk_length": 64})


def test_bad_yaml_file_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("learner:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d"):
        build_config(yaml_path=path, environ={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        build_config(yaml_path=tmp_path / "missing.yaml", environ={})
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        build_config(yaml_path=path, environ={})


def test_environment_variables_parse_yaml_scalars() -> None:
    tree = environment_overrides({"BORG_NETWORK__MLP_HIDDEN": "[64, 64]", "BORG_NETWORK__DUELING": "false"})
    assert tree == {"network": {"mlp_hidden": [64, 64], "dueling": False}}


def test_parse_override() -> None:
    key, value = parse_override("learner.lr=3e-4")
    assert build_config(environ={}, overrides={key: value}).learner.lr == 3e-4
    assert parse_override("learner.n_step=5") == ("learner.n_step", 5)
    assert parse_override("env.id=CartPole-v1") == ("env.id", "CartPole-v1")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("learner.lr")


def test_dump_round_trips() -> None:
    import yaml

    config = build_config(environ={}, overrides={"network.lstm": True, "env.frame_stack": 1})
    again = BorgConfig.model_validate(yaml.safe_load(dump_config(config)))
    assert again == config


def test_configuration_doc_lists_every_field_as_the_code_has_it() -> None:
    from borgdqn.config_reference import render_reference

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    stale = "docs/configuration.md is stale: run `python tools/regenerate.py`"
    assert render_reference() in doc, stale


@pytest.mark.parametrize("field", ["hive.live", "learner.concurrent", "learner.mixed_precision"])
def test_a_bare_on_or_off_is_the_word_not_a_boolean(tmp_path: Path, field: str) -> None:
    section, name = field.split(".")
    yaml_file = tmp_path / "switch.yaml"
    yaml_file.write_text(f"{section}: {{{name}: off}}\n")  # YAML 1.1: the boolean false
    assert getattr(getattr(build_config(yaml_path=yaml_file, environ={}), section), name) == "off"
    assert getattr(getattr(build_config(environ={f"BORG_{section.upper()}__{name.upper()}": "on"}), section),
                   name) == "on"
    config = build_config(environ={}, overrides=dict([parse_override(f"{field}=off")]))
    assert getattr(getattr(config, section), name) == "off"
    with pytest.raises(ConfigError, match=f"{field}: Input should be 'auto', 'on' or 'off'"):
        build_config(environ={}, overrides={field: "maybe"})
