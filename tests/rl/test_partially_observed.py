"""CartPole with the velocities hidden (borgdqn/rl/partially_observed.py) and the LSTM that learns it.

The contrast (no memory stays in the 50s, a stack of 4 recovers 335-372) is measured over 3 seeds by
benchmarks/partially_observed.py and recorded in docs/benchmarks.md; CI runs the LSTM's bar (seed 0: 484 there),
stopping the hive when it is met.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gymnasium
import numpy as np
import pytest

from borgdqn.config import EnvConfig, build_config
from borgdqn.presets import preset_for
from borgdqn.rl.envs import env_seeds, make_vector_env
from borgdqn.rl.partially_observed import CARTPOLE_NO_VELOCITY

LSTM_BAR = 400.0
# Twice the preset's 150k: two agents sharing one memory at the machine's pace are not repeatable, and one CI run
# of the preset's budget ended at 319 and 360 (the benchmark's seeds reach 400 after 48-56k steps per agent). The
# hive stops at the bar, so a run takes what it needs.
LSTM_BUDGET = 300_000


def test_the_masked_cartpole_shows_positions_only() -> None:
    env = make_vector_env(EnvConfig(id=CARTPOLE_NO_VELOCITY, num_envs=1), seed=3)
    full = gymnasium.make("CartPole-v1")
    try:
        assert env.spec.frame_shape == (2,) and env.spec.num_actions == 2 and not env.spec.is_image
        full_obs, _ = full.reset(seed=int(env_seeds(3, 1)[0]))
        masked = env.reset()
        np.testing.assert_array_equal(masked[0], full_obs[[0, 2]])  # cart position, pole angle
        rng = np.random.default_rng(0)
        lengths, length = [], 0
        for _ in range(300):
            action = int(rng.integers(2))
            result = env.step(np.array([action]))
            length += 1
            if result.first[0]:
                full_obs, _ = full.reset()
                length = 0
            else:
                full_obs, _, terminated, truncated, _ = full.step(action)
                assert bool(result.terminated[0]) == terminated and bool(result.truncated[0]) == truncated
            np.testing.assert_array_equal(result.frames[0], full_obs[[0, 2]])
            if result.terminated[0] or result.truncated[0]:
                lengths.append(length)
        assert len(lengths) >= 5  # several episodes compared
    finally:
        env.close()
        full.close()


def test_its_preset_is_the_cartpole_algorithm_with_an_lstm() -> None:
    preset = preset_for(CARTPOLE_NO_VELOCITY)
    assert preset is not None and preset.name == "cartpole-no-velocity"
    config = build_config(environ={}, overrides={"env.id": CARTPOLE_NO_VELOCITY}, preset=True)
    assert config.network.lstm and config.env.frame_stack == 1
    cartpole = build_config(environ={}, overrides={"env.id": "CartPole-v1"}, preset=True)
    assert (config.learner.lr, config.learner.n_step, config.replay) == (
        cartpole.learner.lr,
        cartpole.learner.n_step,
        cartpole.replay,
    )


@pytest.mark.integration
@pytest.mark.slow
def test_the_lstm_learns_what_one_observation_cannot_show(tmp_path: Path) -> None:
    out = tmp_path / "lstm"
    done = subprocess.run(
        [sys.executable, "-m", "borgdqn", "train", "--env", CARTPOLE_NO_VELOCITY, "--agents", "2", "--seed", "0",
         "--steps", str(LSTM_BUDGET), "--set", f"hive.stop_at_mean_return={LSTM_BAR}", "--out", str(out),
         "--no-live"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "preset=cartpole-no-velocity" in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    best = max(agent["best_mean_return_20"] or 0.0 for agent in summary["agents"].values())
    assert best >= LSTM_BAR, summary
    assert summary["target_reached"] is True
