"""Presets per environment (borgdqn/presets.py): `borgdqn train --env ID` starts from ID's tuned settings, says
which preset it used, and everything the user gives goes over it. The learning bar of the CartPole preset through
the bare command is in tests/hive/test_hive.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from borgdqn.config import BorgConfig, build_config
from borgdqn.presets import CARTPOLE, preset_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def borgdqn(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "borgdqn", *map(str, args)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_examples_cartpole_yaml_spells_out_the_cartpole_preset() -> None:
    spelled = build_config(yaml_path=EXAMPLES / "cartpole.yaml", environ={})
    chosen = build_config(environ={}, overrides={"env.id": "CartPole-v1", "hive.agents": 2, "hive.steps": 100_000},
                          preset=True)  # fmt: skip
    assert chosen == spelled
    assert chosen != build_config(environ={}, overrides={"env.id": "CartPole-v1", "hive.agents": 2,
                                                         "hive.steps": 100_000})  # without it: the Atari defaults


def test_the_preset_lies_under_the_yaml_the_environment_and_the_overrides(tmp_path: Path) -> None:
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("env: {id: CartPole-v1}\nlearner: {batch_size: 32}\n")
    config = build_config(yaml_path=yaml_file, environ={"BORG_LEARNER__GAMMA": "0.95"},
                          overrides={"learner.lr": 5e-4, "policy.epsilon.end": 0.05}, preset=True)  # fmt: skip
    assert (config.learner.batch_size, config.learner.gamma, config.learner.lr) == (32, 0.95, 5e-4)
    assert config.learner.n_step == CARTPOLE["learner"]["n_step"]  # the rest is the preset's
    assert config.policy.epsilon.end == 0.05 and config.policy.epsilon.steps == 20_000  # type: ignore[union-attr]
    # A policy of another kind replaces the preset's: their fields do not mix.
    boltzmann = build_config(environ={}, overrides={"env.id": "CartPole-v1", "policy.kind": "boltzmann"}, preset=True)
    assert boltzmann.policy.kind == "boltzmann"


def test_which_ids_have_a_preset() -> None:
    assert preset_for("CartPole-v1").name == "cartpole"  # type: ignore[union-attr]
    atari = preset_for("ALE/Breakout-v5")
    assert atari is not None and atari.name == "atari" and not atari.settings  # the defaults are Atari's
    assert build_config(environ={}, overrides={"env.id": "ALE/Breakout-v5"}, preset=True) == \
        BorgConfig.model_validate({"env": {"id": "ALE/Breakout-v5"}})
    assert preset_for("Acrobot-v1") is None


@pytest.mark.parametrize(("env_id", "said"), [
    ("CartPole-v1", "CartPole-v1: preset cartpole"),
    ("ALE/Pong-v5", "ALE/Pong-v5: preset atari"),
    ("Acrobot-v1", "Acrobot-v1: preset none"),
])  # fmt: skip
def test_train_says_which_preset_it_used(env_id: str, said: str) -> None:
    done = borgdqn("train", "--env", env_id, "--print-config")
    assert done.returncode == 0, done.stderr
    assert said in done.stderr
    if env_id == "CartPole-v1":
        assert "mlp_hidden:\n  - 256\n  - 256" in done.stdout


def test_a_resumed_run_takes_its_saved_settings_and_no_preset(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = borgdqn("train", "--env", "CartPole-v1", "--agents", "1", "--steps", "200", "--out", out,
                    "--set", "learner.lr=0.0005", "--no-live")  # fmt: skip
    assert first.returncode == 0, first.stderr
    resumed = borgdqn("train", "--resume", "--out", out, "--steps", "400", "--print-config")
    assert resumed.returncode == 0, resumed.stderr
    assert "preset" not in resumed.stderr
    assert "lr: 0.0005" in resumed.stdout and "mlp_hidden:\n  - 256\n  - 256" in resumed.stdout
