"""``borgdqn eval``: play a checkpoint's online network greedily and report full-game raw returns."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from borgdqn.rl.checkpoint import check_learner_state, read_checkpoint
from borgdqn.rl.envs import make_vector_env
from borgdqn.rl.frame_stack import FrameStacker
from borgdqn.rl.learner import Learner

log = logging.getLogger(__name__)


def evaluate(
    checkpoint: Path,
    episodes: int,
    *,
    epsilon: float = 0.0,
    seed: int = 12_345,
    num_envs: int | None = None,
    on_episode: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Returns of ``episodes`` full games; ``epsilon`` > 0 adds the usual evaluation noise (e.g. 0.001)."""
    if episodes < 1:
        raise ValueError("--episodes must be >= 1")
    config, state = read_checkpoint(checkpoint)
    envs = num_envs or min(episodes, config.env.num_envs)
    # Evaluation reports whole games: no life-loss terminals, no truncation beyond the configured limit.
    env_cfg = config.env.model_copy(update={"num_envs": envs, "terminal_on_life_loss": False})
    env = make_vector_env(env_cfg, seed=seed)
    learner = Learner(config.network, config.learner, env.spec, env_cfg.frame_stack, seed=seed, threads=None)
    check_learner_state(state.learner, learner.online, checkpoint)
    learner.load_state_dict(state.learner)
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
