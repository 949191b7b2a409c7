"""Run directories written the way a hive writes them (real MetricsWriter files), for the plotting tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from borgdqn.metrics import MetricsWriter, agent_metrics_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(
    run_dir: Path,
    *,
    agents: int = 2,
    episodes: int = 30,
    policies: tuple[str, ...] = ("random", "epsilon_greedy"),
    train: bool = True,
    wall: bool = True,
    seed: int = 0,
) -> Path:
    """A small run: each agent plays ``episodes`` episodes of 100 steps, cycling through ``policies``."""
    rng = np.random.default_rng(seed)
    for agent in range(agents):
        writer = MetricsWriter(agent_metrics_path(run_dir, agent))
        for k in range(episodes):
            extra = {"wall": k + agent / agents} if wall else {}
            writer.write(
                "episode", agent=agent, env_steps=100 * (k + 1), episode=k + 1,
                **{"return": float(k + rng.normal())}, length=100, policy=policies[k % len(policies)],
                epsilon=0.1, **extra,
            )  # fmt: skip
            if train and k % 5 == 4:
                writer.write(
                    "train", agent=agent, env_steps=100 * (k + 1), updates=25 * (k + 1), loss=1.0 / (k + 1),
                    mean_q=0.1 * k, env_steps_per_s=1000.0, updates_per_s=250.0, epsilon=0.1, **extra,
                )  # fmt: skip
        writer.close()
    return run_dir
