"""The learner with real torch on the CPU: targets against hand computations, target-network updates, clipping,
real learning on a small MDP, recurrent sequences with burn-in, checkpoints, device and precision choices."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from borgdqn.config import LearnerConfig, NetworkConfig
from borgdqn.memory.protocol import SequenceBatch, TransitionBatch
from borgdqn.rl.device import DeviceError, plan_device, resolve_amp_dtype, select_device
from borgdqn.rl.envs import EnvSpec
from borgdqn.rl.learner import PRIORITY_EPS, R2D2_ETA, Learner, sequence_nstep_targets

VEC2 = EnvSpec(frame_shape=(2,), frame_dtype=np.dtype(np.float32), num_actions=2, is_image=False)
TINY = NetworkConfig(torso="mlp", mlp_hidden=[3], dueling=False)


def _learner(network: NetworkConfig = TINY, spec: EnvSpec = VEC2, stack: int = 1, seed: int = 0, **cfg: Any) -> Learner:
    cfg.setdefault("device", "cpu")
    return Learner(network, LearnerConfig(**cfg), spec, stack, seed=seed)


def _batch(obs: np.ndarray, actions: Any, returns: Any, discounts: Any, next_obs: np.ndarray, weights: Any = None):
    size = len(obs)
    return TransitionBatch(
        obs=np.asarray(obs, dtype=np.float32),
        actions=np.asarray(actions, dtype=np.int64),
        returns=np.asarray(returns, dtype=np.float32),
        discounts=np.asarray(discounts, dtype=np.float32),
        next_obs=np.asarray(next_obs, dtype=np.float32),
        weights=np.ones(size, np.float32) if weights is None else np.asarray(weights, dtype=np.float32),
        keys=np.arange(size, dtype=np.int64),
        agent_ids=np.zeros(size, dtype=np.int32),
        ages=np.zeros(size, dtype=np.int64),
    )


def _random_batch(size: int = 6, seed: int = 1, returns_scale: float = 1.0) -> TransitionBatch:
    rng = np.random.default_rng(seed)
    return _batch(
        rng.normal(size=(size, 1, 2)),
        rng.integers(0, 2, size),
        returns_scale * rng.normal(size=size),
        rng.choice([0.0, 0.5, 0.99**3], size),
        rng.normal(size=(size, 1, 2)),
        rng.uniform(0.2, 1.0, size),
    )


def _params(learner: Learner, which: str = "online") -> list[torch.Tensor]:
    return [p.detach().clone() for p in getattr(learner, which).parameters()]


def _set_mlp(net: torch.nn.Module, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> None:
    with torch.no_grad():
        first, head = net.torso.layers[0], net.head.q
        for param, value in ((first.weight, w1), (first.bias, b1), (head.weight, w2), (head.bias, b2)):
            param.copy_(torch.as_tensor(value, dtype=torch.float32))


def _q(params: tuple[np.ndarray, ...], x: np.ndarray) -> np.ndarray:
    w1, b1, w2, b2 = params
    return np.maximum(x @ w1.T + b1, 0.0) @ w2.T + b2


def _huber(x: np.ndarray, delta: float) -> np.ndarray:
    return np.where(np.abs(x) <= delta, 0.5 * x**2, delta * (np.abs(x) - 0.5 * delta))


# ----------------------------------------------------------------------------------- the DQN update
@pytest.mark.parametrize("double", [True, False])
def test_update_matches_hand_computed_double_dqn(double: bool) -> None:
    rng = np.random.default_rng(7)
    online_w = (rng.normal(size=(3, 2)), rng.normal(size=3), rng.normal(size=(2, 3)), rng.normal(size=2))
    target_w = (rng.normal(size=(3, 2)), rng.normal(size=3), rng.normal(size=(2, 3)), rng.normal(size=2))
    learner = _learner(double=double, huber_delta=3.0, max_grad_norm=None)
    _set_mlp(learner.online, *online_w)
    _set_mlp(learner.target, *target_w)

    obs, next_obs = rng.normal(size=(8, 2)) * 2, rng.normal(size=(8, 2)) * 2
    actions = rng.integers(0, 2, 8)
    returns = rng.normal(size=8)
    discounts = np.array([0.0, 0.5, 0.99**3, 0.9, 0.0, 0.99, 0.25, 0.99**3])  # n-step discounts, used as given
    weights = rng.uniform(0.1, 1.0, 8)
    result = learner.update(_batch(obs[:, None], actions, returns, discounts, next_obs[:, None], weights))

    q_online_next = _q(online_w, next_obs)
    q_target_next = _q(target_w, next_obs)
    if double:
        best = q_online_next.argmax(axis=1)
        # The case must actually distinguish Double DQN from max over the target.
        assert (best != q_target_next.argmax(axis=1)).any()
        next_value = q_target_next[np.arange(8), best]
    else:
        next_value = q_target_next.max(axis=1)
    q = _q(online_w, obs)[np.arange(8), actions]
    td = q - (returns + discounts * next_value)
    assert (np.abs(td) > 3.0).any() and (np.abs(td) < 3.0).any()  # both Huber regions are exercised
    assert result.loss == pytest.approx(float(np.mean(weights * _huber(td, 3.0))), rel=1e-5)
    assert result.mean_q == pytest.approx(float(q.mean()), rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(result.priorities, np.abs(td) + PRIORITY_EPS, rtol=1e-5)
    assert result.priorities.shape == (8,) and result.priorities.dtype == np.float32

    # The gradient that was applied is the gradient of exactly that loss (clipping is off).
    w = [torch.tensor(v, requires_grad=True) for v in online_w]
    x = torch.tensor(obs)
    q_t = (torch.relu(x @ w[0].T + w[1]) @ w[2].T + w[3]).gather(1, torch.tensor(actions)[:, None]).squeeze(1)
    target = torch.tensor(returns + discounts * next_value)
    loss = (torch.tensor(weights) * F.huber_loss(q_t, target, reduction="none", delta=3.0)).mean()
    loss.backward()
    got = [learner.online.torso.layers[0].weight, learner.online.torso.layers[0].bias]
    got += [learner.online.head.q.weight, learner.online.head.q.bias]
    for param, expected in zip(got, w, strict=True):
        np.testing.assert_allclose(param.grad.numpy(), expected.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert result.grad_norm == pytest.approx(float(torch.sqrt(sum((e.grad**2).sum() for e in w))), rel=1e-4)


def test_zero_discount_targets_are_the_returns() -> None:
    learner = _learner()
    rng = np.random.default_rng(3)
    obs = rng.normal(size=(5, 1, 2))
    with torch.no_grad():
        q, _ = learner.online(torch.tensor(obs, dtype=torch.float32))
    actions = np.array([0, 1, 1, 0, 1])
    returns = rng.normal(size=5)
    result = learner.update(_batch(obs, actions, returns, np.zeros(5), rng.normal(size=(5, 1, 2)) * 100))
    expected = np.abs(q.numpy()[np.arange(5), actions] - returns) + PRIORITY_EPS
    np.testing.assert_allclose(result.priorities, expected, rtol=1e-5)


def test_importance_weights_scale_the_loss() -> None:
    batch = _random_batch()
    one, two, masked = _learner(max_grad_norm=None), _learner(max_grad_norm=None), _learner(max_grad_norm=None)
    r1 = one.update(batch)
    doubled = _random_batch()
    doubled.weights = batch.weights * 2
    r2 = two.update(doubled)
    assert r2.loss == pytest.approx(2 * r1.loss, rel=1e-6)
    assert r2.grad_norm == pytest.approx(2 * r1.grad_norm, rel=1e-5)
    for a, b in zip(one.online.parameters(), two.online.parameters(), strict=True):
        torch.testing.assert_close(b.grad, 2 * a.grad, rtol=1e-5, atol=1e-7)

    # A zero weight removes a sample from the gradient, whatever its target.
    zeroed = _random_batch()
    zeroed.weights = batch.weights.copy()
    zeroed.weights[0] = 0.0
    zeroed.returns = batch.returns.copy()
    zeroed.returns[0] += 1000.0
    reference = _random_batch()
    reference.weights = zeroed.weights
    r_ref = _learner(max_grad_norm=None).update(reference)
    r_zero = masked.update(zeroed)
    assert r_zero.loss == pytest.approx(r_ref.loss, rel=1e-6)
    assert r_zero.grad_norm == pytest.approx(r_ref.grad_norm, rel=1e-6)
    assert r_zero.priorities[0] > 900  # its priority still reports its (large) TD error


def test_hard_target_update_every_period() -> None:
    learner = _learner(lr=1e-2, target_update="hard", target_update_period=3)
    start = _params(learner)
    for k in range(1, 7):
        learner.update(_random_batch(seed=k))
        assert learner.updates == k
        target, online = _params(learner, "target"), _params(learner)
        if k < 3:
            expected = start
        elif k % 3 == 0:
            expected = online
            copied = online
        else:
            expected = copied
        for t, e in zip(target, expected, strict=True):
            assert torch.equal(t, e)
        if k % 3:
            assert any(not torch.equal(t, o) for t, o in zip(target, online, strict=True))


def test_soft_target_update_every_step() -> None:
    tau = 0.25
    learner = _learner(lr=1e-2, target_update="soft", tau=tau)
    expected = _params(learner, "target")
    for k in range(4):
        learner.update(_random_batch(seed=k))
        expected = [(1 - tau) * t + tau * o for t, o in zip(expected, _params(learner), strict=True)]
        for t, e in zip(_params(learner, "target"), expected, strict=True):
            torch.testing.assert_close(t, e, rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(t, o) for t, o in zip(_params(learner, "target"), _params(learner), strict=True))


def _grad_norm(learner: Learner) -> float:
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in learner.online.parameters())))


def test_gradient_clipping_caps_the_global_norm() -> None:
    clipped = _learner(max_grad_norm=0.01)
    result = clipped.update(_random_batch(returns_scale=50.0))
    assert result.grad_norm > 0.1  # reported before clipping
    assert _grad_norm(clipped) == pytest.approx(0.01, rel=1e-4)

    free = _learner(max_grad_norm=None)
    result = free.update(_random_batch(returns_scale=50.0))
    assert _grad_norm(free) == pytest.approx(result.grad_norm, rel=1e-5)


def test_learns_the_q_values_of_a_chain() -> None:
    """5-state chain: right moves on, left moves back (state 0 stays); reaching state 4 pays 1 and ends."""
    gamma, states = 0.9, 4
    eye = np.eye(states + 1, dtype=np.float32)
    obs, actions, returns, discounts, next_obs = [], [], [], [], []
    for s in range(states):
        for a, s_next in ((0, max(s - 1, 0)), (1, s + 1)):
            end = s_next == states
            obs.append(eye[s])
            actions.append(a)
            returns.append(1.0 if end else 0.0)
            discounts.append(0.0 if end else gamma)
            next_obs.append(eye[s_next])
    batch = _batch(np.array(obs)[:, None], actions, returns, discounts, np.array(next_obs)[:, None])
    v = gamma ** (states - 1 - np.arange(states))
    expected = np.stack([gamma * v[np.maximum(np.arange(states) - 1, 0)], v], axis=1)

    spec = EnvSpec(frame_shape=(states + 1,), frame_dtype=np.dtype(np.float32), num_actions=2, is_image=False)
    learner = _learner(
        NetworkConfig(torso="mlp", mlp_hidden=[32], dueling=True),
        spec,
        lr=3e-3,
        target_update_period=25,
        gamma=gamma,
        n_step=1,
    )
    for _ in range(600):
        result = learner.update(batch)
    q, _ = learner.act(eye[:states, None])
    np.testing.assert_allclose(q, expected, atol=0.03)
    assert result.priorities.max() < 0.05


# ------------------------------------------------------------------------------------ recurrent
def test_sequence_nstep_targets_by_hand() -> None:
    # One sequence of 9 steps; the episode's last step is 5 (terminated), 6..8 are padding.
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 99.0, 99.0, 99.0, 99.0]])
    last = torch.tensor([[0, 0, 0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    terminated = last.clone()
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    g = 0.5
    returns, discounts, offsets, valid = sequence_nstep_targets(
        rewards, last, terminated, mask, gamma=g, n=3, start=1, length=5
    )
    # Transitions from steps 1..5 (start=1, length=5):
    #   1: r1 + g r2 + g^2 r3, bootstrap from 4 with g^3
    #   2: r2 + g r3 + g^2 r4, bootstrap from 5, which is terminal -> 0
    #   3: r3 + g r4, bootstrap from 5 (episode ends after 2 steps) -> 0
    #   4: r4, bootstrap from 5 -> 0
    #   5: the last step starts no transition
    torch.testing.assert_close(
        returns[0, :4], torch.tensor([2 + g * 3 + g * g * 4, 3 + g * 4 + g * g * 5, 4 + g * 5, 5.0])
    )
    torch.testing.assert_close(discounts[0, :4], torch.tensor([g**3, 0.0, 0.0, 0.0]))
    assert offsets[0, :4].tolist() == [3, 3, 2, 1]
    assert valid[0].tolist() == [True, True, True, True, False]

    # Truncated instead of terminated: the same step is bootstrapped from with gamma^m.
    _, discounts, _, _ = sequence_nstep_targets(
        rewards, last, torch.zeros_like(last), mask, gamma=g, n=3, start=1, length=5
    )
    torch.testing.assert_close(discounts[0, :4], torch.tensor([g**3, g**3, g**2, g]))


VEC4 = EnvSpec(frame_shape=(4,), frame_dtype=np.dtype(np.float32), num_actions=3, is_image=False)
LSTM_NET = NetworkConfig(torso="mlp", mlp_hidden=[16], dueling=True, lstm=True, lstm_hidden=8)


def _sequences(batch: int, length: int, hidden: int = 8, seed: int = 0) -> SequenceBatch:
    rng = np.random.default_rng(seed)
    last = np.zeros((batch, length), bool)
    terminated = np.zeros((batch, length), bool)
    mask = np.ones((batch, length), bool)
    first = np.zeros((batch, length), bool)
    first[0, 0] = True
    if batch > 1:  # sequence 1 ends (terminated) 3 steps before the end; the rest is padding
        last[1, length - 3] = True
        terminated[1, length - 3] = True
        mask[1, length - 2 :] = False
    if batch > 2:  # sequence 2 is truncated 2 steps before the end
        last[2, length - 2] = True
        mask[2, length - 1 :] = False
    return SequenceBatch(
        frames=rng.normal(size=(batch, length, 4)).astype(np.float32),
        actions=rng.integers(0, 3, (batch, length)),
        rewards=rng.normal(size=(batch, length)).astype(np.float32),
        first=first,
        last=last,
        terminated=terminated,
        mask=mask,
        recurrent_state=rng.normal(size=(batch, 2, hidden)).astype(np.float32) * 0.5,
        weights=rng.uniform(0.3, 1.0, batch).astype(np.float32),
        keys=np.arange(batch, dtype=np.int64),
        agent_ids=np.zeros(batch, dtype=np.int32),
        ages=np.zeros(batch, dtype=np.int64),
    )


def test_update_sequences_matches_a_step_by_step_computation() -> None:
    gamma, n, burn, length = 0.9, 3, 2, 5
    learner = _learner(
        LSTM_NET, VEC4, lr=1e-3, gamma=gamma, n_step=n, burn_in=burn, sequence_length=length, max_grad_norm=None
    )
    with torch.no_grad():  # a target that differs from the online network, so Double DQN matters
        for p in learner.target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    b = _sequences(4, burn + length + n)
    state = torch.from_numpy(b.recurrent_state)
    obs = torch.from_numpy(b.frames)[:, :, None]
    first = torch.from_numpy(b.first)
    with torch.no_grad():
        q_on = learner.online(obs, (state[:, 0], state[:, 1]), first)[0].numpy()
        q_tg = learner.target(obs, (state[:, 0], state[:, 1]), first)[0].numpy()
    result = learner.update_sequences(b)

    priorities, per_sequence, qs = [], [], []
    for i in range(4):
        tds, losses = [], []
        for t in range(burn, burn + length):
            if not b.mask[i, t] or b.last[i, t]:
                continue
            ret, m = 0.0, 0
            while True:
                ret += gamma**m * b.rewards[i, t + m]
                m += 1
                if m == n or b.last[i, t + m]:
                    break
            j = t + m
            boot = 0.0 if b.terminated[i, j] else gamma**m * q_tg[i, j, q_on[i, j].argmax()]
            q = q_on[i, t, b.actions[i, t]]
            qs.append(q)
            tds.append(q - (ret + boot))
            losses.append(_huber(np.array(q - (ret + boot)), 1.0))
        td = np.abs(np.array(tds))
        priorities.append(R2D2_ETA * td.max() + (1 - R2D2_ETA) * td.mean())
        per_sequence.append(b.weights[i] * np.mean(losses))
    assert result.priorities.shape == (4,)
    np.testing.assert_allclose(result.priorities, np.array(priorities) + PRIORITY_EPS, rtol=1e-4, atol=1e-6)
    assert result.loss == pytest.approx(float(np.mean(per_sequence)), rel=1e-4)
    assert result.mean_q == pytest.approx(float(np.mean(qs)), rel=1e-4, abs=1e-6)
    assert learner.updates == 1


def test_burn_in_steps_get_no_gradient() -> None:
    burn, length, n = 3, 4, 2
    with_burn = _learner(LSTM_NET, VEC4, burn_in=burn, sequence_length=length, n_step=n, max_grad_norm=None)
    no_burn = _learner(LSTM_NET, VEC4, burn_in=0, sequence_length=length, n_step=n, max_grad_norm=None)
    b = _sequences(4, burn + length + n)
    b.first[:] = False

    # The burn-in learner must train exactly like one that is handed the burned-in state as a constant.
    with torch.no_grad():
        s = torch.from_numpy(b.recurrent_state)
        _, (h, c) = with_burn.online(torch.from_numpy(b.frames[:, :burn, None]), (s[:, 0], s[:, 1]))
    cut = SequenceBatch(
        frames=b.frames[:, burn:],
        actions=b.actions[:, burn:],
        rewards=b.rewards[:, burn:],
        first=b.first[:, burn:],
        last=b.last[:, burn:],
        terminated=b.terminated[:, burn:],
        mask=b.mask[:, burn:],
        recurrent_state=torch.stack([h, c], dim=1).numpy(),
        weights=b.weights,
        keys=b.keys,
        agent_ids=b.agent_ids,
        ages=b.ages,
    )
    r_burn, r_cut = with_burn.update_sequences(b), no_burn.update_sequences(cut)
    assert r_burn.loss == pytest.approx(r_cut.loss, rel=1e-5)
    assert r_burn.grad_norm == pytest.approx(r_cut.grad_norm, rel=1e-4)
    for a, c_ in zip(with_burn.online.parameters(), no_burn.online.parameters(), strict=True):
        torch.testing.assert_close(a.grad, c_.grad, rtol=1e-4, atol=1e-6)

    # Rewards and actions inside the burn-in are not trained on.
    fresh = _learner(LSTM_NET, VEC4, burn_in=burn, sequence_length=length, n_step=n, max_grad_norm=None)
    b.rewards[:, :burn] += 100.0
    b.actions[:, :burn] = (b.actions[:, :burn] + 1) % 3
    assert fresh.update_sequences(b).loss == pytest.approx(r_burn.loss, rel=1e-6)


def test_update_sequences_on_image_frames_without_stack_axis() -> None:
    atari = EnvSpec(frame_shape=(84, 84), frame_dtype=np.dtype(np.uint8), num_actions=4, is_image=True)
    net = NetworkConfig(lstm=True, lstm_hidden=16)
    learner = _learner(net, atari, burn_in=1, sequence_length=2, n_step=1)
    b = _sequences(2, 4, hidden=16)
    b.frames = np.random.default_rng(0).integers(0, 256, (2, 4, 84, 84), dtype=np.uint8)
    b.actions = b.actions % 4
    result = learner.update_sequences(b)
    assert result.priorities.shape == (2,) and np.isfinite(result.priorities).all()
    assert np.isfinite(result.loss) and result.grad_norm > 0


def test_wrong_update_kind_and_short_sequences_are_refused() -> None:
    with pytest.raises(ValueError, match="update_sequences"):
        _learner(LSTM_NET, VEC4).update(_random_batch())
    with pytest.raises(ValueError, match="update\\(TransitionBatch\\)"):
        _learner().update_sequences(_sequences(2, 10))
    with pytest.raises(ValueError, match="burn_in"):
        _learner(LSTM_NET, VEC4, burn_in=4, sequence_length=5, n_step=3).update_sequences(_sequences(4, 11))


# ---------------------------------------------------------------------------------------- acting
def test_act_returns_online_q_values() -> None:
    learner = _learner()
    obs = np.random.default_rng(0).normal(size=(5, 1, 2)).astype(np.float32)
    q, state = learner.act(obs)
    assert state is None and q.shape == (5, 2) and q.dtype == np.float32
    with torch.no_grad():
        np.testing.assert_allclose(q, learner.online(torch.from_numpy(obs))[0].numpy(), rtol=1e-6)


def test_act_carries_and_resets_the_recurrent_state() -> None:
    learner = _learner(LSTM_NET, VEC4)
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(2, 5, 1, 4)).astype(np.float32)
    first = np.zeros((2, 5), bool)
    first[:, 0] = True
    first[1, 3] = True
    state = None
    steps = []
    for t in range(5):
        q, state = learner.act(obs[:, t], state, first[:, t])
        steps.append(q)
    assert state is not None and state[0].shape == (2, 8) and state[0].device == learner.device
    with torch.no_grad():
        whole, _ = learner.online(torch.from_numpy(obs), None, torch.from_numpy(first))
    np.testing.assert_allclose(np.stack(steps, axis=1), whole.numpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_restores_everything() -> None:
    a = _learner(seed=1, lr=1e-2)
    for k in range(5):
        a.update(_random_batch(seed=k))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = _learner(seed=2, lr=1e-2)
    b.load_state_dict(torch.load(buffer, weights_only=True))

    assert b.updates == a.updates == 5
    obs = np.random.default_rng(9).normal(size=(4, 1, 2)).astype(np.float32)
    np.testing.assert_array_equal(b.act(obs)[0], a.act(obs)[0])
    for x, y in zip(_params(a, "target"), _params(b, "target"), strict=True):
        assert torch.equal(x, y)
    for p, q in zip(a.online.parameters(), b.online.parameters(), strict=True):
        for key, value in a.optimizer.state[p].items():
            assert torch.equal(value, b.optimizer.state[q][key]), key
    # Identical state -> identical next update (Adam's moments and step count included).
    ra, rb = a.update(_random_batch(seed=50)), b.update(_random_batch(seed=50))
    assert ra.loss == rb.loss and np.array_equal(ra.priorities, rb.priorities)
    for x, y in zip(_params(a), _params(b), strict=True):
        assert torch.equal(x, y)


def test_online_state_for_actor_is_a_detached_cpu_copy() -> None:
    learner = _learner()
    weights = learner.online_state_for_actor()
    assert set(weights) == set(learner.online.state_dict())
    before = {k: v.clone() for k, v in weights.items()}
    learner.update(_random_batch())
    assert all(v.device.type == "cpu" and not v.requires_grad for v in weights.values())
    assert all(torch.equal(weights[k], before[k]) for k in weights)
    assert any(not torch.equal(weights[k], v) for k, v in learner.online.state_dict().items())


# --------------------------------------------------------------------------------- device, threads
def test_device_selection() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match=r"learner\.device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            select_device("cuda:0")
    cpu = torch.device("cpu")
    assert resolve_amp_dtype("auto", cpu) is None
    assert resolve_amp_dtype("off", cpu) is None
    assert plan_device("cpu", "off").describe() == "device=cpu precision=fp32"


def test_mixed_precision_on_the_cpu_is_bf16_or_a_clear_error() -> None:
    try:
        learner = _learner(NetworkConfig(torso="mlp", mlp_hidden=[16]), mixed_precision="on")
    except DeviceError as err:
        assert "mixed_precision=off" in str(err)
        return
    assert learner.plan.amp_dtype == torch.bfloat16
    result = learner.update(_random_batch())
    assert np.isfinite(result.loss) and result.priorities.dtype == np.float32
    q, _ = learner.act(np.zeros((2, 1, 2), np.float32))
    assert q.dtype == np.float32


def test_threads_are_set_when_given() -> None:
    before = torch.get_num_threads()
    try:
        Learner(TINY, LearnerConfig(device="cpu"), VEC2, 1, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_compiled_learner_matches_eager() -> None:
    eager, compiled = _learner(max_grad_norm=None), _learner(max_grad_norm=None, compile=True)
    for k in range(3):
        batch = _random_batch(seed=k)
        r_eager, r_compiled = eager.update(batch), compiled.update(batch)
        assert r_compiled.loss == pytest.approx(r_eager.loss, rel=1e-4)
        np.testing.assert_allclose(r_compiled.priorities, r_eager.priorities, rtol=1e-4, atol=1e-6)
