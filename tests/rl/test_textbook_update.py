"""Our update is the textbook update, end to end: a trajectory goes through our adder into our shared replay
memory, a batch comes out, and our learner's loss, priorities and gradients on it equal a plain n-step (Double)
DQN update written here from the raw rewards, CleanRL-style, on the same weights: with and without the
memory's importance weights, for DQN and Double DQN, for n = 1 and 3.

The pieces have their own tests (the n-step rule by hand in tests/memory/test_replay_shared.py, the update on
given returns in tests/rl/test_learner.py); this one joins them, so a convention that drifts between memory and
learner (which reward belongs to which step, where a terminal or a truncation stops the window, which discount a
bootstrap gets) fails.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from borgdqn.config import LearnerConfig, NetworkConfig
from borgdqn.memory.protocol import SamplingSpec
from borgdqn.memory.shared.replay import SharedReplay
from borgdqn.rl.adder import ChunkAdder
from borgdqn.rl.envs import EnvSpec
from borgdqn.rl.learner import PRIORITY_EPS, Learner

GAMMA = 0.97
STEPS = 240
SPEC = EnvSpec(frame_shape=(3,), frame_dtype=np.dtype(np.float32), num_actions=3, is_image=False)
NETWORK = NetworkConfig(torso="mlp", mlp_hidden=[16], dueling=True)


def trajectory(seed: int) -> dict[str, np.ndarray]:
    """One env's steps: episodes of 3-20 steps, each ending terminated or truncated; frame[0] is the step's index
    (so that a sampled row says which step it is), the rest noise. r_t is the reward of a_t; an episode's last
    step carries its final observation (its action and reward are never learned from)."""
    rng = np.random.default_rng(seed)
    first = np.zeros(STEPS, bool)
    last = np.zeros(STEPS, bool)
    terminated = np.zeros(STEPS, bool)
    t = 0
    while t < STEPS:
        length = int(rng.integers(3, 21))
        end = min(t + length, STEPS) - 1
        first[t], last[end] = True, True
        terminated[end] = bool(rng.random() < 0.6)
        t = end + 1
    frames = np.concatenate([np.arange(STEPS, dtype=np.float32)[:, None] / STEPS,
                             rng.normal(size=(STEPS, 2)).astype(np.float32)], axis=1)
    rewards = rng.normal(size=STEPS).astype(np.float32)
    return {"frames": frames, "actions": rng.integers(0, 3, STEPS), "rewards": rewards, "first": first, "last": last,
            "terminated": terminated}


@pytest.fixture(params=[False, True], ids=["uniform", "prioritized"])
def replay(request: pytest.FixtureRequest) -> Iterator[tuple[SharedReplay, bool]]:
    made = SharedReplay.create(1024, SPEC.frame_shape, SPEC.frame_dtype, prioritized=request.param, alpha=0.6,
                               priority_eps=1e-6, seed=3)  # fmt: skip
    try:
        yield made, request.param
    finally:
        made.close()
        made.unlink()


def textbook_targets(steps: np.ndarray, traj: dict[str, np.ndarray], n: int, online: torch.nn.Module,
                     target: torch.nn.Module, double: bool) -> torch.Tensor:  # fmt: skip
    """y_t = sum_{k<m} gamma^k r_{t+k} + gamma^m (1 - done) Q_target(s_{t+m}, a*), m = min(n, steps to the episode's
    last step), done = that last step is terminated; a* = argmax Q_online (Double DQN) or of Q_target (DQN)."""
    ys = []
    for t in steps:
        end = t
        while not traj["last"][end]:
            end += 1
        m = min(n, end - t)
        g = sum(GAMMA**k * float(traj["rewards"][t + k]) for k in range(m))
        done = bool(traj["terminated"][t + m]) and t + m == end
        s_next = torch.tensor(traj["frames"][t + m][None, None])
        with torch.no_grad():
            q_target = target(s_next)[0][0]
            best = int((online(s_next)[0][0] if double else q_target).argmax())
            bootstrap = 0.0 if done else GAMMA**m * float(q_target[best])
        ys.append(g + bootstrap)
    return torch.tensor(ys, dtype=torch.float32)


@pytest.mark.parametrize("double", [True, False], ids=["double", "dqn"])
@pytest.mark.parametrize("n", [1, 3])
def test_our_memory_and_learner_make_the_textbook_update(replay: tuple[SharedReplay, bool], double: bool,
                                                         n: int) -> None:  # fmt: skip
    memory, prioritized = replay
    traj = trajectory(seed=n + 2 * double)
    adder = ChunkAdder(memory, agent=0, stream_base=0, num_envs=1, chunk_length=7, frame_shape=SPEC.frame_shape,
                       frame_dtype=SPEC.frame_dtype)  # fmt: skip
    for t in range(STEPS):
        adder.add_step(traj["frames"][t][None], traj["actions"][t:t + 1], traj["rewards"][t:t + 1],
                       traj["first"][t:t + 1], traj["last"][t:t + 1], traj["terminated"][t:t + 1],
                       np.zeros(1, np.int32))  # fmt: skip
    adder.flush()
    memory.spec = SamplingSpec(n_step=n, gamma=GAMMA, stack=1)
    if prioritized:  # uneven priorities, so that the importance weights differ from 1
        warm = memory.sample(64, 0.4)
        memory.update_priorities(warm.keys, np.random.default_rng(1).uniform(0.01, 5.0, 64))
    batch = memory.sample(64, 0.4)
    steps = np.rint(batch.obs[:, -1, 0] * STEPS).astype(int)
    assert not traj["last"][steps].any(), "an episode's last step is never a start"
    weights = batch.weights if prioritized else np.ones(64, np.float32)
    if prioritized:
        assert weights.min() < 0.9, "the importance weights must matter here"
    assert (batch.weights == weights).all()

    learner = Learner(NETWORK, LearnerConfig(device="cpu", double=double, huber_delta=1.0, max_grad_norm=None,
                                             lr=1e-3, n_step=n, gamma=GAMMA), SPEC, 1, seed=5)  # fmt: skip
    with torch.no_grad():  # a target network that differs from the online one
        for param in learner.target.parameters():
            param.add_(0.3 * torch.randn_like(param))
    online, target = copy.deepcopy(learner.online), copy.deepcopy(learner.target)

    # The textbook update, written from the raw trajectory.
    y = textbook_targets(steps, traj, n, online, target, double)
    obs = torch.tensor(traj["frames"][steps][:, None])
    q = online(obs)[0].gather(1, torch.tensor(traj["actions"][steps])[:, None]).squeeze(1)
    loss = (torch.tensor(weights) * F.huber_loss(q, y, reduction="none", delta=1.0)).mean()
    loss.backward()

    result = learner.update(batch)
    assert result.loss == pytest.approx(float(loss.detach()), rel=1e-5)
    np.testing.assert_allclose(result.priorities, (q - y).abs().detach().numpy() + PRIORITY_EPS, rtol=1e-4,
                               atol=1e-6)  # fmt: skip
    for ours, theirs in zip(learner.online.parameters(), online.parameters(), strict=True):
        assert ours.grad is not None and theirs.grad is not None
        np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), rtol=1e-4, atol=1e-6)
    # The batch covered what makes n-step targets differ: windows cut by a terminal and by a truncation.
    ends = [min(n, next(e for e in range(t, STEPS) if traj["last"][e]) - t) for t in steps]
    if n > 1:
        assert min(ends) < n, "no window was cut short by an episode's end"
