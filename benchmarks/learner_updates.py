"""Learner updates per second: borgdqn's Learner vs a plain CleanRL-style update loop, in the same run.

Both do the same work per update: Nature CNN (no dueling), batch 32 of 4 stacked 84x84 uint8 frames, 6 actions,
Double DQN with a target network, Huber loss weighted by importance weights, Adam, gradient clipping at 10, and
the new priorities copied back to the host. The reference is written the straightforward way: batches become
float32 tensors, and each network forward is its own call.

    python benchmarks/learner_updates.py --seconds 10 --threads 2
    python benchmarks/learner_updates.py --device cuda --seconds 10   # adds the CUDA-graph (compile: true) row

Batches are generated once up front, so replay sampling is not measured.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from borgdqn.config import LearnerConfig, NetworkConfig
from borgdqn.memory.protocol import TransitionBatch
from borgdqn.rl.learner import Learner

NUM_ACTIONS = 6
STACK = 4
FRAME = (84, 84)


@dataclass(frozen=True)
class Spec:
    frame_shape: tuple[int, ...] = FRAME
    is_image: bool = True
    num_actions: int = NUM_ACTIONS


def make_batches(count: int, batch: int, seed: int = 0) -> list[TransitionBatch]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        out.append(
            TransitionBatch(
                obs=rng.integers(0, 256, (batch, STACK, *FRAME), dtype=np.uint8),
                actions=rng.integers(0, NUM_ACTIONS, batch).astype(np.int64),
                returns=rng.normal(size=batch).astype(np.float32),
                discounts=np.full(batch, 0.99**3, dtype=np.float32),
                next_obs=rng.integers(0, 256, (batch, STACK, *FRAME), dtype=np.uint8),
                weights=rng.uniform(0.5, 1.0, batch).astype(np.float32),
                keys=np.arange(batch, dtype=np.int64),
                agent_ids=np.zeros(batch, dtype=np.int32),
                ages=np.zeros(batch, dtype=np.int64),
            )
        )
    return out


# ------------------------------------------------------------------------------ the plain reference loop
class ReferenceQNetwork(nn.Module):
    """CleanRL dqn_atari.py's QNetwork."""

    def __init__(self, num_actions: int) -> None:
        super().__init__()
        self.network = nn.Sequential(
            nn.Conv2d(STACK, 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3136, 512),
            nn.ReLU(),
            nn.Linear(512, num_actions),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x / 255.0)


def reference_updater(device: torch.device) -> Callable[[TransitionBatch], None]:
    q_network = ReferenceQNetwork(NUM_ACTIONS).to(device)
    target_network = ReferenceQNetwork(NUM_ACTIONS).to(device)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(q_network.parameters(), lr=1e-4, eps=1.5e-4)
    step = 0

    def update(batch: TransitionBatch) -> None:
        nonlocal step
        obs = torch.tensor(batch.obs, dtype=torch.float32, device=device)
        next_obs = torch.tensor(batch.next_obs, dtype=torch.float32, device=device)
        actions = torch.tensor(batch.actions, device=device)
        returns = torch.tensor(batch.returns, device=device)
        discounts = torch.tensor(batch.discounts, device=device)
        weights = torch.tensor(batch.weights, device=device)
        with torch.no_grad():
            next_actions = q_network(next_obs).argmax(dim=1)
            next_q = target_network(next_obs).gather(1, next_actions.unsqueeze(1)).squeeze(1)
            td_target = returns + discounts * next_q
        old_val = q_network(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
        loss = (weights * F.smooth_l1_loss(old_val, td_target, reduction="none")).mean()
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(q_network.parameters(), 10.0)
        optimizer.step()
        _ = loss.item(), (old_val - td_target).abs().detach().cpu().numpy() + 1e-6
        step += 1
        if step % 2000 == 0:
            target_network.load_state_dict(q_network.state_dict())

    return update


def ours_updater(device: torch.device, *, compile: bool) -> Callable[[TransitionBatch], None]:
    learner = Learner(
        NetworkConfig(torso="nature_cnn", dueling=False),
        LearnerConfig(device=str(device), compile=compile, max_grad_norm=10.0),
        Spec(),
        STACK,
    )

    def update(batch: TransitionBatch) -> None:
        learner.update(batch)

    return update


# ------------------------------------------------------------------------------------------- measuring
def measure(update: Callable[[TransitionBatch], None], batches: list[TransitionBatch], seconds: float) -> float:
    count = 0
    start = time.perf_counter()
    while True:
        update(batches[count % len(batches)])
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per variant (all rounds)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="variants alternate this many times (fairer on busy hosts)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="also measure compile: true on the CPU")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured updates per variant first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "learner_updates: --device cuda but torch.cuda.is_available() is False on this machine; "
            "no GPU figures recorded (run it on a GPU host)",
            file=sys.stderr,
        )
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    batches = make_batches(8, args.batch)

    variants: dict[str, Callable[[TransitionBatch], None]] = {
        "reference (CleanRL-style)": reference_updater(device),
        "borgdqn Learner": ours_updater(device, compile=False),
    }
    if args.device == "cuda":
        variants["borgdqn Learner, compile (CUDA graph)"] = ours_updater(device, compile=True)
    elif args.compile:
        variants["borgdqn Learner, compile"] = ours_updater(device, compile=True)
    for update in variants.values():
        for i in range(args.warmup):
            update(batches[i % len(batches)])

    counts = {name: 0.0 for name in variants}
    per_round = args.seconds / args.rounds
    for _ in range(args.rounds):
        for name, update in variants.items():
            counts[name] += measure(update, batches, per_round) * per_round
    rates = {name: counts[name] / args.seconds for name in variants}

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
    print(
        f"learner updates/s — Nature CNN, batch {args.batch}, stack {STACK}, 84x84 uint8, "
        f"Double DQN, {NUM_ACTIONS} actions"
    )
    print(f"device: {where}; torch {torch.__version__}; {args.seconds:g} s per variant in {args.rounds} rounds\n")
    reference = rates["reference (CleanRL-style)"]
    width = max(len(name) for name in rates)
    print(f"| {'variant':<{width}} | updates/s | vs reference |")
    print(f"| {'-' * width} | ---------:| ------------:|")
    for name, rate in rates.items():
        print(f"| {name:<{width}} | {rate:9.1f} | {rate / reference:11.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
