"""The replay oracle: frames that encode (stream, step), streams that know their episodes, and checks of every
sampled transition and sequence against them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from borgdqn.memory.protocol import SamplingSpec, SequenceBatch, TrajectoryChunk, TransitionBatch
from borgdqn.memory.sampling_rules import SEQUENCE_KEY

GAMMA = 0.9


# ------------------------------------------------------------------------------------------------ oracle
@dataclass(frozen=True)
class Codec:
    """Frames that carry (stream, step index) and a checksum of both in every other value."""

    shape: tuple[int, ...]
    dtype: str

    def encode(self, sid: int | np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Frames ``[len(idx), *shape]`` for steps ``idx`` of stream(s) ``sid``."""
        size = int(np.prod(self.shape))
        idx = np.asarray(idx, dtype=np.int64).ravel()
        sids = np.broadcast_to(np.asarray(sid, dtype=np.int64).ravel(), idx.shape)[:, None]
        flat = np.zeros((idx.size, size), dtype=self.dtype)
        if self.dtype == "float32":
            flat[:, 0] = sids[:, 0]
            flat[:, 1] = idx
            flat[:, 2:] = sids * 1000 + idx[:, None] + 0.5 * np.arange(size - 2)
        else:
            flat[:, 0:4] = sids.astype("<u4").view(np.uint8)
            flat[:, 4:8] = idx.astype("<u4").view(np.uint8).reshape(-1, 4)
            flat[:, 8:] = (sids * 31 + idx[:, None] * 7 + np.arange(size - 8)) % 251
        return flat.reshape(idx.size, *self.shape)

    def decode(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lead = frames.shape[: frames.ndim - len(self.shape)]
        flat = frames.reshape(*lead, -1)
        if self.dtype == "float32":
            return flat[..., 0].astype(np.int64), flat[..., 1].astype(np.int64)
        head = np.ascontiguousarray(flat[..., :8]).view("<u4")
        return head[..., 0].astype(np.int64), head[..., 1].astype(np.int64)

    def intact(self, frames: np.ndarray) -> np.ndarray:
        """Per frame: every value is what (stream, index) in its head say it must be."""
        sid, idx = self.decode(frames)
        expected = self.encode(sid, idx).reshape(*sid.shape, -1)
        return (frames.reshape(*sid.shape, -1) == expected).all(axis=-1)


F32 = Codec((4,), "float32")  # CartPole-like vectors
U8 = Codec((84, 84), "uint8")  # Atari frames
U8_SMALL = Codec((16, 16), "uint8")  # the same byte layout, cheaper for the many-process tests


@dataclass
class Stream:
    """One environment stream: its episodes (first/last/terminated per step), rewards and actions."""

    sid: int
    agent: int
    first: np.ndarray
    last: np.ndarray
    terminated: np.ndarray
    rewards: np.ndarray
    actions: np.ndarray = field(init=False)
    episode_first: np.ndarray = field(init=False)
    episode_last: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = self.first.size
        self.actions = (self.sid * 7 + np.arange(n)) % 5
        starts = np.maximum.accumulate(np.where(self.first, np.arange(n), 0))
        self.episode_first = starts
        ends = np.where(self.last, np.arange(n), 10**9)
        self.episode_last = np.minimum.accumulate(ends[::-1])[::-1]

    @classmethod
    def from_episodes(
        cls, sid: int, agent: int, lengths: list[int], terminated: list[bool], rewards: list[float] | None = None
    ) -> Stream:
        """Episodes of ``lengths`` steps; ``terminated[i]`` tells how episode i ended. A trailing length
        without an entry in ``terminated`` is an episode still running."""
        first, last, term = [], [], []
        for e, length in enumerate(lengths):
            ends = e < len(terminated)
            for i in range(length):
                first.append(i == 0)
                last.append(ends and i == length - 1)
                term.append(ends and i == length - 1 and terminated[e])
        n = len(first)
        r = np.array(rewards, np.float32) if rewards is not None else ((sid * 13 + np.arange(n) * 7) % 11 - 5) / 4
        return cls(sid, agent, np.array(first), np.array(last), np.array(term), np.asarray(r, np.float32))

    @classmethod
    def random(cls, sid: int, agent: int, total: int, max_episode: int = 40) -> Stream:
        rng = np.random.default_rng(sid)
        lengths: list[int] = []
        while sum(lengths) < total:
            lengths.append(int(rng.integers(2, max_episode)))
        lengths[-1] -= sum(lengths) - total
        ends = [bool(t) for t in rng.random(len(lengths) - 1) < 0.5]
        if lengths[-1] < 1:
            lengths.pop()
        return cls.from_episodes(sid, agent, lengths, ends)

    def __len__(self) -> int:
        return int(self.first.size)

    def chunk(self, start: int, stop: int, codec: Codec, state: bool = False) -> TrajectoryChunk:
        idx = np.arange(start, stop)
        return TrajectoryChunk(
            stream_id=self.sid,
            agent_id=self.agent,
            frames=codec.encode(self.sid, idx),
            actions=self.actions[start:stop].copy(),
            rewards=self.rewards[start:stop].copy(),
            first=self.first[start:stop].copy(),
            last=self.last[start:stop].copy(),
            terminated=self.terminated[start:stop].copy(),
            policy_ids=np.zeros(stop - start, np.uint8),
            recurrent_state=self.state_at(start) if state else None,
        )

    def state_at(self, start: int) -> np.ndarray:
        return np.full((2, 3), self.sid * 1000 + start, np.float32)

    def stack(self, t: int, stack: int) -> list[int]:
        """Indexes of the frames the agent's FrameStacker shows at step t."""
        return [max(t - k, int(self.episode_first[t])) for k in range(stack - 1, -1, -1)]

    def transition(self, t: int, n: int, stack: int, gamma: float) -> tuple[list[int], int, float, float, list[int]]:
        assert not self.last[t], f"stream {self.sid}: step {t} is a last step and was sampled as a start"
        m = n
        for j in range(1, n + 1):
            if self.last[t + j]:
                m = j
                break
        ret = sum(gamma**k * float(self.rewards[t + k]) for k in range(m))
        disc = 0.0 if self.terminated[t + m] else gamma**m
        return self.stack(t, stack), m, ret, disc, self.stack(t + m, stack)


def draw(memory: Any, batch_size: int, n: int, gamma: float, stack: int, beta: float) -> TransitionBatch:
    """A batch drawn with this sampling spec: a learner gives its memory one spec, these tests vary it."""
    getattr(memory, "replica", memory).spec = SamplingSpec(n_step=n, gamma=gamma, stack=stack)
    return memory.sample(batch_size, beta)


def draw_sequences(memory: Any, batch_size: int, length: int, stack: int, beta: float) -> SequenceBatch:
    """Sequences of ``length`` steps (stacks of ``stack``) drawn with that sampling spec."""
    getattr(memory, "replica", memory).spec = SamplingSpec(stack=stack, sequence_length=length)
    return memory.sample_sequences(batch_size, beta)


def check_transitions(
    batch: TransitionBatch,
    streams: dict[int, Stream],
    codec: Codec,
    n: int,
    stack: int,
    written: dict[int, int] | None = None,
) -> list[tuple[int, int]]:
    """Assert every row against the oracle; returns the (stream, start) of each row."""
    b = batch.actions.shape[0]
    assert batch.obs.shape == (b, stack, *codec.shape) == batch.next_obs.shape
    assert batch.obs.dtype == np.dtype(codec.dtype)
    assert batch.actions.dtype == np.int64 and batch.keys.dtype == np.int64 and batch.agent_ids.dtype == np.int32
    assert batch.ages.dtype == np.int64 and batch.ages.shape == (b,) and (batch.ages >= 0).all()
    assert batch.returns.dtype == batch.discounts.dtype == batch.weights.dtype == np.float32
    assert codec.intact(batch.obs).all() and codec.intact(batch.next_obs).all(), "torn or corrupt frame"
    obs_sid, obs_idx = codec.decode(batch.obs)
    next_sid, next_idx = codec.decode(batch.next_obs)
    starts = []
    for row in range(b):
        sid, t = int(obs_sid[row, -1]), int(obs_idx[row, -1])
        s = streams[sid]
        exp_obs, m, ret, disc, exp_next = s.transition(t, n, stack, GAMMA)
        where = f"row {row}: stream {sid} start {t}"
        assert (obs_sid[row] == sid).all() and (next_sid[row] == sid).all(), f"{where}: frames of another stream"
        assert obs_idx[row].tolist() == exp_obs, f"{where}: obs {obs_idx[row].tolist()} != {exp_obs}"
        assert next_idx[row].tolist() == exp_next, f"{where}: next_obs {next_idx[row].tolist()} != {exp_next}"
        assert batch.actions[row] == s.actions[t], where
        assert batch.agent_ids[row] == s.agent, where
        assert math.isclose(batch.returns[row], ret, rel_tol=1e-5, abs_tol=1e-5), f"{where}: R {batch.returns[row]}"
        assert math.isclose(batch.discounts[row], disc, rel_tol=1e-6, abs_tol=1e-7), f"{where}: d {batch.discounts}"
        if written is not None:
            assert t + m < written[sid], f"{where}: uses step {t + m}, not written yet"
        starts.append((sid, t))
    return starts


def check_sequences(
    batch: SequenceBatch,
    streams: dict[int, Stream],
    codec: Codec,
    length: int,
    stack: int,
    written: dict[int, tuple[int, int]],
) -> list[tuple[int, int]]:
    """Assert every row against the oracle. ``written[sid]``: (steps of the stream written before the call,
    steps written after it) - equal unless a writer is running."""
    b = batch.actions.shape[0]
    frame_dims = (stack, *codec.shape) if stack > 1 else codec.shape
    assert batch.frames.shape == (b, length, *frame_dims)
    for name in ("actions", "rewards", "first", "last", "terminated", "mask"):
        assert getattr(batch, name).shape == (b, length), name
    assert batch.recurrent_state.shape == (b, 2, 3) and batch.recurrent_state.dtype == np.float32
    assert (batch.keys & SEQUENCE_KEY != 0).all()
    assert batch.ages.dtype == np.int64 and batch.ages.shape == (b,) and (batch.ages >= 0).all()
    newest = batch.frames[:, :, -1] if stack > 1 else batch.frames
    sids, idxs = codec.decode(newest[:, 0])
    starts = []
    for row in range(b):
        sid, start = int(sids[row]), int(idxs[row])
        s = streams[sid]
        where = f"row {row}: stream {sid} start {start}"
        np.testing.assert_array_equal(batch.recurrent_state[row], s.state_at(start), err_msg=where)
        assert batch.agent_ids[row] == s.agent
        assert (np.diff(batch.mask[row].astype(int)) <= 0).all(), f"{where}: mask is not a prefix"
        before, after = written[sid]
        for j in range(length):
            t = start + j
            if t > s.episode_last[start] or t >= after:
                assert not batch.mask[row, j], f"{where}: step {t} is not in the episode or not written"
            elif t < before:
                assert batch.mask[row, j], f"{where}: step {t} of the episode is stored but masked"
            frames = batch.frames[row, j]
            if batch.mask[row, j]:
                got_sid, got_idx = codec.decode(frames.reshape(-1, *codec.shape))
                assert (got_sid == sid).all() and got_idx.tolist() == s.stack(t, stack), f"{where}: frames at {j}"
                assert codec.intact(frames.reshape(-1, *codec.shape)).all()
                assert (batch.first[row, j], batch.last[row, j], batch.terminated[row, j]) == (
                    s.first[t],
                    s.last[t],
                    s.terminated[t],
                ), f"{where}: flags at {j}"
                assert batch.actions[row, j] == s.actions[t] and batch.rewards[row, j] == s.rewards[t]
            else:
                assert not frames.any(), f"{where}: padding at {j} is not zero"
                assert batch.actions[row, j] == 0 and batch.rewards[row, j] == 0
                assert not (batch.first[row, j] or batch.last[row, j] or batch.terminated[row, j])
        starts.append((sid, start))
    return starts

