"""``borgdqn eval``: play a checkpoint's or an export's online network greedily and report full-game raw returns."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from borgdqn.config import EnvConfig, LearnerConfig, NetworkConfig
from borgdqn.rl.checkpoint import check_learner_state, read_checkpoint
from borgdqn.rl.envs import EnvSpec, make_vector_env
from borgdqn.rl.export import META_FILE, WEIGHTS_FILE, ExportError, read_export
from borgdqn.rl.frame_stack import FrameStacker
from borgdqn.rl.learner import Learner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Player:
    """What ``eval`` plays: the game and its preprocessing, the network, its online weights, and a check that the
    weights fit the network built for the game (one line, before anything is loaded)."""

    env: EnvConfig
    network: NetworkConfig
    online: Mapping[str, torch.Tensor]
    check: Callable[[nn.Module, EnvSpec], None]


def load_player(path: Path) -> Player:
    """The network in a checkpoint file or an export directory; CheckpointError / ExportError (one line) for a bad
    one, and nothing in it is ever run."""
    if path.is_dir() or path.name in (META_FILE, WEIGHTS_FILE):
        export = read_export(path)

        def check_export(_: nn.Module, spec: EnvSpec) -> None:
            played = (tuple(spec.frame_shape), int(spec.num_actions))
            if played != (export.spec.frame_shape, export.spec.num_actions):
                raise ExportError(f"{path} was exported for frames {export.spec.frame_shape} and "
                                  f"{export.spec.num_actions} actions; {export.env.id} gives {played[0]} and "
                                  f"{played[1]}")

        return Player(export.env, export.network, export.weights, check_export)
    config, state = read_checkpoint(path)
    return Player(config.env, config.network, state.learner.get("online") or {},
                  lambda network, _: check_learner_state(state.learner, network, path))


def evaluate(
    checkpoint: Path,
    episodes: int,
    *,
    epsilon: float = 0.0,
    seed: int = 12_345,
    num_envs: int | None = None,
    on_episode: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Returns of ``episodes`` full games of the network in ``checkpoint`` (a checkpoint file, or an export
    directory); ``epsilon`` > 0 adds the usual evaluation noise (e.g. 0.001)."""
    if episodes < 1:
        raise ValueError("--episodes must be >= 1")
    player = load_player(checkpoint)
    envs = num_envs or min(episodes, player.env.num_envs)
    # Evaluation reports whole games: no life-loss terminals, no truncation beyond the configured limit.
    env_cfg = player.env.model_copy(update={"num_envs": envs, "terminal_on_life_loss": False})
    env = make_vector_env(env_cfg, seed=seed)
    learner = Learner(player.network, LearnerConfig(), env.spec, env_cfg.frame_stack, seed=seed, threads=None)
    try:
        player.check(learner.online, env.spec)
    except BaseException:
        env.close()
        raise
    learner.online.load_state_dict(player.online)
    rng = np.random.default_rng(seed)
    stacker = FrameStacker(envs, env_cfg.frame_stack, env.spec.frame_shape, env.spec.frame_dtype)
    obs = stacker.reset(env.reset(seed=seed))
    first = np.ones(envs, dtype=bool)
    core = learner.online.initial_state(envs, learner.device) if learner.online.recurrent else None
    running = np.zeros(envs)
    returns: list[float] = []
    try:
        while len(returns) < episodes:
            q, core = learner.act(obs, core, first if core is not None else None)
            actions = q.argmax(axis=1)
            explore = rng.random(envs) < epsilon
            actions[explore] = rng.integers(0, env.spec.num_actions, size=int(explore.sum()))
            result = env.step(actions)
            running += result.rewards
            for e in np.flatnonzero(result.game_over):
                if len(returns) < episodes:
                    returns.append(float(running[e]))
                    if on_episode is not None:
                        on_episode(len(returns), returns[-1])
                running[e] = 0.0
            first = result.first
            obs = stacker.push(result.frames, first)
    finally:
        env.close()
    return returns
