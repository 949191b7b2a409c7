"""The replay memory's small interface, shared by the embedded (shared-memory) and the Redis backends.

Agents write *trajectories*, not transitions: a chunk holds T consecutive steps of one environment stream, each
step with the newest frame of its observation only. The memory rebuilds frame stacks and n-step transitions at
sample time, so a frame is stored once however many stacks and transitions it belongs to.

Step semantics (one record per observation, as in dm_env's TimeStep):
    record t = (frame of o_t, a_t, r_t, first_t, last_t, terminated_t)
``a_t`` is the action taken on o_t and ``r_t`` the (learning) reward that followed it. A ``last`` step is the
final observation of an episode: its action and reward are meaningless (the env resets on the next call), and it
is never the start of a transition. ``terminated`` is set on last steps whose episode really ended (bootstrap
with 0); a last step that is not terminated was truncated (time limit) and its observation is bootstrapped from.

Sample ages (``ages`` of a batch; averaged into ``TrainingReport.replay_sample_age``): a sampled step's age is the
number of steps added to the memory after it, by the memory's own insertion counter (hive-wide: the embedded
memory's sequence numbers, the Redis memory's ``inserted`` count, which takes a chunk in when its writer stores it),
at the time of the draw; the newest step has age 0. A sequence's age is that of its first step, where its burn-in
begins: the memory is not told the burn-in, and the Redis memory knows when a chunk's own steps were added, not when
the later chunks a sequence runs into were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


class MemoryNotReady(RuntimeError):
    """The memory cannot serve a batch right now (too few valid starts yet, or its server is away): act on and
    try again later."""


@dataclass
class TrajectoryChunk:
    """T consecutive steps of one environment stream (one env of one agent).

    ``stream_id`` must be unique per environment stream across the whole hive (e.g. agent * 1024 + env index)
    and stay the same for the stream's life, so that the memory can link consecutive chunks of a stream.
    """

    stream_id: int
    agent_id: int
    frames: np.ndarray  # [T, *frame_shape], uint8 for images, float32 for vector observations
    actions: np.ndarray  # [T] integer
    rewards: np.ndarray  # [T] float32, already clipped if the config asks for it
    first: np.ndarray  # [T] bool: step starts an episode
    last: np.ndarray  # [T] bool: step is the final observation of an episode
    terminated: np.ndarray  # [T] bool: last and really terminal (not truncated)
    policy_ids: np.ndarray | None = None  # [T] uint8, index of the acting policy (provenance)
    # LSTM: the core's (h, c) *before* frames[0], shape [2, hidden]; enables sequence sampling from this chunk.
    recurrent_state: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def validate(self, frame_shape: tuple[int, ...], dtype: np.dtype) -> None:
        """Raise ValueError naming the first inconsistency (hostile or buggy input never enters the pool)."""
        t = len(self)
        if t == 0:
            raise ValueError("empty chunk")
        if tuple(self.frames.shape[1:]) != tuple(frame_shape):
            raise ValueError(f"frame shape {tuple(self.frames.shape[1:])} != memory's {tuple(frame_shape)}")
        if self.frames.dtype != dtype:
            raise ValueError(f"frame dtype {self.frames.dtype} != memory's {dtype}")
        for name in ("actions", "rewards", "first", "last", "terminated"):
            arr = getattr(self, name)
            if arr.shape != (t,):
                raise ValueError(f"{name} has shape {arr.shape}, expected ({t},)")
        if self.policy_ids is not None and self.policy_ids.shape != (t,):
            raise ValueError(f"policy_ids has shape {self.policy_ids.shape}, expected ({t},)")
        if np.any(self.terminated & ~self.last):
            raise ValueError("terminated set on a step that is not last")
        if not np.all(np.isfinite(self.rewards)):
            raise ValueError("non-finite reward")


@dataclass(frozen=True)
class SamplingSpec:
    """How a learner samples: given to its memory once (its settings do not change from batch to batch).

    ``n_step`` and ``gamma`` make n-step returns, ``stack`` frame stacks (1: single frames),
    ``sequence_length`` the steps of a sampled LSTM sequence (burn-in + learned steps + n; 0: no sequences).
    """

    n_step: int = 1
    gamma: float = 0.99
    stack: int = 1
    sequence_length: int = 0

    def __post_init__(self) -> None:
        if self.n_step < 1 or self.stack < 1 or not 0.0 < self.gamma <= 1.0 or self.sequence_length < 0:
            raise ValueError(f"need n_step, stack >= 1, 0 < gamma <= 1 and sequence_length >= 0; got {self}")


@dataclass
class TransitionBatch:
    """n-step transitions: obs_t, a_t, R = sum_k gamma^k r_{t+k}, discount = gamma^m (0 if terminal), obs_{t+m}.

    ``m <= n`` is shorter where the episode ends first. ``obs`` and ``next_obs`` are frame stacks
    ``[B, stack, *frame_shape]``; before an episode's first frame the stack repeats that first frame.
    """

    obs: np.ndarray
    actions: np.ndarray  # [B] int64
    returns: np.ndarray  # [B] float32
    discounts: np.ndarray  # [B] float32
    next_obs: np.ndarray
    weights: np.ndarray  # [B] float32 importance-sampling weights (max-normalised; ones when uniform)
    keys: np.ndarray  # [B] int64 handles for update_priorities
    agent_ids: np.ndarray  # [B] int32 provenance of each sampled step
    ages: np.ndarray  # [B] int64 steps added to the memory after the start step (see the module docstring)


@dataclass
class SequenceBatch:
    """Sequences for a recurrent learner, each starting at a chunk start where the recurrent state was stored.

    Length L = burn_in + sequence_length + n_step. Steps after an episode's last step are padding
    (``mask`` False). Frames are single frames ``[B, L, *frame_shape]`` (stacking is usually off with an LSTM;
    when it is on, ``frames`` holds stacks ``[B, L, stack, *frame_shape]``).
    """

    frames: np.ndarray
    actions: np.ndarray  # [B, L] int64
    rewards: np.ndarray  # [B, L] float32
    first: np.ndarray  # [B, L] bool
    last: np.ndarray  # [B, L] bool
    terminated: np.ndarray  # [B, L] bool
    mask: np.ndarray  # [B, L] bool: real step of the sequence's episode
    recurrent_state: np.ndarray  # [B, 2, hidden] float32, state before frames[:, 0]
    weights: np.ndarray  # [B] float32
    keys: np.ndarray  # [B] int64
    agent_ids: np.ndarray  # [B] int32
    ages: np.ndarray  # [B] int64 age of each sequence's first step, frames[:, 0] (see the module docstring)


@dataclass
class MemoryStats:
    size: int  # steps stored now
    capacity: int
    inserted: int  # steps ever added
    sampled: int  # transitions/sequences ever sampled
    rejected: int  # chunks refused as malformed
    per_agent: dict[int, int] = field(default_factory=dict)  # steps stored now, by agent

    @property
    def fill(self) -> float:
        return self.size / self.capacity if self.capacity else 0.0


@runtime_checkable
class ReplayMemory(Protocol):
    """What agents and learners need from a replay memory; every backend implements exactly this. The memory
    samples by the ``SamplingSpec`` its owner gave it when it opened the memory."""

    def add(self, chunk: TrajectoryChunk) -> None:
        """Store a chunk (oldest steps are evicted first). A malformed chunk is counted in ``rejected``."""

    def sample(self, batch_size: int, beta: float) -> TransitionBatch:
        """Draw n-step transitions (prioritized when the memory is), never across an episode end."""
        ...

    def sample_sequences(self, batch_size: int, beta: float) -> SequenceBatch:
        """Draw sequences of the spec's ``sequence_length`` steps that start where a recurrent state was stored."""
        ...

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        """Set new priorities (e.g. |TD error|) for sampled keys; stale keys (evicted since) are ignored."""

    def stats(self) -> MemoryStats: ...

    def close(self) -> None: ...
