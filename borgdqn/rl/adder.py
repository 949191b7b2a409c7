"""The adder: turns an agent's vectorised steps into trajectory chunks for the replay memory (as Acme's adders).

Each environment of the agent is one stream; its steps are buffered and written as a chunk of ``chunk_length``
consecutive steps. Frames are written once per step; the memory links a stream's chunks so that frame stacks and
n-step windows can cross chunk boundaries.
"""

from __future__ import annotations

import numpy as np

from borgdqn.memory.protocol import ReplayMemory, TrajectoryChunk

# Stream ids must be unique over the memory: an agent owns STREAMS_PER_AGENT ids from its stream base (agent i of
# a hive: i * STREAMS_PER_AGENT; see borgdqn.rl.identity), and its env e writes stream base + e.
STREAMS_PER_AGENT = 1024


class ChunkAdder:
    """Buffers ``num_envs`` streams of steps and adds a chunk per stream every ``chunk_length`` steps."""

    def __init__(
        self,
        memory: ReplayMemory,
        *,
        agent: int,
        stream_base: int,
        num_envs: int,
        chunk_length: int,
        frame_shape: tuple[int, ...],
        frame_dtype: np.dtype,
        recurrent_hidden: int | None = None,
    ) -> None:
        if num_envs > STREAMS_PER_AGENT:
            raise ValueError(f"env.num_envs must be <= {STREAMS_PER_AGENT}")
        self._memory = memory
        self._agent = agent
        self._stream_base = stream_base
        self._t = chunk_length
        e = num_envs
        self._frames = np.zeros((e, chunk_length, *frame_shape), dtype=frame_dtype)
        self._actions = np.zeros((e, chunk_length), dtype=np.int64)
        self._rewards = np.zeros((e, chunk_length), dtype=np.float32)
        self._first = np.zeros((e, chunk_length), dtype=bool)
        self._last = np.zeros((e, chunk_length), dtype=bool)
        self._terminated = np.zeros((e, chunk_length), dtype=bool)
        self._policy = np.zeros((e, chunk_length), dtype=np.uint8)
        self._state = np.zeros((e, 2, recurrent_hidden), dtype=np.float32) if recurrent_hidden is not None else None
        # All streams advance in lock step (one vector env), so one cursor serves them all.
        self._cursor = 0

    def add_step(
        self,
        frames: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        first: np.ndarray,
        last: np.ndarray,
        terminated: np.ndarray,
        policy_ids: np.ndarray,
        recurrent_state: np.ndarray | None = None,
    ) -> None:
        """One step of every env: record t = (frame of o_t, a_t, r_t, first_t, last_t, terminated_t).

        ``recurrent_state`` ([E, 2, hidden]) is the core's state before o_t; only the chunk's first is kept.
        """
        i = self._cursor
        if i == 0 and self._state is not None:
            if recurrent_state is None:
                raise ValueError("a recurrent adder needs the recurrent state at each chunk start")
            self._state[:] = recurrent_state
        self._frames[:, i] = frames
        self._actions[:, i] = actions
        self._rewards[:, i] = rewards
        self._first[:, i] = first
        self._last[:, i] = last
        self._terminated[:, i] = terminated
        self._policy[:, i] = policy_ids
        self._cursor += 1
        if self._cursor == self._t:
            self.flush()

    def flush(self) -> None:
        """Write the buffered (possibly partial) chunk of every stream."""
        n = self._cursor
        if n == 0:
            return
        for env in range(self._frames.shape[0]):
            # Copies: the buffers are reused for the next chunk while a backend may keep references.
            self._memory.add(
                TrajectoryChunk(
                    stream_id=self._stream_base + env,
                    agent_id=self._agent,
                    frames=self._frames[env, :n].copy(),
                    actions=self._actions[env, :n].copy(),
                    rewards=self._rewards[env, :n].copy(),
                    first=self._first[env, :n].copy(),
                    last=self._last[env, :n].copy(),
                    terminated=self._terminated[env, :n].copy(),
                    policy_ids=self._policy[env, :n].copy(),
                    recurrent_state=None if self._state is None else self._state[env].copy(),
                )
            )
        self._cursor = 0
