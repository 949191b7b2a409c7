"""The learner: Double DQN with n-step returns, prioritized-replay weights, and (optionally) an LSTM trained on
replayed sequences with burn-in (R2D2).

One update, read top to bottom (``_td_step``):
    q        = Q_online(obs)[a]
    a*       = argmax_a Q_online(next_obs)            (Double DQN; plain DQN: max of the target)
    target   = returns + discounts * Q_target(next_obs)[a*]
    loss     = mean(weights * huber(q - target))
    Adam step on the loss, gradients clipped to max_grad_norm; priorities = |q - target|
    target network: hard copy every target_update_period updates, or Polyak-averaged (tau) every update.

The replay memory computes ``returns`` (sum of gamma^k r) and ``discounts`` (gamma^m, 0 at terminals) for
transitions; for sequences the learner computes the same inside each sequence (``sequence_nstep_targets``).

Speed notes. Batches cross to the device as uint8 (the network scales them), through reused pinned buffers on
CUDA. Everything an update reports travels back in one device->host copy. On CUDA with ``compile: true`` the
whole non-recurrent update (forwards, backward, clipping, Adam) is captured once as a CUDA graph and replayed,
which removes the per-kernel launch cost that dominates small DQN networks; the capture is checked against an
eager update on the same batch and, if they disagree or capture fails, the learner warns and stays eager.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from borgdqn.config import LearnerConfig, NetworkConfig
from borgdqn.memory.protocol import SequenceBatch, TransitionBatch
from borgdqn.rl.device import autocast, configure_backend, plan_device
from borgdqn.rl.networks import LSTMState, QNetwork, SpecLike, build_q_network

logger = logging.getLogger(__name__)

PRIORITY_EPS = 1e-6  # keeps every sampled item drawable again even when its TD error is exactly zero
R2D2_ETA = 0.9  # sequence priority = eta * max|td| + (1 - eta) * mean|td| (Kapturowski et al. 2019)


@dataclass
class UpdateResult:
    loss: float
    mean_q: float  # mean Q(s, a) of the trained (valid) steps
    grad_norm: float  # global gradient norm before clipping
    priorities: np.ndarray  # [B] float32 new priorities: |TD| + eps (per sequence for recurrent batches)


class _HostToDevice:
    """numpy -> device tensors. Zero-copy on CPU; on CUDA via reused pinned buffers and async copies.

    A pinned buffer is reused on the next call with the same name; that is safe because every caller ends with a
    blocking device->host copy, which waits for the earlier host->device copies on the same stream.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: dict[str, Tensor] = {}

    def __call__(self, name: str, array: np.ndarray, out: Tensor | None = None) -> Tensor:
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:  # torch warns on read-only memory (e.g. shared-memory views)
            array = array.copy()
        host = torch.from_numpy(array)
        if self.device.type != "cuda":
            return host if out is None else out.copy_(host)
        buf = self._pinned.get(name)
        if buf is None or buf.shape != host.shape or buf.dtype != host.dtype:
            buf = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
            self._pinned[name] = buf
        buf.copy_(host)
        if out is not None:
            return out.copy_(buf, non_blocking=True)
        return buf.to(self.device, non_blocking=True)


def sequence_nstep_targets(
    rewards: Tensor,
    last: Tensor,
    terminated: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    n: int,
    start: int,
    length: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """n-step returns for the transitions that start at steps ``start .. start+length-1`` of [B, L] sequences.

    Returns (returns, discounts, offsets, valid), each [B, length]: the transition from step i sums
    gamma^k r_{i+k} for k < m and bootstraps from step i+m with discount gamma^m (0 when step i+m is a
    terminated last step), where m = ``offsets`` is n or fewer when the episode's last step comes first.
    ``valid`` is False where step i is padding or an episode's last step (neither starts a transition).
    """
    batch, steps = rewards.shape
    if steps < start + length + n:
        raise ValueError(f"sequences of {steps} steps cannot hold start {start} + length {length} + n {n}")
    device = rewards.device
    end = start + length
    ret = torch.zeros(batch, length, device=device)
    off = torch.full((batch, length), n, dtype=torch.long, device=device)
    done = torch.zeros(batch, length, dtype=torch.bool, device=device)
    for k in range(n):
        step_reward = rewards[:, start + k : end + k].float()
        ret = ret + torch.where(done, 0.0, (gamma**k) * step_reward)
        reaches_last = last[:, start + k + 1 : end + k + 1]
        off = torch.where(reaches_last & ~done, k + 1, off)
        done = done | reaches_last
    boot_index = torch.arange(start, end, device=device).unsqueeze(0) + off
    boot_terminal = terminated.gather(1, boot_index)
    discounts = torch.where(boot_terminal, 0.0, torch.pow(gamma, off.float()))
    valid = mask[:, start:end] & ~last[:, start:end] & mask.gather(1, boot_index)
    return ret, discounts, off, valid


class Learner:
    """Online and target Q-networks, Adam, and the DQN update. See the module docstring for the algorithm."""

    def __init__(
        self,
        network: NetworkConfig,
        learner: LearnerConfig,
        spec: SpecLike,
        stack: int,
        *,
        seed: int = 0,
        threads: int | None = None,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.config = learner
        self.network_config = network
        self.stack = stack
        self._frame_ndim = len(spec.frame_shape)
        self.plan = plan_device(learner.device, learner.mixed_precision)
        self.device = self.plan.device
        configure_backend(self.device)

        # A private RNG for the initial weights: same seed -> same network, without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            online = build_q_network(network, spec, stack)
        self.online: QNetwork = online.to(self.device)
        self.target: QNetwork = copy.deepcopy(self.online).requires_grad_(False)
        self.recurrent = self.online.recurrent
        self.num_actions = int(spec.num_actions)

        on_cuda = self.device.type == "cuda"
        self._use_graph = on_cuda and learner.compile and not self.recurrent
        self.optimizer = torch.optim.Adam(
            self.online.parameters(),
            lr=learner.lr,
            eps=learner.adam_eps,
            # fused: one vectorised pass over the weights (CPU and CUDA) instead of ~10 elementwise passes;
            # capturable: the step count stays on the device so that the step can live inside a CUDA graph.
            fused=True,
            capturable=self._use_graph,
        )
        self._params: list[Tensor] = list(self.online.parameters())
        self._target_params: list[Tensor] = list(self.target.parameters())
        self._online_fwd: Callable[..., Any] = self.online
        self._target_fwd: Callable[..., Any] = self.target
        if learner.compile:
            # Inductor's default mode: it fuses the pointwise ops around the convolutions and compiles in
            # ~10-40 s on a CPU, where max-autotune would benchmark kernels for minutes in every agent process.
            # CUDA graphs come from our own whole-update capture, which also covers the backward pass and Adam.
            # On a CPU the gain measured small (convolutions dominate), hence compile defaults to off.
            self._online_fwd = torch.compile(self.online, dynamic=False)
            self._target_fwd = torch.compile(self.target, dynamic=False)
        self._to_device = _HostToDevice(self.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_inputs: dict[str, Tensor] = {}
        self._graph_output: Tensor | None = None
        self.updates = 0
        logger.info(
            "learner %s compile=%s cuda_graph=%s recurrent=%s params=%d",
            self.plan.describe(),
            learner.compile,
            self._use_graph,
            self.recurrent,
            sum(p.numel() for p in self._params),
        )

    # ------------------------------------------------------------------------------------------ updates
    def update(self, batch: TransitionBatch) -> UpdateResult:
        """One gradient update on n-step transitions (non-recurrent networks)."""
        if self.recurrent:
            raise ValueError("this learner's network is recurrent: use update_sequences(SequenceBatch)")
        arrays = {
            "obs": batch.obs,
            "actions": np.asarray(batch.actions, dtype=np.int64),
            "returns": np.asarray(batch.returns, dtype=np.float32),
            "discounts": np.asarray(batch.discounts, dtype=np.float32),
            "next_obs": batch.next_obs,
            "weights": np.asarray(batch.weights, dtype=np.float32),
        }
        if self._use_graph:
            stats = self._graph_update(arrays)
        else:
            inputs = {name: self._to_device(name, value) for name, value in arrays.items()}
            self.optimizer.zero_grad(set_to_none=True)
            stats = self._td_step(inputs)
        self._after_step()
        return self._result(stats.to("cpu"))

    def _td_step(self, batch: dict[str, Tensor], *, cache: bool = True) -> Tensor:
        """Forward, loss, backward, clip, Adam. Returns [loss, mean_q, grad_norm, |td|_1..B] on the device."""
        cfg = self.config
        obs, actions, next_obs = batch["obs"], batch["actions"], batch["next_obs"]
        returns, discounts, weights = batch["returns"], batch["discounts"], batch["weights"]
        with autocast(self.device, self.plan.amp_dtype, cache_enabled=cache):
            q_all, _ = self._online_fwd(obs)
        q = q_all.float().gather(1, actions.unsqueeze(1)).squeeze(1)
        with torch.no_grad(), autocast(self.device, self.plan.amp_dtype, cache_enabled=cache):
            next_target, _ = self._target_fwd(next_obs)
            if cfg.double:
                next_online, _ = self._online_fwd(next_obs)
                best = next_online.argmax(dim=1, keepdim=True)
                next_value = next_target.float().gather(1, best).squeeze(1)
            else:
                next_value = next_target.float().max(dim=1).values
            target = returns + discounts * next_value
        td = q - target
        loss = (weights * F.huber_loss(q, target, reduction="none", delta=cfg.huber_delta)).mean()
        loss.backward()
        grad_norm = self._clip_and_step()
        return torch.cat([loss.detach().view(1), q.detach().mean().view(1), grad_norm.view(1), td.detach().abs()])

    def update_sequences(self, batch: SequenceBatch) -> UpdateResult:
        """One gradient update on replayed sequences (recurrent networks), R2D2 style.

        The first ``burn_in`` steps only warm up the LSTM state (no gradient, no loss) from the stored state;
        the next ``sequence_length`` steps are trained with n-step Double DQN targets computed inside the
        sequence; the last ``n_step`` steps only provide bootstrap values. Longer sequences are cut.
        """
        if not self.recurrent:
            raise ValueError("this learner's network is not recurrent: use update(TransitionBatch)")
        cfg = self.config
        burn, length, n = cfg.burn_in, cfg.sequence_length, cfg.n_step
        need = burn + length + n
        steps = batch.actions.shape[1]
        if steps < need:
            raise ValueError(f"sequences have {steps} steps; burn_in + sequence_length + n_step = {need} are needed")
        cut = slice(0, need)
        dev = self._to_device
        frames = dev("seq_frames", batch.frames[:, cut])
        if frames.dim() == 2 + self._frame_ndim:  # single frames (stacking off): add the stack axis
            frames = frames.unsqueeze(2)
        actions = dev("seq_actions", np.asarray(batch.actions[:, cut], dtype=np.int64))
        rewards = dev("seq_rewards", np.asarray(batch.rewards[:, cut], dtype=np.float32))
        first = dev("seq_first", np.asarray(batch.first[:, cut], dtype=bool))
        last = dev("seq_last", np.asarray(batch.last[:, cut], dtype=bool))
        terminated = dev("seq_terminated", np.asarray(batch.terminated[:, cut], dtype=bool))
        mask = dev("seq_mask", np.asarray(batch.mask[:, cut], dtype=bool))
        stored = dev("seq_state", np.asarray(batch.recurrent_state, dtype=np.float32))
        weights = dev("seq_weights", np.asarray(batch.weights, dtype=np.float32))
        state: LSTMState = (stored[:, 0], stored[:, 1])

        self.optimizer.zero_grad(set_to_none=True)
        amp = self.plan.amp_dtype
        with torch.no_grad(), autocast(self.device, amp):
            online_state, target_state = state, state
            if burn:
                _, online_state = self._online_fwd(frames[:, :burn], state, first[:, :burn])
                _, target_state = self._target_fwd(frames[:, :burn], state, first[:, :burn])
            q_target_seq, _ = self._target_fwd(frames[:, burn:], target_state, first[:, burn:])
        with autocast(self.device, amp):
            # The state after burn-in is a constant here: no gradient flows into the burn-in steps.
            q_seq, _ = self._online_fwd(frames[:, burn:], online_state, first[:, burn:])
        q_seq = q_seq.float()
        with torch.no_grad():
            if cfg.double:
                best = q_seq.detach().argmax(dim=-1, keepdim=True)
                boot = q_target_seq.float().gather(-1, best).squeeze(-1)
            else:
                boot = q_target_seq.float().max(dim=-1).values
            returns, discounts, offsets, valid = sequence_nstep_targets(
                rewards, last, terminated, mask, gamma=cfg.gamma, n=n, start=burn, length=length
            )
            boot_at = torch.arange(length, device=self.device).unsqueeze(0) + offsets
            target = returns + discounts * boot.gather(1, boot_at)
            # Padding and last steps carry meaningless actions; any in-range index will do, they are masked.
            trained_actions = torch.where(valid, actions[:, burn : burn + length], 0).clamp_(0, self.num_actions - 1)
        q = q_seq[:, :length].gather(-1, trained_actions.unsqueeze(-1)).squeeze(-1)
        td = q - target
        count = valid.sum(dim=1).clamp(min=1).float()
        per_step = torch.where(valid, F.huber_loss(q, target, reduction="none", delta=cfg.huber_delta), 0.0)
        loss = (weights * per_step.sum(dim=1) / count).mean()
        loss.backward()
        grad_norm = self._clip_and_step()
        with torch.no_grad():
            abs_td = torch.where(valid, td.detach().abs(), 0.0)
            priority = R2D2_ETA * abs_td.max(dim=1).values + (1.0 - R2D2_ETA) * abs_td.sum(dim=1) / count
            mean_q = torch.where(valid, q.detach(), 0.0).sum() / valid.sum().clamp(min=1)
            stats = torch.cat([loss.detach().view(1), mean_q.view(1), grad_norm.view(1), priority])
        self._after_step()
        return self._result(stats.to("cpu"))

    def _clip_and_step(self) -> Tensor:
        # With clipping off the norm is still computed for reporting; max_norm=inf scales by exactly 1.
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
        grad_norm = nn.utils.clip_grad_norm_(self._params, max_norm)
        self.optimizer.step()
        return grad_norm.float()

    @torch.no_grad()
    def _after_step(self) -> None:
        self.updates += 1
        cfg = self.config
        if cfg.target_update == "soft":
            torch._foreach_lerp_(self._target_params, self._params, cfg.tau)
        elif self.updates % cfg.target_update_period == 0:
            torch._foreach_copy_(self._target_params, self._params)

    @staticmethod
    def _result(stats: Tensor) -> UpdateResult:
        values = stats.numpy()
        return UpdateResult(
            loss=float(values[0]),
            mean_q=float(values[1]),
            grad_norm=float(values[2]),
            priorities=(values[3:] + PRIORITY_EPS).astype(np.float32),
        )

    # ---------------------------------------------------------------------------------- CUDA graph path
    def _graph_update(self, arrays: dict[str, np.ndarray]) -> Tensor:
        if self._graph is None:
            inputs = {name: self._to_device(name, value) for name, value in arrays.items()}
            output = self._capture(inputs)
            if output is not None:
                return output
            # Capture failed or disagreed with eager: _capture restored the weights; continue eagerly.
            self.optimizer.zero_grad(set_to_none=True)
            return self._td_step(inputs)
        for name, value in arrays.items():
            static = self._graph_inputs[name]
            if static.shape != value.shape:
                raise ValueError(f"{name} has shape {value.shape}; the captured update expects {tuple(static.shape)}")
            self._to_device(name, value, out=static)
        self._graph.replay()
        assert self._graph_output is not None
        return self._graph_output

    def _capture(self, inputs: dict[str, Tensor]) -> Tensor | None:
        """Capture the update as a CUDA graph and run it once on ``inputs``; None (and eager from now on) if the
        capture fails or its result differs from an eager update on the same batch."""
        before = self._snapshot()
        try:
            static = {name: value.clone() for name, value in inputs.items()}
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                # Warm-up (cuDNN algorithm search, compilation, allocator, Adam's lazily created state) on a side
                # stream, as capture requires. The first warm-up step is the eager reference for the self-check.
                self.optimizer.zero_grad(set_to_none=True)
                self._td_step(static, cache=False)
                params_eager = [p.detach().clone() for p in self._params]
                for _ in range(2):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._td_step(static, cache=False)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._restore(before)

            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                output = self._td_step(static, cache=False)
            graph.replay()
            lr = self.learning_rate
            worst = max(float((p - e).abs().max()) for p, e in zip(self._params, params_eager, strict=True))
            moved = max(float((p - b).abs().max()) for p, b in zip(self._params, before[0], strict=True))
            if worst > 0.1 * lr or moved == 0.0:
                raise RuntimeError(f"graph update differs from eager (max diff {worst:.3g}, lr {lr:g})")
        except Exception as err:  # any capture problem: warn and keep training eagerly
            logger.warning("cuda_graph=off reason=%r; continuing with eager updates", str(err).splitlines()[0])
            self._restore(before)
            self._use_graph = False
            self._graph = None
            return None
        self._graph, self._graph_inputs, self._graph_output = graph, static, output
        logger.info("cuda_graph=on captured the update (batch %d)", int(inputs["actions"].shape[0]))
        return output

    def _snapshot(self) -> tuple[list[Tensor], dict[Tensor, dict[str, Tensor]]]:
        params = [p.detach().clone() for p in self._params]
        state: dict[Tensor, dict[str, Tensor]] = {
            p: {k: v.clone() for k, v in self.optimizer.state[p].items() if isinstance(v, Tensor)}
            for p in self._params
            if p in self.optimizer.state
        }
        return params, state

    @torch.no_grad()
    def _restore(self, snapshot: tuple[list[Tensor], dict[Tensor, dict[str, Tensor]]]) -> None:
        """Put weights and Adam's state back *in place*, so that the tensors a graph captured stay valid; Adam
        state created since the snapshot is zeroed (= fresh)."""
        params, state = snapshot
        for p, saved in zip(self._params, params, strict=True):
            p.copy_(saved)
        for p in self._params:
            saved_state = state.get(p, {})
            for key, value in self.optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    if key in saved_state:
                        value.copy_(saved_state[key])
                    else:
                        value.zero_()

    # ------------------------------------------------------------------------------------------- acting
    @torch.no_grad()
    def act(
        self,
        obs: np.ndarray,
        state: LSTMState | None = None,
        first: np.ndarray | None = None,
        *,
        network: QNetwork | None = None,
    ) -> tuple[np.ndarray, LSTMState | None]:
        """Q-values [E, A] (float32 numpy) of the online network for one step of E environments.

        Recurrent: ``obs`` is [E, stack, *frame] for one step and ``state`` the LSTM state (h, c) before it, each
        [E, hidden] on ``self.device`` (None = zeros, as ``online.initial_state``); ``first`` [E] marks the
        environments whose episode starts at this step, whose state is reset to zeros first. Returns the state
        after the step, on the device (no host copy while acting). A chunk's ``recurrent_state`` is the state
        *given* to its first step, stacked as [2, hidden]. ``network``: another copy of the online network to act
        with (a concurrent agent's actor), on this learner's device.
        """
        net = self.online if network is None else network
        x = self._to_device("act_obs", obs)
        starts = None
        if self.recurrent and first is not None:
            starts = self._to_device("act_first", np.asarray(first, dtype=bool))
        with autocast(self.device, self.plan.amp_dtype):
            q, new = net.q_step(x, state, starts)
        return q.float().cpu().numpy(), new

    # ------------------------------------------------------------------------------------- checkpoints
    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_learning_rate(self, lr: float) -> None:
        """Train with ``lr`` from the next update on (assimilation's adopted and perturbed rate)."""
        if not lr > 0.0:
            raise ValueError(f"learning rate {lr!r} must be > 0")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._graph = None  # a captured update baked the old rate in

    def state_dict(self) -> dict[str, Any]:
        """Online and target weights, Adam's state and ``updates`` (live tensors, as torch's state_dict)."""
        return {
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.online.load_state_dict(d["online"])
        self.target.load_state_dict(d["target"])
        # Keep this learner's own Adam settings (fused/capturable suit this device; lr and eps come from the
        # current config) and take only the moments and step counts from the checkpoint.
        saved = d["optimizer"]
        ours = self.optimizer.param_groups
        groups = [
            {**g, **{k: v for k, v in mine.items() if k != "params"}}
            for g, mine in zip(saved["param_groups"], ours, strict=True)
        ]
        self.optimizer.load_state_dict({"state": saved["state"], "param_groups": groups})
        self.updates = int(d["updates"])
        # Adam's state tensors were replaced, so a captured graph would point at stale ones: capture again.
        self._graph = None
        self._use_graph = self.device.type == "cuda" and self.config.compile and not self.recurrent

    def online_state_for_actor(self) -> dict[str, Tensor]:
        """A CPU copy of the online weights only (for evaluation actors); detached from training."""
        return {name: value.detach().to("cpu", copy=True) for name, value in self.online.state_dict().items()}
