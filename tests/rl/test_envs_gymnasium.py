"""Our Atari frames are the field's frames: ale-py's vector env + FrameStacker against gymnasium's own wrappers.

The reference is ``FrameStackObservation(AtariPreprocessing(env), 4)`` on ``gymnasium.make(id, frameskip=1)``,
the wrappers the field's DQN code (CleanRL, SB3) uses. Both play the same seed and the same random actions for
thousands of steps and must give the same stacks (every pixel), rewards and terminals. The intended differences
(docs/environments.md) are made explicit on the reference side, and each is tested on its own:

* FIRE at reset: games with FIRE press it once right after the reset, before the NOOPs (baselines'
  ``FireResetEnv`` presses it after them); ``AtariPreprocessing`` does not. ``_ResetLike`` gives the reference
  the same press.
* The NOOP count at reset is drawn by ALE's own generator (1..noop_max frames, the FIRE counting as one), not by
  gymnasium's ``np_random``: the counts differ, the range is the same. Given ours, the frames are the same.
* After a terminal the next step starts a new episode (NEXT_STEP autoreset, the action is ignored); the reference
  calls ``reset()`` there.
* A lost life with ``terminal_on_life_loss`` ends the *learning* episode but not the game (the next step plays NOOP
  and continues); gymnasium's ``terminal_on_life_loss=True`` would reset the whole game at the next ``reset()``.
* The last frame of a truncated episode: ale-py's native env renders it differently from the screen the wrappers
  pool (a few dozen of 7,056 pixels in Pong); its reward and flags are equal and the difference is bounded (< 1%).
* Sticky actions use the same probability but another random stream (ALE seeded directly vs gymnasium's derived
  seed), so with ``sticky_actions > 0`` the games are not step-for-step comparable; our default is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ale_py
import gymnasium
import numpy as np
import pytest
from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation, TimeLimit

from borgdqn.config import EnvConfig
from borgdqn.rl.envs import env_seeds, make_vector_env
from borgdqn.rl.frame_stack import FrameStacker

gymnasium.register_envs(ale_py)

STACK = 4
SEED = 5


class _ResetLike(gymnasium.Wrapper[Any, Any, Any, Any]):
    """Below AtariPreprocessing: a reset presses FIRE once in games that have it, then plays ``noops`` NOOP frames."""

    def __init__(self, env: gymnasium.Env[Any, Any]) -> None:
        super().__init__(env)
        self.noops = 0  # set by the test from what our env played
        meanings = env.unwrapped.get_action_meanings()  # type: ignore[attr-defined]
        self.fire = meanings.index("FIRE") if "FIRE" in meanings else None

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        if self.fire is not None:
            obs, _, _, _, info = self.env.step(self.fire)
        for _ in range(self.noops):
            obs, _, _, _, info = self.env.step(0)
        return obs, info


@dataclass
class _Tally:
    steps: int = 0
    episodes: int = 0  # games that ended (game over or time limit)
    life_losses: int = 0
    truncated_frames_differing: int = 0  # the most pixels of a truncated episode's last frame that differed
    noop_counts: list[int] = field(default_factory=list)


def _reference(game: str, max_episode_steps: int | None) -> tuple[gymnasium.Env[Any, Any], _ResetLike]:
    raw = gymnasium.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=0.0, full_action_space=False)
    reset_like = _ResetLike(raw)
    env: gymnasium.Env[Any, Any] = AtariPreprocessing(reset_like, noop_max=0, frame_skip=4, screen_size=84)
    if max_episode_steps is not None:
        env = TimeLimit(env, max_episode_steps)
    return FrameStackObservation(env, STACK), reset_like


def _reset_noops(fire: bool, frames_at_reset: int) -> int:
    return frames_at_reset - 1 if fire else frames_at_reset


def _play_both(
    game: str, steps: int, *, noop_max: int = 0, life_loss: bool = False, max_episode_steps: int | None = None
) -> _Tally:
    """Play ``steps`` random actions in both; assert equal stacks, rewards and terminals at every step."""
    config = EnvConfig(
        id=f"ALE/{game}-v5",
        num_envs=1,
        noop_max=noop_max,
        terminal_on_life_loss=life_loss,
        max_episode_steps=max_episode_steps or 27_000,
    )
    ours = make_vector_env(config, seed=SEED)
    reference, reset_like = _reference(game, max_episode_steps)
    tally = _Tally()
    try:
        stacker = FrameStacker(1, STACK, ours.spec.frame_shape, np.uint8)
        stack = stacker.reset(ours.reset())
        fire = reset_like.fire is not None
        reset_like.noops = _reset_noops(fire, int(ours.info["episode_frame_number"][0]))
        tally.noop_counts.append(reset_like.noops)
        expected, _ = reference.reset(seed=int(env_seeds(SEED, 1)[0]))
        np.testing.assert_array_equal(stack[0], expected, err_msg="first stack")

        rng = np.random.default_rng(0)
        lives = int(ours.info["lives"][0])
        new_episode = game_over = False
        since_continuation = STACK  # steps since the last life-loss continuation
        for t in range(steps):
            action = int(rng.integers(ours.spec.num_actions))
            result = ours.step(np.array([action]))
            stack = stacker.push(result.frames, result.first)
            assert bool(result.first[0]) == new_episode, f"step {t}: first"
            if new_episode and game_over:
                reset_like.noops = _reset_noops(fire, int(ours.info["episode_frame_number"][0]))
                tally.noop_counts.append(reset_like.noops)
                expected, info = reference.reset()
                lives = int(info["lives"])
                since_continuation = STACK
                reward, terminated, truncated = 0.0, False, False
            else:
                # A life-loss continuation plays NOOP in our env: the reference plays the same.
                expected, raw_reward, terminated, truncated, info = reference.step(0 if new_episode else action)
                reward = float(raw_reward)
                since_continuation = 0 if new_episode else since_continuation + 1
                lost = int(info["lives"]) < lives
                lives = int(info["lives"])
                tally.life_losses += lost
                if life_loss:
                    terminated = terminated or lost
            if truncated:
                # The last frame of a truncated episode is rendered differently (module docstring): bounded here.
                differ = int(np.count_nonzero(stack[0][-1] != expected[-1]))
                assert differ < 0.01 * expected[-1].size, f"step {t}: {differ} pixels of the truncated frame differ"
                tally.truncated_frames_differing = max(tally.truncated_frames_differing, differ)
                expected = np.concatenate([expected[:-1], stack[0][-1:]])
            if since_continuation < STACK - 1:
                # A life-loss continuation starts a new learning episode: our stack starts over, padding with that
                # episode's first frame; FrameStackObservation keeps the frames from before the lost life.
                expected = expected.copy()
                expected[: STACK - 1 - since_continuation] = expected[STACK - 1 - since_continuation]
            np.testing.assert_array_equal(stack[0], expected, err_msg=f"step {t}: stack")
            # The reward of a life-loss continuation's NOOP frames moves one step later in ours (module docstring
            # of borgdqn.rl.envs); in these games those frames score nothing, so rewards match step for step.
            assert float(result.rewards[0]) == reward, f"step {t}: reward"
            assert bool(result.terminated[0]) == terminated, f"step {t}: terminated"
            assert bool(result.truncated[0]) == truncated, f"step {t}: truncated"
            game_over = bool(result.game_over[0])
            new_episode = bool(result.terminated[0] or result.truncated[0])
            tally.episodes += game_over
            tally.steps += 1
    finally:
        ours.close()
        reference.close()
    return tally


@pytest.mark.slow
@pytest.mark.parametrize(("game", "steps"), [("Pong", 4000), ("Breakout", 4000)])
def test_frames_rewards_and_terminals_equal_gymnasiums_wrappers(game: str, steps: int) -> None:
    tally = _play_both(game, steps)
    assert tally.steps == steps
    assert tally.episodes >= 2  # several resets compared, not one long episode
    if game == "Breakout":
        assert tally.life_losses >= 5  # lives were lost (and were not terminals: life_loss is off)


@pytest.mark.slow
def test_noop_starts_differ_only_in_the_count_drawn() -> None:
    tally = _play_both("Breakout", 2500, noop_max=30)
    # Ours draws 1..30 reset frames (29 NOOPs at most, FIRE being the 30th); the counts vary across resets.
    assert all(0 <= n <= 29 for n in tally.noop_counts), tally.noop_counts
    assert len(tally.noop_counts) >= 3 and len(set(tally.noop_counts)) > 1, tally.noop_counts


@pytest.mark.slow
def test_life_loss_ends_the_learning_episode_and_the_game_goes_on() -> None:
    tally = _play_both("Breakout", 2500, life_loss=True)
    assert tally.life_losses >= 5


@pytest.mark.slow
def test_time_limit_truncates_like_gymnasiums_time_limit() -> None:
    tally = _play_both("Pong", 1500, max_episode_steps=200)
    assert tally.episodes >= 7  # every Pong episode here ends by the 200-step limit
