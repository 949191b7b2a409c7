"""Frame stacks for E environment streams, built exactly as the replay memory rebuilds them.

A stack holds the ``stack`` newest frames of an episode, oldest first. Before an episode's first frame the stack
repeats that first frame (the memory pads sampled stacks the same way, so the network sees identical inputs when
acting and when learning).
"""

from __future__ import annotations

import numpy as np


class FrameStacker:
    """Keeps ``[E, stack, *frame_shape]`` stacks up to date from single frames.

    The arrays returned by ``reset`` and ``push`` are views of two internal buffers used in turn: a returned
    stack stays valid through the next ``push`` (so the previous and the current stacks can be held at once)
    and is overwritten by the one after. Copy it to keep it longer. ``push`` allocates nothing stack-sized.
    """

    def __init__(self, num_envs: int, stack: int, frame_shape: tuple[int, ...], dtype: np.dtype | type) -> None:
        if num_envs < 1 or stack < 1:
            raise ValueError(f"num_envs and stack must be >= 1, got {num_envs} and {stack}")
        self.num_envs = num_envs
        self.stack = stack
        self.frame_shape = tuple(frame_shape)
        self.dtype = np.dtype(dtype)
        shape = (num_envs, stack, *self.frame_shape)
        self._buffers = (np.zeros(shape, self.dtype), np.zeros(shape, self.dtype))
        self._current = 0

    def _check(self, frames: np.ndarray) -> None:
        if frames.shape != (self.num_envs, *self.frame_shape):
            raise ValueError(f"frames must have shape {(self.num_envs, *self.frame_shape)}, got {frames.shape}")

    def reset(self, frames: np.ndarray) -> np.ndarray:
        """Start every stream anew: each stack is its first frame repeated ``stack`` times."""
        self._check(frames)
        self._current ^= 1
        out = self._buffers[self._current]
        out[:] = frames[:, None]
        return out

    def push(self, frames: np.ndarray, first: np.ndarray) -> np.ndarray:
        """Append the newest frame of each stream; streams with ``first[e]`` start over with that frame."""
        self._check(frames)
        first = np.asarray(first, dtype=bool)
        if first.shape != (self.num_envs,):
            raise ValueError(f"first must have shape ({self.num_envs},), got {first.shape}")
        previous = self._buffers[self._current]
        self._current ^= 1
        out = self._buffers[self._current]
        # Writing into the other buffer shifts without numpy's temporary copy for overlapping slices.
        out[:, :-1] = previous[:, 1:]
        out[:, -1] = frames
        if first.any():
            starts = np.flatnonzero(first)
            out[starts] = frames[starts, None]
        return out
