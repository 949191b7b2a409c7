"""Tuned settings per environment, as the RL zoos keep them: `borgdqn train --env ID` starts from the preset of
ID (when there is one) instead of the bare defaults, which are tuned for Atari. A preset lies under everything
else: a resumed run's saved config, `--config`, `BORG_*` variables, `--set` and the flags all override it.

The CartPole preset is `examples/cartpole.yaml`'s algorithm (that file spells it out; a test keeps the two equal):
a hive of 2 reaches a mean return of 475 over 20 episodes within 100k env steps on a CPU. The masked CartPole
(`borgdqn/CartPoleNoVelocity-v1`) gets the same with a small LSTM. Atari ids (`ALE/...`) get the defaults
themselves, named so that the run says which settings it used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CARTPOLE: dict[str, Any] = {
    "env": {"num_envs": 4, "frame_stack": 1},
    "network": {"mlp_hidden": [256, 256], "dueling": True},
    "learner": {"lr": 1.0e-3, "adam_eps": 1.0e-8, "batch_size": 64, "n_step": 3, "gamma": 0.99,
                "target_update": "hard", "target_update_period": 250, "learning_starts": 1000, "update_every": 2,
                "max_grad_norm": 10.0},
    "replay": {"capacity": 50_000, "chunk_length": 8, "prioritized": True,
               "beta": {"kind": "linear", "start": 0.4, "end": 1.0, "steps": 100_000}},
    "policy": {"kind": "epsilon_greedy", "epsilon": {"kind": "linear", "start": 1.0, "end": 0.01, "steps": 20_000}},
    "hive": {"steps": 100_000, "checkpoint_every": 25_000},  # a budget, as the zoos give one
}  # fmt: skip

# The same task with the velocities hidden (borgdqn/rl/partially_observed.py): CartPole's algorithm with a small
# LSTM trained on replayed sequences (R2D2's burn-in), a shorter exploration and a budget of 150k steps. With
# `--set network.lstm=false` the same settings make the memoryless MLP (which fails) and, with
# `env.frame_stack=4`, the stacking MLP: benchmarks/partially_observed.py compares them (docs/benchmarks.md).
CARTPOLE_NO_VELOCITY: dict[str, Any] = {
    **CARTPOLE,
    "network": {"mlp_hidden": [64], "dueling": True, "lstm": True, "lstm_hidden": 64},
    "learner": {**CARTPOLE["learner"], "batch_size": 64, "update_every": 4, "burn_in": 8, "sequence_length": 16},
    "policy": {"kind": "epsilon_greedy", "epsilon": {"kind": "linear", "start": 1.0, "end": 0.01, "steps": 10_000}},
    "hive": {"steps": 150_000, "checkpoint_every": 25_000},
}


@dataclass(frozen=True)
class Preset:
    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)  # a config tree, section by section


PRESETS: dict[str, Preset] = {
    "CartPole-v1": Preset("cartpole", CARTPOLE),
    "borgdqn/CartPoleNoVelocity-v1": Preset("cartpole-no-velocity", CARTPOLE_NO_VELOCITY),
}
ATARI = Preset("atari")  # the defaults: tuned for Atari (Pong) already


def preset_for(env_id: str) -> Preset | None:
    """The preset of ``env_id``: its own, Atari's for an ``ALE/`` id, else None (the defaults, untuned)."""
    if env_id in PRESETS:
        return PRESETS[env_id]
    return ATARI if env_id.startswith("ALE/") else None
