"""The environment layer on real envs: ALE preprocessing, NEXT_STEP autoreset, life-loss terminals, seeding."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import numpy as np
import pytest
from ale_py.vector_env import AtariVectorEnv

from borgdqn.config import EnvConfig
from borgdqn.rl.envs import (
    StepResult,
    VectorEnv,
    env_seeds,
    is_atari,
    make_vector_env,
)
from borgdqn.rl.frame_stack import FrameStacker


class _Envs:
    """Builds envs for a test and closes them all at its end."""

    def __init__(self) -> None:
        self.opened: list[VectorEnv] = []

    def __call__(self, seed: int = 1, **fields: Any) -> VectorEnv:
        env = make_vector_env(EnvConfig(**fields), seed=seed)
        self.opened.append(env)
        return env


@pytest.fixture
def envs() -> Iterator[_Envs]:
    made = _Envs()
    yield made
    for env in made.opened:
        env.close()


def _random_actions(rng: np.random.Generator, env: VectorEnv) -> np.ndarray:
    return rng.integers(0, env.spec.num_actions, env.num_envs)


# ------------------------------------------------------------------------------------------------- ids
def test_is_atari_knows_ale_ids() -> None:
    assert is_atari("ALE/Pong-v5")
    assert is_atari("ALE/Breakout-v5")
    assert is_atari("PongNoFrameskip-v4")
    assert not is_atari("CartPole-v1")
    assert not is_atari("ALE/NoSuchGame-v5")


@pytest.mark.parametrize("env_id", ["ALE/NoSuchGame-v5", "NoSuchEnv-v0", "not an id!"])
def test_unknown_id_is_a_one_line_value_error(env_id: str) -> None:
    with pytest.raises(ValueError, match="unknown environment id") as info:
        make_vector_env(EnvConfig(id=env_id, num_envs=1), seed=0)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("env_id", "why"), [("Pendulum-v1", "Discrete actions"), ("FrozenLake-v1", "1-D Box")])
def test_envs_dqn_cannot_drive_are_rejected(env_id: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        make_vector_env(EnvConfig(id=env_id, num_envs=1), seed=0)


def test_env_seeds_are_per_env_valid_and_stable() -> None:
    seeds = env_seeds(7, 5)
    assert seeds.dtype == np.int64 and len(set(seeds.tolist())) == 5
    assert np.all((seeds >= 1) & (seeds <= 2**31 - 1))
    assert np.array_equal(env_seeds(7, 3), seeds[:3])  # env e's seed does not depend on num_envs
    assert not np.array_equal(env_seeds(8, 5), seeds)
    assert not np.array_equal(env_seeds(-7, 5), seeds)


# --------------------------------------------------------------------------------------------- Atari
def test_pong_frames_are_84x84_uint8(envs: _Envs) -> None:
    env = envs(num_envs=2)
    assert env.spec.frame_shape == (84, 84) and env.spec.frame_dtype == np.uint8
    assert env.spec.is_image and env.spec.num_actions == 6
    frames = env.reset()
    assert frames.shape == (2, 84, 84) and frames.dtype == np.uint8 and frames.any()
    result = env.step(np.array([0, 1]))
    assert isinstance(result, StepResult)
    assert result.frames.shape == (2, 84, 84) and result.frames.dtype == np.uint8
    assert result.rewards.shape == (2,) and result.rewards.dtype == np.float32
    for flags in (result.terminated, result.truncated, result.first, result.game_over):
        assert flags.shape == (2,) and flags.dtype == bool
    assert not result.first.any()

    small = envs(num_envs=1, screen_size=64)
    assert small.reset().shape == (1, 64, 64) and small.spec.frame_shape == (64, 64)


@pytest.mark.parametrize("frame_skip", [2, 4])
def test_one_step_plays_frame_skip_ale_frames(envs: _Envs, frame_skip: int) -> None:
    env = envs(num_envs=1, frame_skip=frame_skip, noop_max=0)
    env.reset()
    before = int(env.info["episode_frame_number"][0])
    env.step(np.zeros(1, dtype=np.int64))
    env.step(np.zeros(1, dtype=np.int64))
    assert int(env.info["episode_frame_number"][0]) - before == 2 * frame_skip


def test_noop_starts_vary_the_initial_state(envs: _Envs) -> None:
    noops = envs(num_envs=4, noop_max=30, seed=3)
    frames = noops.reset()
    reset_frames = noops.info["episode_frame_number"]
    assert len(set(reset_frames.tolist())) > 1 and reset_frames.max() > 1
    assert any(not np.array_equal(frames[0], frames[e]) for e in range(1, 4))

    none = envs(num_envs=4, noop_max=0, seed=3)
    frames = none.reset()
    # Pong has FIRE: a reset without NOOPs plays exactly that one frame, the same in every env.
    assert none.info["episode_frame_number"].tolist() == [1, 1, 1, 1]
    assert all(np.array_equal(frames[0], frames[e]) for e in range(1, 4))


def test_pong_is_deterministic_for_a_seed(envs: _Envs) -> None:
    def rollout(seed: int, steps: int) -> list[np.ndarray]:
        env = envs(num_envs=2, seed=seed)
        rng = np.random.default_rng(0)
        out = [env.reset(), env.info["episode_frame_number"]]
        return out + [env.step(_random_actions(rng, env)).frames for _ in range(steps)]

    a, b = rollout(11, 30), rollout(11, 30)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    # Another seed draws other NOOP starts.
    assert not np.array_equal(rollout(12, 0)[1], a[1])


def test_time_limit_truncates_and_the_next_step_resets(envs: _Envs) -> None:
    env = envs(num_envs=2, noop_max=0, max_episode_steps=5)
    initial = env.reset()
    actions = np.array([2, 3])
    for _ in range(4):
        result = env.step(actions)
        assert not (result.truncated.any() or result.first.any() or result.game_over.any())
    result = env.step(actions)
    assert result.truncated.all() and result.game_over.all() and not result.first.any()
    assert not np.array_equal(result.frames, initial)  # the final observation, not a reset one

    result = env.step(actions)
    assert result.first.all() and not (result.truncated.any() or result.terminated.any())
    assert np.all(result.rewards == 0.0)
    assert np.array_equal(result.frames, initial)  # without NOOPs every reset starts alike
    assert env.info["episode_frame_number"].tolist() == [1, 1]


def test_stacks_match_ale_native_stacking_across_resets(envs: _Envs) -> None:
    """Our frames + FrameStacker(4) == ale-py's own stack_num=4 on the same seeds, resets included, except the
    padding: ale-py 0.12 pads a young episode's stack with black frames, we repeat its first frame."""
    seed, num_envs = 5, 2
    env = envs(num_envs=num_envs, seed=seed, max_episode_steps=6)
    native = AtariVectorEnv(
        "pong",
        num_envs,
        num_threads=1,
        max_num_frames_per_episode=6 * 4,
        img_height=84,
        img_width=84,
        stack_num=4,
        frameskip=4,
        noop_max=30,
        reward_clipping=False,
    )

    def check(ours: np.ndarray, theirs: np.ndarray, age: np.ndarray) -> None:
        for e in range(num_envs):
            pad = max(0, 3 - int(age[e]))
            assert np.array_equal(ours[e, pad:], theirs[e, pad:])
            assert not theirs[e, :pad].any()
            assert all(np.array_equal(ours[e, k], ours[e, pad]) for k in range(pad))

    try:
        stack4 = FrameStacker(num_envs, 4, (84, 84), np.uint8)
        stack1 = FrameStacker(num_envs, 1, (84, 84), np.uint8)
        frames = env.reset()
        expected, _ = native.reset(seed=env_seeds(seed, num_envs))
        age = np.zeros(num_envs, dtype=np.int64)  # steps since the episode's first frame
        check(stack4.reset(frames), expected, age)
        assert np.array_equal(stack1.reset(frames)[:, 0], frames)
        rng = np.random.default_rng(1)
        oldest, resets = 0, 0
        for _ in range(16):
            actions = _random_actions(rng, env)
            result = env.step(actions)
            expected, *_ = native.step(actions)
            age = np.where(result.first, 0, age + 1)
            oldest, resets = max(oldest, int(age.max())), resets + int(result.first.sum())
            check(stack4.push(result.frames, result.first), expected, age)
            assert np.array_equal(stack1.push(result.frames, result.first)[:, 0], result.frames)
        assert oldest >= 4 and resets == 2 * num_envs  # young and full stacks, across autoresets, were compared
    finally:
        native.close()


def _play_one_game(env: VectorEnv, seed: int) -> list[tuple[StepResult, int]]:
    """Random play in env 0 until its game is over; returns each step with env 0's lives after it."""
    rng = np.random.default_rng(seed)
    env.reset()
    steps: list[tuple[StepResult, int]] = []
    while not (steps and steps[-1][0].game_over[0]):
        result = env.step(_random_actions(rng, env))
        steps.append((result, int(env.info["lives"][0])))
        assert len(steps) < 5_000, "a random Breakout game should end long before this"
    return steps


def test_life_loss_is_a_terminal_inside_one_game(envs: _Envs) -> None:
    env = envs(id="ALE/Breakout-v5", num_envs=1, terminal_on_life_loss=True, noop_max=0, seed=2)
    steps = _play_one_game(env, seed=0)
    terminals = [i for i, (r, _) in enumerate(steps) if r.terminated[0]]
    # Breakout has 5 lives: 4 life-loss terminals with lives left, then the real game over on the last one.
    assert [steps[i][1] for i in terminals] == [4, 3, 2, 1, 0]
    assert [bool(steps[i][0].game_over[0]) for i in terminals] == [False] * 4 + [True]
    for i in terminals[:-1]:
        after, lives_after = steps[i + 1]
        # A new learning episode in the same game: first, no reward, and the lives are not restored.
        assert after.first[0] and after.rewards[0] == 0.0 and not after.terminated[0]
        assert lives_after == steps[i][1]
    firsts = [i for i, (r, _) in enumerate(steps) if r.first[0]]
    assert firsts == [i + 1 for i in terminals[:-1]]


def test_without_life_loss_terminal_only_the_game_over_ends_an_episode(envs: _Envs) -> None:
    env = envs(id="ALE/Breakout-v5", num_envs=1, terminal_on_life_loss=False, noop_max=0, seed=2)
    steps = _play_one_game(env, seed=0)
    lost_lives = sum(1 for (_, a), (_, b) in pairwise(steps) if b < a)
    assert lost_lives >= 3  # lives were lost during the game...
    ends = [i for i, (r, _) in enumerate(steps) if r.terminated[0] or r.truncated[0] or r.first[0]]
    assert ends == [len(steps) - 1]  # ...but only the game over ended the episode
    assert steps[-1][0].terminated[0] and steps[-1][1] == 0


def test_life_loss_continuation_plays_noop_in_the_same_game(envs: _Envs) -> None:
    """Fed the actions really played (NOOP after a life loss), the game is the one played without life-loss
    terminals, so raw rewards summed until game_over are the game's score."""
    on = envs(id="ALE/Breakout-v5", num_envs=1, terminal_on_life_loss=True, seed=4)
    off = envs(id="ALE/Breakout-v5", num_envs=1, terminal_on_life_loss=False, seed=4)
    assert np.array_equal(on.reset(), off.reset())
    rng = np.random.default_rng(1)  # a game that scores
    score_on = score_off = 0.0
    continuing = np.zeros(1, dtype=bool)  # on's last step lost a life: this step starts a learning episode
    continuations = 0
    for _ in range(5_000):
        actions = _random_actions(rng, on)
        a = on.step(actions)
        b = off.step(np.where(continuing, 0, actions))  # 0 is NOOP in Breakout
        assert np.array_equal(a.first, continuing)
        assert np.array_equal(a.frames, b.frames)
        score_on, score_off = score_on + float(a.rewards[0]), score_off + float(b.rewards[0])
        assert a.game_over[0] == b.game_over[0]
        if a.game_over[0]:
            break
        continuations += int(continuing[0])
        continuing = a.terminated | a.truncated
    assert a.game_over[0] and continuations == 4 and score_on == score_off > 0


def test_out_of_range_actions_are_rejected(envs: _Envs) -> None:
    env = envs(num_envs=2)
    env.reset()
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        env.step(np.array([0, 6]))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.array([0]))


# ------------------------------------------------------------------------------------------ CartPole
def test_cartpole_spec_and_frames(envs: _Envs) -> None:
    env = envs(id="CartPole-v1", num_envs=3)
    assert env.spec.frame_shape == (4,) and env.spec.frame_dtype == np.float32
    assert env.spec.num_actions == 2 and not env.spec.is_image
    frames = env.reset()
    assert frames.shape == (3, 4) and frames.dtype == np.float32
    result = env.step(np.array([0, 1, 0]))
    assert result.frames.shape == (3, 4) and result.frames.dtype == np.float32
    assert result.rewards.dtype == np.float32 and np.all(result.rewards == 1.0)


def test_cartpole_next_step_autoreset_sets_first(envs: _Envs) -> None:
    env = envs(id="CartPole-v1", num_envs=4, seed=3)
    rng = np.random.default_rng(0)
    env.reset()
    ended = np.zeros(4, dtype=bool)
    checked = 0
    for _ in range(300):
        result = env.step(_random_actions(rng, env))
        assert np.array_equal(result.first, ended)
        assert np.array_equal(result.game_over, result.terminated | result.truncated)
        if ended.any():
            assert np.all(result.rewards[ended] == 0.0)
            assert not (result.terminated[ended].any() or result.truncated[ended].any())
            assert np.all(np.abs(result.frames[ended]) <= 0.05)  # CartPole's reset range
            checked += int(ended.sum())
        assert np.all(result.rewards[~ended] == 1.0)
        ended = result.terminated | result.truncated
    assert checked >= 10


def test_cartpole_is_deterministic_for_a_seed(envs: _Envs) -> None:
    def rollout(seed: int) -> list[np.ndarray]:
        env = envs(id="CartPole-v1", num_envs=2, seed=seed)
        rng = np.random.default_rng(0)
        out = [env.reset()]
        for _ in range(100):
            result = env.step(_random_actions(rng, env))
            out += [result.frames, result.rewards, result.first]
        return out

    a, b = rollout(4), rollout(4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], rollout(5)[0])


def test_cartpole_time_limit_from_config(envs: _Envs) -> None:
    env = envs(id="CartPole-v1", num_envs=2, max_episode_steps=5)
    env.reset()
    results = [env.step(np.array([0, 1])) for _ in range(5)]
    assert not any(r.truncated.any() for r in results[:4])
    assert results[4].truncated.all() and results[4].game_over.all()


def test_cartpole_keeps_its_registered_limit_under_a_larger_config_value(envs: _Envs) -> None:
    env = envs(id="CartPole-v1", num_envs=2, max_episode_steps=27_000)
    frames = env.reset()
    for step in range(1, 501):
        # A balancing controller, so that only the time limit can end the episodes.
        result = env.step((frames[:, 2] + 0.5 * frames[:, 3] + 0.01 * frames[:, 0] + 0.1 * frames[:, 1] > 0) * 1)
        frames = result.frames
        assert not result.terminated.any()
        assert result.truncated.all() == (step == 500)
