"""Agent checkpoints: networks, optimizer, counters and policy state, so that ``--resume`` continues a run.

One file per agent, ``DIR/checkpoints/agent-<i>.pt``, written atomically (temp file + rename) so that a crash
during a save never leaves a torn checkpoint behind. The run's config travels inside, so that
``borgdqn eval CHECKPOINT`` needs nothing else.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from borgdqn.config import BorgConfig

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1


@dataclass
class AgentCheckpoint:
    agent: int
    env_steps: int = 0
    episodes: int = 0
    wall: float = 0.0
    recent_returns: list[float] = field(default_factory=list)
    best_mean: float | None = None
    learner: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)


def agent_checkpoint_path(run_dir: Path, agent: int, *, best: bool = False) -> Path:
    """``agent-<i>.pt`` is the latest state (what --resume loads); ``agent-<i>-best.pt`` the state at the agent's
    best mean return over 20 episodes (what you usually want to evaluate: DQN can get worse after it peaks)."""
    return run_dir / CHECKPOINT_DIR / (f"agent-{agent}-best.pt" if best else f"agent-{agent}.pt")


def save_agent_checkpoint(run_dir: Path, state: AgentCheckpoint, config: BorgConfig, *, best: bool = False) -> Path:
    path = agent_checkpoint_path(run_dir, state.agent, best=best)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "config": config.model_dump(mode="json"),
        "state": asdict(state),
    }
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or of an unknown format."""


def read_checkpoint(path: Path) -> tuple[BorgConfig, AgentCheckpoint]:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        # Our own payload holds plain containers, tensors and numpy state (policy RNGs), hence weights_only=False;
        # checkpoints are trusted files that this program wrote.
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.__class__.__name__}: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a borgdqn checkpoint of format {FORMAT_VERSION}")
    config = BorgConfig.model_validate(payload["config"])
    return config, AgentCheckpoint(**payload["state"])


def load_agent_checkpoint(run_dir: Path, agent: int) -> AgentCheckpoint | None:
    path = agent_checkpoint_path(run_dir, agent)
    if not path.exists():
        return None
    return read_checkpoint(path)[1]
