"""Partially observed tasks of our own, registered as gymnasium ids (importing ``borgdqn.rl.envs`` registers them).

``borgdqn/CartPoleNoVelocity-v1`` is CartPole-v1 with the cart's and the pole's velocities hidden: the observation
is ``[cart position, pole angle]``. One observation cannot tell which way the pole is falling; a memory of the
last few (an LSTM, or a stack of frames) can. The test of the LSTM path learns it (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np

CARTPOLE_NO_VELOCITY = "borgdqn/CartPoleNoVelocity-v1"
_VISIBLE = [0, 2]  # cart position, pole angle (CartPole's observation: x, x_dot, theta, theta_dot)


class HideVelocities(gymnasium.ObservationWrapper[np.ndarray, Any, np.ndarray]):
    def __init__(self, env: gymnasium.Env[np.ndarray, Any]) -> None:
        super().__init__(env)
        space = env.observation_space
        assert isinstance(space, gymnasium.spaces.Box)
        self.observation_space = gymnasium.spaces.Box(space.low[_VISIBLE], space.high[_VISIBLE], dtype=np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.asarray(observation, dtype=np.float32)[_VISIBLE]


def cartpole_no_velocity(**kwargs: Any) -> gymnasium.Env[np.ndarray, Any]:
    """CartPole-v1 (its 500-step limit comes from this id's registration) with only positions visible."""
    from gymnasium.envs.classic_control.cartpole import CartPoleEnv

    return HideVelocities(CartPoleEnv(**kwargs))


def register() -> None:
    if CARTPOLE_NO_VELOCITY not in gymnasium.registry:
        gymnasium.register(
            CARTPOLE_NO_VELOCITY,
            entry_point="borgdqn.rl.partially_observed:cartpole_no_velocity",
            max_episode_steps=500,
            reward_threshold=475.0,
        )
