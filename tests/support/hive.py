"""Small hive configs and the CLI, as the hive tests run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def small_config(out: Path, steps: int, **extra: object) -> dict:
    overrides = {
        "hive.out": str(out),
        "hive.steps": steps,
        "hive.report_every_s": 0.2,
        "hive.live": "off",
        "learner.learning_starts": 200,
        "learner.batch_size": 32,
        "learner.target_update_period": 50,
        "replay.capacity": 5000,
        "policy.epsilon.steps": 1000,
        "network.mlp_hidden": [32, 32],
    }
    overrides.update(extra)  # type: ignore[arg-type]
    return overrides


def train_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``borgdqn train ARGS`` with ``env`` over this process's environment (a password goes there, never in argv)."""
    return subprocess.run([sys.executable, "-m", "borgdqn", "train", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})
