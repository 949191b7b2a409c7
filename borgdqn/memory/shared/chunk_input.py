"""What a chunk must be to enter the ring, and the ring's own form of it (int32 actions, float32 rewards, flag
bits): every check runs before a slot is reserved, so hostile or buggy input never reaches the pool."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from borgdqn.memory.protocol import TrajectoryChunk
from borgdqn.memory.sampling_rules import FIRST, LAST, SEQUENCE_KEY, TERMINATED
from borgdqn.memory.shared.layout import SegmentParams

_INT32 = np.iinfo(np.int32)


class Prepared(NamedTuple):
    length: int
    stream: int
    agent: int
    frames: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    flags: np.ndarray
    state: np.ndarray | None


def prepare_chunk(chunk: TrajectoryChunk, params: SegmentParams) -> Prepared:
    """Check ``chunk`` against a memory of ``params``; raises ValueError naming the first thing wrong."""
    frame_dtype = np.dtype(params.frame_dtype)
    chunk.validate(tuple(params.frame_shape), frame_dtype)
    t = len(chunk)
    if t > params.capacity:
        raise ValueError(f"chunk of {t} steps does not fit in a memory of {params.capacity}")
    stream = _as_int(chunk.stream_id, "stream_id", 0, SEQUENCE_KEY)
    agent = _as_int(chunk.agent_id, "agent_id", 0, params.max_agents)
    actions = np.asarray(chunk.actions)
    if actions.dtype.kind not in "iu":
        raise ValueError(f"actions must be integers, got {actions.dtype}")
    actions32 = actions.astype(np.int32)
    # The cast is exact iff every action fits: one comparison instead of min and max (uint64 against
    # int32 would compare as float64, so that type keeps the explicit bound).
    if (actions.max() > _INT32.max) if actions.dtype == np.uint64 else (actions32 != actions).any():
        raise ValueError("action outside the int32 range")
    rewards = np.asarray(chunk.rewards)
    if rewards.dtype.kind != "f":
        raise ValueError(f"rewards must be floats, got {rewards.dtype}")
    rewards32 = rewards.astype(np.float32)
    # validate() saw finite rewards; only a wider float can overflow on the way to float32.
    if rewards.dtype.itemsize > 4 and not np.isfinite(rewards32).all():
        raise ValueError("reward does not fit float32")
    first = _as_flags(chunk.first, "first")
    last = _as_flags(chunk.last, "last")
    terminated = _as_flags(chunk.terminated, "terminated")
    # Records follow dm_env: the step after a last step is the first of the next episode, nothing else.
    if (first[1:] != last[:-1]).any():
        raise ValueError("a step starts an episode iff the step before it is last")
    if frame_dtype.kind == "f" and not np.isfinite(chunk.frames).all():
        raise ValueError("non-finite frame values")
    state = None
    if chunk.recurrent_state is not None:
        hidden = params.recurrent_hidden
        if hidden is None:
            raise ValueError("chunk carries a recurrent_state but the memory has no recurrent_hidden")
        state = np.asarray(chunk.recurrent_state)
        if state.shape != (2, hidden) or state.dtype.kind != "f" or not np.isfinite(state).all():
            raise ValueError(f"recurrent_state must be finite floats of shape (2, {hidden}), got {state.shape}")
    # Each flag shifted into its bit directly in uint8 (fewer, smaller temporaries than bool * int).
    flags = np.left_shift(last, LAST.bit_length() - 1, dtype=np.uint8)
    flags |= np.left_shift(terminated, TERMINATED.bit_length() - 1, dtype=np.uint8)
    flags |= np.left_shift(first, FIRST.bit_length() - 1, dtype=np.uint8)
    return Prepared(t, stream, agent, chunk.frames, actions32, rewards32, flags, state)


def _as_int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{what} must be an integer, got {type(value).__name__}")
    if not lo <= int(value) < hi:
        raise ValueError(f"{what} {int(value)} outside [{lo}, {hi})")
    return int(value)


def _as_flags(value: Any, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind in "iu" and np.all((arr == 0) | (arr == 1)):
        return arr.astype(bool)
    raise ValueError(f"{what} must be bool, got {arr.dtype}")
