"""Agent checkpoints: networks, optimizer, counters and policy state, so that ``--resume`` continues a run.

One file per agent, ``DIR/checkpoints/agent-<i>.pt``, written atomically (temp file + rename) so that a crash
during a save never leaves a torn checkpoint behind. The run's config travels inside, so that
``borgdqn eval CHECKPOINT`` needs nothing else.

Loading never runs code: files are read with ``torch.load(weights_only=True)``, which rebuilds tensors and plain
values only (a checkpoint holds nothing else: policy RNG states are plain dicts), so a crafted file's pickled
payload is refused, not executed. Networks are checked tensor by tensor against the network that will take them
before anything is loaded, so that a checkpoint of another shape fails with one line naming the first mismatch.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from borgdqn.config import BorgConfig
from borgdqn.one_line import one_line
from borgdqn.rl.networks import SpecLike, build_q_network

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
    # Hyper-parameters assimilation gave the agent in place of its config's (None: the config's).
    learning_rate: float | None = None
    epsilon_floor: float | None = None


def agent_checkpoint_path(run_dir: Path, agent: int, *, best: bool = False) -> Path:
    """``agent-<i>.pt`` is the latest state (what --resume loads); ``agent-<i>-best.pt`` the state at the agent's
    best mean return over 20 episodes (what you usually want to evaluate: DQN can get worse after it peaks)."""
    return run_dir / CHECKPOINT_DIR / (f"agent-{agent}-best.pt" if best else f"agent-{agent}.pt")


def checkpoint_bytes(state: AgentCheckpoint, config: BorgConfig) -> bytes:
    """The checkpoint file's bytes: what goes to the run dir and to the hive's model store alike."""
    payload = {
        "format": FORMAT_VERSION,
        "config": config.model_dump(mode="json"),
        "state": asdict(state),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def write_checkpoint(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a crash mid-write leaves the previous file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def save_agent_checkpoint(run_dir: Path, state: AgentCheckpoint, config: BorgConfig, *, best: bool = False) -> bytes:
    """Save agent ``state.agent``'s checkpoint under ``run_dir``; returns its bytes (for the model store)."""
    data = checkpoint_bytes(state, config)
    write_checkpoint(agent_checkpoint_path(run_dir, state.agent, best=best), data)
    return data


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, refused (it holds more than tensors and plain values), of an
    unknown format, or of another network shape."""


def read_checkpoint(path: Path) -> tuple[BorgConfig, AgentCheckpoint]:
    """The run's config and the agent's state in the checkpoint at ``path``; CheckpointError for any bad file."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return parse_checkpoint(path.read_bytes(), str(path))


def parse_checkpoint(data: bytes, where: str) -> tuple[BorgConfig, AgentCheckpoint]:
    """A checkpoint's config and state from its bytes (a file's, or the model store's: ``where`` says which in
    errors); CheckpointError for anything but a checkpoint of ours, and nothing in ``data`` is ever run."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to load {where}: it holds objects other than tensors and plain values ({one_line(err, 100)})"
        ) from None
    except Exception as err:  # a truncated or foreign file: zip, pickle or storage errors of any kind
        reason = one_line(err, 160)
        raise CheckpointError(f"cannot read checkpoint {where} (truncated, or not a checkpoint): {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{where} is not a borgdqn checkpoint of format {FORMAT_VERSION}")
    try:
        config = BorgConfig.model_validate(payload["config"])
        state = payload["state"]
        names = {f.name for f in fields(AgentCheckpoint)}
        if not isinstance(state, dict) or not set(state) <= names or "agent" not in state:
            raise ValueError(f"state fields {sorted(state) if isinstance(state, dict) else type(state).__name__}")
        return config, AgentCheckpoint(**state)
    except (KeyError, TypeError, ValueError, ValidationError) as err:
        raise CheckpointError(f"{where} is not a borgdqn checkpoint: {one_line(err, 160)}") from None


def check_learner_state(learner_state: Mapping[str, Any], network: nn.Module, path: Path | str) -> None:
    """Raise CheckpointError unless ``learner_state`` (``Learner.state_dict()`` as saved) fits ``network``: the
    same tensors by name and shape for the online and target networks, and Adam moments of the parameters'
    shapes (Adam itself checks only their count, and would fail at its next step)."""
    expected = {name: tuple(t.shape) for name, t in network.state_dict().items()}
    for part in ("online", "target"):
        saved = learner_state.get(part) if isinstance(learner_state, Mapping) else None
        if not isinstance(saved, Mapping):
            raise CheckpointError(f"{path} holds no {part} network")
        for name, shape in expected.items():
            tensor = saved.get(name)
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{path} holds a network of another shape: {part}.{name} missing")
            if tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"{path} holds a network of another shape: {part}.{name} is {list(tensor.shape)}, "
                    f"this config builds {list(shape)}"
                )
        extra = sorted(set(saved) - set(expected))
        if extra:
            raise CheckpointError(f"{path} holds a network of another shape: {part}.{extra[0]} is not in this one")
    optimizer = learner_state.get("optimizer")
    moments = optimizer.get("state") if isinstance(optimizer, Mapping) else None
    if not isinstance(moments, Mapping):
        raise CheckpointError(f"{path} holds no optimizer state")
    params = [tuple(p.shape) for p in network.parameters()]
    for index, state in moments.items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(state, Mapping):
            raise CheckpointError(f"{path} holds optimizer state for parameter {index!r}, which this network lacks")
        for key in ("exp_avg", "exp_avg_sq"):
            tensor = state.get(key)
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) != params[index]:
                raise CheckpointError(
                    f"{path} holds a network of another shape: Adam's {key} of parameter {index} is "
                    f"{list(tensor.shape)}, the parameter {list(params[index])}"
                )
    if not isinstance(learner_state.get("updates"), int):
        raise CheckpointError(f"{path} holds no update count")


def check_resumable(run_dir: Path, config: BorgConfig, spec: SpecLike) -> None:
    """Before any agent starts: every agent checkpoint in ``run_dir`` reads, and fits the network ``config``
    builds for ``spec``; else CheckpointError (``borgdqn train --resume`` exits 2 instead of failing later)."""
    network = build_q_network(config.network, spec, config.env.frame_stack)
    for path in sorted((run_dir / CHECKPOINT_DIR).glob("agent-*.pt")):
        if not path.name.endswith("-best.pt"):
            check_learner_state(read_checkpoint(path)[1].learner, network, path)


def load_agent_checkpoint(run_dir: Path, agent: int) -> tuple[BorgConfig, AgentCheckpoint] | None:
    """The config agent ``agent`` last saved with and its state, or None when it saved nothing."""
    path = agent_checkpoint_path(run_dir, agent)
    if not path.exists():
        return None
    return read_checkpoint(path)
