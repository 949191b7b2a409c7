"""FrameStacker builds the stacks the replay memory rebuilds: first frame repeated before it, oldest first."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from borgdqn.rl.frame_stack import FrameStacker


def _frames(step: int, num_envs: int, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """Frames whose every pixel says (step, env), so stacks can be read back as step numbers."""
    values = np.array([step * 10 + e for e in range(num_envs)], dtype=np.uint8)
    return np.broadcast_to(values.reshape(num_envs, *([1] * len(shape))), (num_envs, *shape)).copy()


def _steps_of(stack: np.ndarray) -> list[list[int]]:
    """[E, S, ...] stack of _frames -> per env the step numbers it holds, oldest first."""
    return [[int(f.flat[0]) // 10 for f in env_stack] for env_stack in stack]


def test_reset_repeats_the_first_frame() -> None:
    stacker = FrameStacker(3, 4, (2, 3), np.uint8)
    out = stacker.reset(_frames(5, 3))
    assert out.shape == (3, 4, 2, 3) and out.dtype == np.uint8
    for e in range(3):
        assert all(np.array_equal(out[e, k], _frames(5, 3)[e]) for k in range(4))


def test_push_shifts_left_and_appends_newest_last() -> None:
    stacker = FrameStacker(2, 4, (2, 3), np.uint8)
    stacker.reset(_frames(0, 2))
    no_first = np.zeros(2, dtype=bool)
    assert _steps_of(stacker.push(_frames(1, 2), no_first)) == [[0, 0, 0, 1]] * 2
    assert _steps_of(stacker.push(_frames(2, 2), no_first)) == [[0, 0, 1, 2]] * 2
    stacker.push(_frames(3, 2), no_first)
    assert _steps_of(stacker.push(_frames(4, 2), no_first)) == [[1, 2, 3, 4]] * 2


def test_first_restarts_only_that_env_in_the_middle() -> None:
    stacker = FrameStacker(3, 4, (2, 3), np.uint8)
    stacker.reset(_frames(0, 3))
    for t in (1, 2, 3):
        stacker.push(_frames(t, 3), np.zeros(3, dtype=bool))
    out = stacker.push(_frames(4, 3), np.array([False, True, False]))
    assert _steps_of(out) == [[1, 2, 3, 4], [4, 4, 4, 4], [1, 2, 3, 4]]
    out = stacker.push(_frames(5, 3), np.zeros(3, dtype=bool))
    assert _steps_of(out) == [[2, 3, 4, 5], [4, 4, 4, 5], [2, 3, 4, 5]]


def test_stack_of_one_is_the_frame_itself() -> None:
    stacker = FrameStacker(2, 1, (4,), np.float32)
    frames = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert np.array_equal(stacker.reset(frames), frames[:, None])
    out = stacker.push(frames + 1, np.array([True, False]))
    assert out.shape == (2, 1, 4) and out.dtype == np.float32
    assert np.array_equal(out, (frames + 1)[:, None])


def test_returned_stack_survives_the_next_push() -> None:
    stacker = FrameStacker(1, 2, (2, 3), np.uint8)
    previous = stacker.reset(_frames(0, 1))
    current = stacker.push(_frames(1, 1), np.zeros(1, dtype=bool))
    assert _steps_of(previous) == [[0, 0]] and _steps_of(current) == [[0, 1]]
    assert not np.shares_memory(previous, current)


def test_wrong_shapes_are_rejected() -> None:
    stacker = FrameStacker(2, 4, (2, 3), np.uint8)
    with pytest.raises(ValueError, match="frames must have shape"):
        stacker.reset(_frames(0, 3))
    stacker.reset(_frames(0, 2))
    with pytest.raises(ValueError, match="first must have shape"):
        stacker.push(_frames(1, 2), np.zeros(3, dtype=bool))


@settings(max_examples=60, deadline=None)
@given(
    stack=st.integers(1, 5),
    firsts=st.lists(st.lists(st.booleans(), min_size=3, max_size=3), min_size=1, max_size=25),
)
def test_matches_a_per_episode_reference(stack: int, firsts: list[list[bool]]) -> None:
    """Each env's stack is the last `stack` frames of its current episode, left-padded with the episode's first."""
    num_envs = 3
    stacker = FrameStacker(num_envs, stack, (2, 3), np.uint8)
    episodes: list[list[int]] = [[0] for _ in range(num_envs)]
    out = stacker.reset(_frames(0, num_envs))
    for t, first in enumerate(firsts, start=1):
        out = stacker.push(_frames(t, num_envs), np.array(first))
        for e in range(num_envs):
            episodes[e] = [t] if first[e] else [*episodes[e], t]
    expected = [([ep[0]] * stack + ep)[-stack:] for ep in episodes]
    assert _steps_of(out) == expected
