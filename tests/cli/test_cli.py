"""The command line as a user meets it: bad input is one line on stderr, exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cli import assert_one_line_error, borgdqn


@pytest.mark.parametrize(
    ("args", "env", "needles"),
    [
        (["train", "--set", "learner.lr=-1"], {}, ["learner.lr", "greater than 0"]),
        (["train", "--set", "learner.nstep=3"], {}, ["learner.nstep: unknown field"]),
        (["train", "--agents", "0"], {}, ["hive.agents"]),
        (["train"], {"BORG_LEARNER__GAMMA": "2"}, ["learner.gamma", "less than or equal to 1"]),
        (["train", "--set", "policy.kind=softmax"], {}, ["policy"]),
        (["train", "--config", "/nonexistent/c.yaml"], {}, ["cannot read config file"]),
        (["train", "--agents", "two"], {}, ["invalid int value"]),
        (["eval", "/nonexistent/agent-0.pt"], {}, ["no checkpoint at"]),
        (["eval", "/nonexistent/agent-0.pt", "--epsilon", "1.5"], {}, ["--epsilon 1.5", "within [0, 1]"]),
        (["--no-such-option"], {}, ["unrecognized arguments: --no-such-option", "borgdqn --help"]),
        ([], {}, ["choose a command: train, eval"]),
        (["train", "--steps", "many"], {}, ["invalid int value", "borgdqn train --help"]),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], env: dict[str, str], needles: list[str]) -> None:
    assert_one_line_error(borgdqn(*args, env=env), *needles)


def test_unknown_env_id_is_bad_input(tmp_path: Path) -> None:
    result = borgdqn("train", "--env", "NoSuchEnv-v9", "--out", str(tmp_path / "run"))
    assert_one_line_error(result, "NoSuchEnv-v9")
    assert not (tmp_path / "run").exists(), "nothing is written for a run that cannot start"


def test_resume_without_a_run_is_bad_input(tmp_path: Path) -> None:
    assert_one_line_error(borgdqn("train", "--resume", "--out", str(tmp_path)), "no run to resume")


def test_print_config_merges_all_layers(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learner: {lr: 0.5}\nenv: {num_envs: 3}\n")
    result = borgdqn(
        "train", "--config", str(cfg), "--env", "CartPole-v1", "--set", "learner.n_step=5", "--print-config",
        env={"BORG_ENV__NUM_ENVS": "6"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    import yaml

    shown = yaml.safe_load(result.stdout)
    assert shown["env"]["id"] == "CartPole-v1"
    assert shown["env"]["num_envs"] == 6
    assert shown["learner"]["lr"] == 0.5
    assert shown["learner"]["n_step"] == 5


def test_help_lists_the_commands() -> None:
    result = borgdqn("--help")
    assert result.returncode == 0
    for command in ("train", "eval", "plot"):
        assert command in result.stdout
    train_help = borgdqn("train", "--help").stdout
    for flag in ("--env", "--agents", "--steps", "--seed", "--out", "--config", "--resume", "--set"):
        assert flag in train_help


def test_resume_layers_a_config_file_over_the_saved_one_field_by_field(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("learner: {lr: 0.5, gamma: 0.9}\nenv: {id: CartPole-v1}\n")
    more = tmp_path / "more.yaml"
    more.write_text("learner: {n_step: 5}\n")
    result = borgdqn("train", "--resume", "--out", str(run), "--config", str(more), "--print-config")
    assert result.returncode == 0, result.stderr
    import yaml

    shown = yaml.safe_load(result.stdout)
    assert shown["learner"]["n_step"] == 5  # from the file
    assert shown["learner"]["lr"] == 0.5 and shown["learner"]["gamma"] == 0.9  # kept from the saved run
    assert shown["env"]["id"] == "CartPole-v1"
