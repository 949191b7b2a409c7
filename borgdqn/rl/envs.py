"""Vectorised environments with one step contract for every backend.

An agent owns one ``VectorEnv`` of ``num_envs`` environments and sees, per step, the newest *single* frame of each
(``FrameStacker`` builds stacks, so that the replay memory can rebuild them the same way from single frames).

Two backends:

* ALE ids (``ALE/Pong-v5``, ``PongNoFrameskip-v4``, ...) run on ale-py's native ``AtariVectorEnv`` with the
  standard DQN preprocessing taken from ``EnvConfig`` (the id only names the game: its own frameskip and sticky
  actions are replaced by the config's). Frames are ``uint8 [E, screen_size, screen_size]`` grayscale, max-pooled
  over the last two of ``frame_skip`` frames; a reset presses FIRE once in games that have it, then plays a
  random number of NOOPs (1..noop_max reset frames in all, the FIRE counting as one); rewards are raw
  (unclipped); episodes are truncated after ``max_episode_steps`` agent steps (reset frames do not count).
  Frames, rewards and terminals equal gymnasium's ``AtariPreprocessing`` + ``FrameStackObservation`` step for
  step, but for the differences docs/environments.md lists (tests/rl/test_envs_gymnasium.py).
* Any other gymnasium id with a 1-D ``Box`` observation and ``Discrete`` actions runs on
  ``gymnasium.vector.SyncVectorEnv``; frames are ``float32 [E, dim]``. The env's own registered time limit stays
  an upper bound (CartPole-v1 keeps 500 under the default ``max_episode_steps=27000``); a smaller config value
  wins.

Autoreset (gymnasium's NEXT_STEP mode, identical for both backends): a step that returns
``terminated | truncated`` for env e carries the episode's final observation in ``frames[e]``. The next ``step()``
ignores e's action, starts a new episode and returns its first frame with reward 0, ``terminated = truncated =
False`` and ``first[e] = True``.

Life loss as a terminal (``terminal_on_life_loss``, ALE only). ale-py's own ``episodic_life=True`` resets the
whole game (all lives back) after every life loss, so a game would never reach its real end; we keep it off and
derive the life-loss terminal from ``info["lives"]`` instead:

* the step that loses a life returns ``terminated=True`` while ``game_over`` stays False;
* the next step is the first step of a new *learning* episode in the *same game*: the game is not reset, e's
  action is replaced by NOOP (the agent's action on a last observation is meaningless, as after a real
  terminal), and it returns ``first=True``, reward 0. The reward of those NOOP frames (almost always 0) is
  added to the following step's reward, so that raw rewards summed until ``game_over`` are the exact game score;
* ``game_over`` is True only when the real game ended (ALE game over) or the time limit truncated it, and then
  the next step resets the game as usual.

So an agent records a learning episode boundary at every ``terminated | truncated``, sums raw rewards into the
reported return and reports (and zeroes) it when ``game_over`` is True. Without ``terminal_on_life_loss``,
``game_over == terminated | truncated``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import ale_py
import gymnasium
import numpy as np
from ale_py.vector_env import AtariVectorEnv
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from borgdqn.config import EnvConfig
from borgdqn.rl import partially_observed

logger = logging.getLogger(__name__)

gymnasium.register_envs(ale_py)
partially_observed.register()

_ALE_ENTRY_POINT = "ale_py.env:AtariEnv"
# ALE keeps seeds in a C int, and ignores seeds <= 0 (it then seeds from std::random_device).
_MAX_ALE_SEED = 2**31 - 1
# "No time limit" for ALE: the native env counts frames in a C int.
_NO_FRAME_LIMIT = 2**30
# One worker thread per this many envs; below it a second thread costs more in hand-offs than it saves, and on
# a small machine every agent is already its own process.
_ENVS_PER_THREAD = 32


@dataclass(frozen=True)
class EnvSpec:
    frame_shape: tuple[int, ...]  # one frame: (84, 84) for Atari, (4,) for CartPole
    frame_dtype: np.dtype  # uint8 for images, float32 for vectors
    num_actions: int
    is_image: bool  # True -> CNN torso, False -> MLP


@dataclass
class StepResult:
    """One step of all E envs; every array is freshly allocated and the caller may keep it."""

    frames: np.ndarray  # [E, *frame_shape] newest single frame per env (no stacking here)
    rewards: np.ndarray  # [E] float32, raw (unclipped); the agent clips for learning
    terminated: np.ndarray  # [E] bool, learning terminal (includes life loss when terminal_on_life_loss)
    truncated: np.ndarray  # [E] bool, time limit
    first: np.ndarray  # [E] bool, frames[e] is the first observation of a new episode (after an autoreset)
    game_over: np.ndarray  # [E] bool, the real game ended (report full-game returns here)


@runtime_checkable
class VectorEnv(Protocol):
    """``num_envs`` environments stepped together with NEXT_STEP autoreset (see the module docstring).

    ``info`` holds the backend's last info dict, for diagnostics only (ALE: ``lives``, ``frame_number``,
    ``episode_frame_number``); its keys differ between backends.
    """

    num_envs: int
    spec: EnvSpec
    info: dict[str, Any]

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start new episodes in all envs; returns their first frames ``[E, *frame_shape]``.

        ``seed=None`` on the first reset uses the seed given at construction; later it continues the envs' random
        streams.
        """
        ...

    def step(self, actions: np.ndarray) -> StepResult: ...

    def close(self) -> None: ...


def env_seeds(seed: int, num_envs: int) -> np.ndarray:
    """Per-env seeds derived from one seed: int64 ``[num_envs]`` in ``[1, 2**31 - 1]`` (valid for ALE too).

    Env e's seed depends only on ``seed`` and ``e``, not on ``num_envs``.
    """
    entropy = seed % 2**64  # SeedSequence wants a non-negative int; negative seeds stay distinct
    words = [np.random.SeedSequence(entropy, spawn_key=(e,)).generate_state(1)[0] for e in range(num_envs)]
    return np.array(words, dtype=np.int64) % _MAX_ALE_SEED + 1


def _registered(env_id: str) -> gymnasium.envs.registration.EnvSpec | None:
    try:
        return gymnasium.spec(env_id)
    except gymnasium.error.Error:
        return None


def ale_game(env_id: str) -> str | None:
    """The ALE ROM name (``pong``) of a registered ALE id with screen observations, else None."""
    spec = _registered(env_id)
    if spec is None or spec.entry_point != _ALE_ENTRY_POINT:
        return None
    if spec.kwargs.get("obs_type", "rgb") == "ram":
        return None
    game = spec.kwargs.get("game")
    return game if isinstance(game, str) else None


def is_atari(env_id: str) -> bool:
    """True for registered ALE ids with screen observations (``ALE/Pong-v5``, ``PongNoFrameskip-v4``, ...)."""
    return ale_game(env_id) is not None


def _check_actions(actions: np.ndarray, num_envs: int, num_actions: int) -> np.ndarray:
    actions = np.asarray(actions)
    if actions.shape != (num_envs,):
        raise ValueError(f"actions must have shape ({num_envs},), got {actions.shape}")
    if actions.dtype.kind not in "iu":
        raise ValueError(f"actions must be integers, got dtype {actions.dtype}")
    # ALE silently plays NOOP for an out-of-range action; a policy bug should not look like a passive agent.
    if num_envs and (actions.min() < 0 or actions.max() >= num_actions):
        raise ValueError(f"actions must be in [0, {num_actions}), got {actions.min()}..{actions.max()}")
    return actions.astype(np.int64, copy=False)


class AleVectorEnv:
    """ALE games on ale-py's native vector env, with DQN preprocessing and life-loss terminals done here."""

    def __init__(self, config: EnvConfig, game: str, seed: int, num_threads: int) -> None:
        steps = config.max_episode_steps
        frame_limit = _NO_FRAME_LIMIT if steps is None else min(steps * config.frame_skip, _NO_FRAME_LIMIT)
        self._env = AtariVectorEnv(
            game,
            config.num_envs,
            num_threads=num_threads,
            max_num_frames_per_episode=frame_limit,
            repeat_action_probability=config.sticky_actions,
            autoreset_mode=AutoresetMode.NEXT_STEP,
            img_height=config.screen_size,
            img_width=config.screen_size,
            grayscale=True,
            stack_num=1,
            frameskip=config.frame_skip,
            maxpool=True,
            # ALE draws from U(0, noop_max - 1), undefined for 0; 1 gives the same "no random NOOPs".
            noop_max=max(1, config.noop_max),
            # Both off: see the module docstring (episodic_life resets the whole game on a life loss).
            episodic_life=False,
            life_loss_info=False,
            reward_clipping=False,
            use_fire_reset=True,
        )
        self.num_envs = config.num_envs
        action_set = list(self._env.ale.get_action_set())
        self.spec = EnvSpec(
            frame_shape=(config.screen_size, config.screen_size),
            frame_dtype=np.dtype(np.uint8),
            num_actions=len(action_set),
            is_image=True,
        )
        self.info: dict[str, Any] = {}
        self._noop = action_set.index(ale_py.Action.NOOP) if ale_py.Action.NOOP in action_set else 0
        self._life_loss_terminal = config.terminal_on_life_loss
        self._seed = seed
        self._seeded = False
        e = self.num_envs
        self._ended = np.zeros(e, dtype=bool)  # terminated|truncated last step: this step starts an episode
        self._lives = np.zeros(e, dtype=np.int64)
        self._carry = np.zeros(e, dtype=np.float32)  # reward of life-loss NOOP frames, paid on the next step

    def reset(self, seed: int | None = None) -> np.ndarray:
        if seed is None and not self._seeded:
            seed = self._seed
        obs, info = self._env.reset(seed=None if seed is None else env_seeds(seed, self.num_envs))
        self._seeded = True
        self.info = info
        self._lives = info["lives"].astype(np.int64)
        self._ended[:] = False
        self._carry[:] = 0.0
        return obs.reshape(self.num_envs, *self.spec.frame_shape)

    def step(self, actions: np.ndarray) -> StepResult:
        actions = _check_actions(actions, self.num_envs, self.spec.num_actions)
        first = self._ended.copy()
        if first.any():
            # A real reset ignores the action anyway; a life-loss continuation must not act on a last observation.
            actions = np.where(first, self._noop, actions)
        obs, raw_rewards, game_terminated, truncated, info = self._env.step(actions)
        self.info = info

        rewards = raw_rewards.astype(np.float32) + self._carry
        self._carry[:] = 0.0
        if first.any():
            # A first step reports reward 0; what a life-loss continuation earned during its NOOP frames is paid
            # on the next step so that the game's summed return stays exact (a real reset earns 0 anyway).
            self._carry[first] = rewards[first]
            rewards[first] = 0.0

        lives = info["lives"].astype(np.int64)
        life_lost = lives < self._lives
        self._lives = lives

        game_over = game_terminated | truncated
        terminated = game_terminated | life_lost if self._life_loss_terminal else game_terminated.copy()
        self._carry[game_over] = 0.0  # the next step resets the game: nothing is carried into a new game
        self._ended = terminated | truncated
        return StepResult(
            frames=obs.reshape(self.num_envs, *self.spec.frame_shape),
            rewards=rewards,
            terminated=terminated,
            truncated=truncated.copy(),
            first=first,
            game_over=game_over,
        )

    def close(self) -> None:
        self._env.close()


class GymVectorEnv:
    """Any gymnasium env with 1-D Box observations and Discrete actions, on SyncVectorEnv (NEXT_STEP autoreset)."""

    def __init__(self, config: EnvConfig, seed: int) -> None:
        limit = _time_limit(config.id, config.max_episode_steps)
        fns: list[Callable[[], gymnasium.Env[Any, Any]]] = [
            lambda: gymnasium.make(config.id, max_episode_steps=limit) for _ in range(config.num_envs)
        ]
        try:
            self._env = SyncVectorEnv(fns, autoreset_mode=AutoresetMode.NEXT_STEP)
        except gymnasium.error.Error as err:
            raise ValueError(f"cannot create environment {config.id!r}: {err}") from err
        try:
            self.spec = _vector_spec(config.id, self._env)
        except ValueError:
            self._env.close()
            raise
        self.num_envs = config.num_envs
        self.info: dict[str, Any] = {}
        action_space = self._env.single_action_space
        assert isinstance(action_space, gymnasium.spaces.Discrete)  # checked by _vector_spec
        self._action_start = int(action_space.start)
        self._seed = seed
        self._seeded = False
        self._ended = np.zeros(self.num_envs, dtype=bool)

    def reset(self, seed: int | None = None) -> np.ndarray:
        if seed is None and not self._seeded:
            seed = self._seed
        seeds: list[int | None] | None = None
        if seed is not None:
            seeds = [int(s) for s in env_seeds(seed, self.num_envs)]
        obs, info = self._env.reset(seed=seeds)
        self._seeded = True
        self.info = info
        self._ended[:] = False
        return np.array(obs, dtype=np.float32)

    def step(self, actions: np.ndarray) -> StepResult:
        actions = _check_actions(actions, self.num_envs, self.spec.num_actions)
        first = self._ended.copy()
        obs, rewards, terminated, truncated, info = self._env.step(actions + self._action_start)
        self.info = info
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool)
        self._ended = terminated | truncated
        return StepResult(
            frames=np.array(obs, dtype=np.float32),
            rewards=np.asarray(rewards, dtype=np.float32),
            terminated=terminated,
            truncated=truncated,
            first=first,
            game_over=terminated | truncated,
        )

    def close(self) -> None:
        self._env.close()


def _time_limit(env_id: str, max_episode_steps: int | None) -> int | None:
    registered = getattr(_registered(env_id), "max_episode_steps", None)
    if registered is None or max_episode_steps is None:
        return registered if max_episode_steps is None else max_episode_steps
    return min(registered, max_episode_steps)


def _vector_spec(env_id: str, env: SyncVectorEnv) -> EnvSpec:
    obs_space, act_space = env.single_observation_space, env.single_action_space
    if not isinstance(act_space, gymnasium.spaces.Discrete):
        raise ValueError(f"environment {env_id!r} has {act_space} actions; DQN needs Discrete actions")
    if not isinstance(obs_space, gymnasium.spaces.Box) or len(obs_space.shape) != 1:
        raise ValueError(
            f"environment {env_id!r} has {obs_space} observations; only 1-D Box observations are supported"
            " outside ALE (image observations only for ALE ids)"
        )
    return EnvSpec(
        frame_shape=tuple(int(d) for d in obs_space.shape),
        frame_dtype=np.dtype(np.float32),
        num_actions=int(act_space.n),
        is_image=False,
    )


def default_num_threads(num_envs: int) -> int:
    """ALE worker threads for one agent: 1 unless it has many envs, never more than the cores it may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, num_envs // _ENVS_PER_THREAD))


def make_vector_env(config: EnvConfig, seed: int, *, num_threads: int | None = None) -> VectorEnv:
    """Build the agent's vector env for ``config.id``; ``seed`` makes it deterministic (env e gets env_seeds()[e]).

    ``num_threads`` (ALE only) defaults to ``default_num_threads(config.num_envs)``. Raises ValueError with a one-line
    message for an unknown id or an env this package cannot drive.
    """
    game = ale_game(config.id)
    if game is not None:
        threads = default_num_threads(config.num_envs) if num_threads is None else num_threads
        logger.info(
            "env backend=ale id=%s game=%s num_envs=%d threads=%d frame_skip=%d screen=%d noop_max=%d "
            "life_loss_terminal=%s sticky=%g seed=%d",
            config.id, game, config.num_envs, threads, config.frame_skip, config.screen_size, config.noop_max,
            config.terminal_on_life_loss, config.sticky_actions, seed,
        )  # fmt: skip
        return AleVectorEnv(config, game, seed, threads)
    if _registered(config.id) is None:
        raise ValueError(f"unknown environment id {config.id!r}: not a registered gymnasium or ALE id")
    logger.info("env backend=gymnasium id=%s num_envs=%d seed=%d", config.id, config.num_envs, seed)
    return GymVectorEnv(config, seed)
