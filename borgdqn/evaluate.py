"""``borgdqn eval``: play a checkpoint's or an export's online network greedily and report full-game raw returns."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from borgdqn.config import ConstantSchedule, EnvConfig, EpsilonGreedyPolicySpec, NetworkConfig
from borgdqn.rl.actor import Actor, network_act
from borgdqn.rl.checkpoint import check_learner_state, read_checkpoint
from borgdqn.rl.device import select_device
from borgdqn.rl.envs import EnvSpec, make_vector_env
from borgdqn.rl.export import META_FILE, WEIGHTS_FILE, ExportError, read_export
from borgdqn.rl.networks import build_q_network
from borgdqn.rl.policies import build_policy

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
    directory), played by the agents' actor (borgdqn.rl.actor) with an epsilon-greedy policy of a constant
    ``epsilon`` (0: greedy; e.g. 0.001 adds the usual evaluation noise)."""
    if episodes < 1:
        raise ValueError("--episodes must be >= 1")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"--epsilon {epsilon:g}: a probability, within [0, 1]")
    player = load_player(checkpoint)
    envs = num_envs or min(episodes, player.env.num_envs)
    # Evaluation reports whole games: no life-loss terminals, no truncation beyond the configured limit.
    env_cfg = player.env.model_copy(update={"num_envs": envs, "terminal_on_life_loss": False})
    env = make_vector_env(env_cfg, seed=seed)
    try:
        network = build_q_network(player.network, env.spec, env_cfg.frame_stack)
        player.check(network, env.spec)
        device = select_device()
        network.load_state_dict(player.online)
        network.to(device).eval()
        policy = build_policy(EpsilonGreedyPolicySpec(epsilon=ConstantSchedule(value=epsilon)), num_envs=envs,
                              num_actions=env.spec.num_actions, seed=seed)
        core = network.initial_state(envs, device) if network.recurrent else None
        actor = Actor(env, env_cfg.frame_stack, policy, network_act(network, device), initial_core=core)
        actor.reset(seed, 0)
        returns: list[float] = []
        step = 0
        while len(returns) < episodes:
            for game in actor.step(step):
                if len(returns) < episodes:
                    returns.append(game.episode_return)
                    if on_episode is not None:
                        on_episode(len(returns), returns[-1])
            step += envs
    finally:
        env.close()
    return returns
