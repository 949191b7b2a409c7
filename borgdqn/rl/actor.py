"""The actor (Acme's): observe, pick actions, step the env, hand each step to the adder, count finished games.

One vector env of E copies. Per :meth:`Actor.step`: Q-values of the stacked observation o_t (``act``, with the
recurrent core when the network has one) -> the policy's actions a_t -> the env's step -> the adder gets
(frame of o_t, a_t, r_t, flags of o_t) with rewards clipped for learning only -> o_{t+1}. What it returns are the
full games (raw rewards, life losses not counted as ends) that ended at this step. The agent (borgdqn.rl.agent)
and ``borgdqn eval`` (borgdqn.evaluate) act through it; only the agent gives it an adder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from borgdqn.rl.adder import ChunkAdder
from borgdqn.rl.envs import VectorEnv
from borgdqn.rl.frame_stack import FrameStacker
from borgdqn.rl.networks import QNetwork
from borgdqn.rl.policies import ActorPolicy

# (observations [E, stack, *frame], recurrent core or None, episode starts [E] or None) -> (Q [E, A], next core)
ActFn = Callable[[np.ndarray, Any, "np.ndarray | None"], tuple[np.ndarray, Any]]


@dataclass(frozen=True)
class Game:
    """A full game that ended in env ``env``: its raw return, its length and the policy label it was played by."""

    env: int
    episode_return: float
    length: int
    label: str


class Actor:
    """Acts in ``env`` with ``policy`` on the Q-values of ``act``; ``adder`` (optional) gets every step."""

    def __init__(
        self,
        env: VectorEnv,
        frame_stack: int,
        policy: ActorPolicy,
        act: ActFn,
        *,
        adder: ChunkAdder | None = None,
        clip_rewards: bool = False,
        initial_core: Any = None,
    ) -> None:
        self.env = env
        self.policy = policy  # replaced when the agent adopts another's exploration (assimilation)
        self._act = act
        self._adder = adder
        self._clip = clip_rewards
        self._recurrent = initial_core is not None
        self.core = initial_core
        n = env.num_envs
        self._stacker = FrameStacker(n, frame_stack, env.spec.frame_shape, env.spec.frame_dtype)
        self.obs = np.empty(0)
        self._first = np.ones(n, dtype=bool)
        self._last = np.zeros(n, dtype=bool)
        self._terminated = np.zeros(n, dtype=bool)
        self._returns = np.zeros(n, dtype=np.float64)
        self._lengths = np.zeros(n, dtype=np.int64)
        self._game_starting = np.zeros(n, dtype=bool)

    def reset(self, seed: int, env_steps: int) -> None:
        """Start every env anew; ``env_steps`` is the agent's count so far (a resumed agent's)."""
        self.obs = self._stacker.reset(self.env.reset(seed=seed))
        self.policy.begin_episodes(np.ones(self.env.num_envs, dtype=bool), env_steps)

    def step(self, env_steps: int) -> list[Game]:
        """One step of every env at the agent's count ``env_steps``; the games that ended at it."""
        q, next_core = self._act(self.obs, self.core, self._first if self._recurrent else None)
        actions = self.policy.select(q, env_steps)
        result = self.env.step(actions)
        rewards = result.rewards
        if self._adder is not None:
            self._adder.add_step(
                self.obs[:, -1],
                actions,
                np.clip(rewards, -1.0, 1.0) if self._clip else rewards,
                self._first,
                self._last,
                self._terminated,
                self.policy.acting_ids(),
                core_to_numpy(self.core) if self._recurrent else None,
            )
        self.core = next_core

        # Full games with raw rewards: a life lost ends an episode for learning but not the game reported.
        self._returns += rewards
        self._lengths += ~self._last
        ended = np.flatnonzero(result.game_over)
        labels = self.policy.episode_labels() if ended.size else []
        games = [Game(int(e), float(self._returns[e]), int(self._lengths[e]), labels[e]) for e in ended]
        self._returns[ended] = 0.0
        self._lengths[ended] = 0
        self._game_starting[ended] = True

        # o_{t+1} becomes the current observation; a game's first action is the policy's new episode.
        self._first, self._terminated = result.first, result.terminated
        self._last = result.truncated | result.terminated
        self.obs = self._stacker.push(result.frames, self._first)
        new_games = self._first & self._game_starting
        if new_games.any():
            self.policy.begin_episodes(new_games, env_steps)
            self._game_starting &= ~new_games
        return games


def network_act(network: QNetwork, device: torch.device) -> ActFn:
    """Acting with a bare network, no learner (``borgdqn eval``, an exported network)."""

    @torch.no_grad()
    def act(obs: np.ndarray, core: Any, first: np.ndarray | None) -> tuple[np.ndarray, Any]:
        starts = None if first is None else torch.as_tensor(np.asarray(first, dtype=bool), device=device)
        q, new = network.q_step(torch.as_tensor(obs, device=device), core, starts)
        return q.float().cpu().numpy(), new

    return act


def core_to_numpy(core: Any) -> np.ndarray:
    """An LSTM state (h, c) as the [E, 2, hidden] float32 array a chunk stores."""
    h, c = core
    return np.stack([h.detach().float().cpu().numpy(), c.detach().float().cpu().numpy()], axis=1)
