"""Q-networks: torsos, dueling head, LSTM core with episode resets (real torch, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from borgdqn.config import NetworkConfig
from borgdqn.rl.envs import EnvSpec
from borgdqn.rl.networks import MLP, DuelingHead, LinearHead, NatureCNN, QNetwork, build_q_network

ATARI = EnvSpec(frame_shape=(84, 84), frame_dtype=np.dtype(np.uint8), num_actions=6, is_image=True)
VECTOR = EnvSpec(frame_shape=(4,), frame_dtype=np.dtype(np.float32), num_actions=2, is_image=False)


def _frames(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("stack", [4, 1])
def test_nature_cnn_shapes(stack: int) -> None:
    net = build_q_network(NetworkConfig(dueling=False), ATARI, stack)
    assert isinstance(net.torso, NatureCNN)
    assert net.torso.convs[0].in_channels == stack
    assert not net.recurrent and net.hidden_size == 0
    q, state = net(_frames(5, stack, 84, 84))
    assert q.shape == (5, 6) and q.dtype == torch.float32
    assert state is None


def test_uint8_frames_are_scaled_inside_the_network() -> None:
    net = build_q_network(NetworkConfig(), ATARI, 4)
    frames = _frames(3, 4, 84, 84)
    with torch.no_grad():
        from_uint8, _ = net(frames)
        from_float, _ = net(frames.float() / 255.0)
        unscaled, _ = net(frames.float())
    torch.testing.assert_close(from_uint8, from_float, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(from_uint8, unscaled)


def test_mlp_flattens_the_stack() -> None:
    net = build_q_network(NetworkConfig(mlp_hidden=[32, 16], dueling=False), VECTOR, 3)
    assert isinstance(net.torso, MLP)
    linears = [m for m in net.torso.layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 32), (32, 16)]
    q, _ = net(torch.randn(7, 3, 4))
    assert q.shape == (7, 2)


def test_torso_auto_follows_the_spec_and_can_be_forced() -> None:
    assert isinstance(build_q_network(NetworkConfig(), ATARI, 4).torso, NatureCNN)
    assert isinstance(build_q_network(NetworkConfig(), VECTOR, 4).torso, MLP)
    small_image = EnvSpec(frame_shape=(6, 6), frame_dtype=np.dtype(np.uint8), num_actions=3, is_image=True)
    forced = build_q_network(NetworkConfig(torso="mlp", mlp_hidden=[8]), small_image, 2)
    assert isinstance(forced.torso, MLP)
    q, _ = forced(_frames(2, 2, 6, 6))
    assert q.shape == (2, 3)


def test_dueling_head_q_minus_v_has_zero_mean_over_actions() -> None:
    net = build_q_network(NetworkConfig(dueling=True), ATARI, 4)
    assert isinstance(net.head, DuelingHead)
    assert isinstance(build_q_network(NetworkConfig(dueling=False), ATARI, 4).head, LinearHead)
    with torch.no_grad():
        # Non-trivial V and A so that the identity is not satisfied by accident.
        net.head.value.bias.fill_(3.0)
        net.head.advantage.bias.copy_(torch.arange(6.0))
        frames = _frames(4, 4, 84, 84)
        q, _ = net(frames)
        features = net.torso(frames)
        value = net.head.value(features)
        advantage = net.head.advantage(features)
    torch.testing.assert_close((q - value).mean(dim=1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(q - value, advantage - advantage.mean(dim=1, keepdim=True), atol=1e-5, rtol=0)
    assert float(value.abs().min()) > 1.0


def _lstm_net(hidden: int = 8) -> QNetwork:
    torch.manual_seed(0)
    return build_q_network(NetworkConfig(lstm=True, lstm_hidden=hidden, mlp_hidden=[16]), VECTOR, 1)


def test_lstm_shapes() -> None:
    net = _lstm_net()
    assert net.recurrent and net.hidden_size == 8
    h, c = net.initial_state(3, "cpu")
    assert h.shape == c.shape == (3, 8) and not h.any()
    q, (h1, c1) = net(torch.randn(3, 5, 1, 4), (h, c), torch.zeros(3, 5, dtype=torch.bool))
    assert q.shape == (3, 5, 2)
    assert h1.shape == c1.shape == (3, 8) and h1.dtype == torch.float32


@torch.no_grad()
def test_lstm_first_resets_the_state() -> None:
    net = _lstm_net()
    obs = torch.randn(2, 6, 1, 4)
    state = (torch.randn(2, 8), torch.randn(2, 8))
    first = torch.zeros(2, 6, dtype=torch.bool)
    first[0, 3] = True  # sequence 0: a new episode starts at step 3; sequence 1 runs on
    q, _ = net(obs, state, first)

    fresh, _ = net(obs[:, 3:], net.initial_state(2), None)
    torch.testing.assert_close(q[0, 3:], fresh[0], rtol=1e-5, atol=1e-6)
    # Without the reset the carried state matters: the same steps give different values.
    carried, _ = net(obs, state, torch.zeros(2, 6, dtype=torch.bool))
    assert not torch.allclose(carried[0, 3:], fresh[0], atol=1e-3)
    torch.testing.assert_close(q[1], carried[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q[0, :3], carried[0, :3], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_lstm_first_at_step_zero_and_step_by_step_agree() -> None:
    net = _lstm_net()
    obs = torch.randn(3, 5, 1, 4)
    state = (torch.randn(3, 8), torch.randn(3, 8))
    first = torch.zeros(3, 5, dtype=torch.bool)
    first[1, 0] = True
    whole, (h_whole, c_whole) = net(obs, state, first)  # one fused LSTM call
    steps = []
    carried = state
    for t in range(5):
        q, carried = net(obs[:, t : t + 1], carried, first[:, t : t + 1])
        steps.append(q)
    torch.testing.assert_close(whole, torch.cat(steps, dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((h_whole, c_whole), carried, rtol=1e-5, atol=1e-6)
    zero_start, _ = net(obs[1:2], net.initial_state(1), None)
    torch.testing.assert_close(whole[1:2], zero_start, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_recurrent_cnn_takes_sequences_of_frames() -> None:
    net = build_q_network(NetworkConfig(lstm=True, lstm_hidden=16), ATARI, 1)
    q, (h, _) = net(_frames(2, 3, 1, 84, 84))
    assert q.shape == (2, 3, 6) and h.shape == (2, 16)
