"""Q-networks: a torso (Nature CNN or MLP), an optional LSTM core, and a plain or dueling head.

Observations enter as they are stored in the replay memory: uint8 image frames are scaled by 1/255 *inside*
the network, so replay, acting and host->device copies move uint8 tensors (4x less traffic than float32).

Shapes:
    non-recurrent: obs [B, stack, *frame_shape]     -> q [B, A]
    recurrent:     obs [B, T, stack, *frame_shape]  -> q [B, T, A], with the LSTM state (h, c), each [B, hidden],
                   and ``first`` [B, T]: the state is reset to zeros before every step that starts an episode.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import torch
from torch import Tensor, nn

from borgdqn.config import NetworkConfig

logger = logging.getLogger(__name__)

LSTMState = tuple[Tensor, Tensor]


class SpecLike(Protocol):
    """The part of ``borgdqn.rl.envs.EnvSpec`` a network needs (typed structurally: no import of envs)."""

    @property
    def frame_shape(self) -> tuple[int, ...]: ...

    @property
    def is_image(self) -> bool: ...

    @property
    def num_actions(self) -> int: ...


def _to_float(obs: Tensor) -> Tensor:
    # Scaling here (not in the memory) keeps every copy before the first layer in uint8.
    if obs.dtype == torch.uint8:
        return obs.float().mul_(1.0 / 255.0)
    return obs.float()


class NatureCNN(nn.Module):
    """Mnih et al. 2015: conv 32x8x8/4, 64x4x4/2, 64x3x3/1, then a 512-unit FC; stacked frames are channels."""

    def __init__(self, frame_shape: tuple[int, ...], stack: int, features: int = 512) -> None:
        super().__init__()
        if len(frame_shape) not in (2, 3):
            raise ValueError(f"nature_cnn needs frames [H, W] or [C, H, W], got {frame_shape}")
        channels = stack * (frame_shape[0] if len(frame_shape) == 3 else 1)
        height, width = frame_shape[-2:]
        self.in_shape = (channels, height, width)
        self.convs = nn.Sequential(
            nn.Conv2d(channels, 32, 8, stride=4),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 3, stride=1),
            nn.ReLU(inplace=True),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = int(self.convs(torch.zeros(1, *self.in_shape)).shape[1])
        self.fc = nn.Sequential(nn.Linear(flat, features), nn.ReLU(inplace=True))
        self.out_features = features
        # NHWC convolutions are 10-20% faster on oneDNN (CPU) and what cuDNN's bf16 kernels want; Flatten still
        # sees the usual NCHW order, so weights and checkpoints are layout-independent.
        self.convs.to(memory_format=torch.channels_last)

    def forward(self, obs: Tensor) -> Tensor:
        x = obs.reshape(obs.shape[0], *self.in_shape).contiguous(memory_format=torch.channels_last)
        return self.fc(self.convs(_to_float(x)))


class MLP(nn.Module):
    """Fully connected ReLU layers over the flattened stack of vector frames."""

    def __init__(self, frame_shape: tuple[int, ...], stack: int, hidden: list[int]) -> None:
        super().__init__()
        self.in_features = stack * math.prod(frame_shape)
        layers: list[nn.Module] = []
        width = self.in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, obs: Tensor) -> Tensor:
        return self.layers(_to_float(obs.reshape(obs.shape[0], self.in_features)))


class LinearHead(nn.Module):
    def __init__(self, features: int, num_actions: int) -> None:
        super().__init__()
        self.q = nn.Linear(features, num_actions)

    def forward(self, x: Tensor) -> Tensor:
        return self.q(x)


class DuelingHead(nn.Module):
    """Wang et al. 2016: Q = V + A - mean_a A, so V is identifiable and Q - V has zero mean over actions."""

    def __init__(self, features: int, num_actions: int) -> None:
        super().__init__()
        self.value = nn.Linear(features, 1)
        self.advantage = nn.Linear(features, num_actions)

    def forward(self, x: Tensor) -> Tensor:
        adv = self.advantage(x)
        return self.value(x) + adv - adv.mean(dim=-1, keepdim=True)


class QNetwork(nn.Module):
    """torso -> [LSTM] -> head. See the module docstring for shapes."""

    def __init__(
        self, torso: nn.Module, features: int, num_actions: int, *, dueling: bool, lstm_hidden: int | None
    ) -> None:
        super().__init__()
        self.torso = torso
        self.num_actions = num_actions
        self.recurrent = lstm_hidden is not None
        self.hidden_size = lstm_hidden or 0
        self.core: nn.LSTM | None = None
        if lstm_hidden is not None:
            self.core = nn.LSTM(features, lstm_hidden, batch_first=True)
            features = lstm_hidden
        self.head: nn.Module = (DuelingHead if dueling else LinearHead)(features, num_actions)

    def initial_state(self, batch: int, device: torch.device | str | None = None) -> LSTMState:
        zeros = torch.zeros(batch, self.hidden_size, device=device)
        return zeros, zeros.clone()

    def forward(
        self, obs: Tensor, state: LSTMState | None = None, first: Tensor | None = None
    ) -> tuple[Tensor, LSTMState | None]:
        if self.core is None:
            return self.head(self.torso(obs)), None
        batch, steps = obs.shape[:2]
        # The torso has no memory, so all B*T steps go through it as one batch.
        feats = self.torso(obs.reshape(batch * steps, *obs.shape[2:])).reshape(batch, steps, -1)
        h, c = state if state is not None else self.initial_state(batch, obs.device)
        # The core runs in fp32 even under autocast: the state is carried over many steps (and stored in the
        # replay memory as float32), where bf16's 8-bit mantissa would drift.
        with torch.autocast(obs.device.type, enabled=False):
            out, (h1, c1) = self._core(self.core, feats.float(), h.float(), c.float(), first)
        q = self.head(out.reshape(batch * steps, -1)).reshape(batch, steps, self.num_actions)
        return q, (h1, c1)

    def q_step(
        self, obs: Tensor, state: LSTMState | None = None, starts: Tensor | None = None
    ) -> tuple[Tensor, LSTMState | None]:
        """Q-values [E, A] for one step of E environments (``obs`` [E, stack, *frame]). Recurrent: ``state`` is
        the core's state before the step (None: zeros) and ``starts`` [E] the envs whose episode starts at it
        (their state is reset first); returns the state after the step."""
        if self.core is None:
            return self(obs)
        q, new = self(obs.unsqueeze(1), state, None if starts is None else starts.unsqueeze(1))
        return q[:, 0], new

    @staticmethod
    def _core(core: nn.LSTM, feats: Tensor, h: Tensor, c: Tensor, first: Tensor | None) -> tuple[Tensor, LSTMState]:
        if first is None:
            out, (h1, c1) = core(feats, (h.unsqueeze(0), c.unsqueeze(0)))
            return out, (h1.squeeze(0), c1.squeeze(0))
        steps = feats.shape[1]
        keep_all = (~first).to(feats.dtype)
        if steps == 1 or not bool(first[:, 1:].any()):
            # Common case (acting, sequences from an episode's first step): only step 0 may reset, so the whole
            # sequence runs as one fused LSTM call. The .any() costs one host sync on CUDA.
            keep = keep_all[:, :1]
            out, (h1, c1) = core(feats, ((h * keep).unsqueeze(0), (c * keep).unsqueeze(0)))
            return out, (h1.squeeze(0), c1.squeeze(0))
        h0, c0 = h.unsqueeze(0), c.unsqueeze(0)
        outs = []
        for t in range(steps):
            keep = keep_all[:, t : t + 1].unsqueeze(0)
            o, (h0, c0) = core(feats[:, t : t + 1], (h0 * keep, c0 * keep))
            outs.append(o)
        return torch.cat(outs, dim=1), (h0.squeeze(0), c0.squeeze(0))


def build_q_network(config: NetworkConfig, spec: SpecLike, stack: int) -> QNetwork:
    """The Q-network that ``config`` describes for observations of ``stack`` frames of ``spec.frame_shape``."""
    frame_shape = tuple(int(d) for d in spec.frame_shape)
    torso_kind = config.torso if config.torso != "auto" else ("nature_cnn" if spec.is_image else "mlp")
    torso: NatureCNN | MLP
    if torso_kind == "nature_cnn":
        torso = NatureCNN(frame_shape, stack)
    else:
        torso = MLP(frame_shape, stack, list(config.mlp_hidden))
    net = QNetwork(
        torso,
        torso.out_features,
        int(spec.num_actions),
        dueling=config.dueling,
        lstm_hidden=config.lstm_hidden if config.lstm else None,
    )
    logger.debug(
        "q-network torso=%s dueling=%s lstm=%s params=%d",
        torso_kind,
        config.dueling,
        config.lstm,
        sum(p.numel() for p in net.parameters()),
    )
    return net
