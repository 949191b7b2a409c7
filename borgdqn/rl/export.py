"""A portable model: an agent's online network as safetensors, and a small JSON of what rebuilds it and plays.

``borgdqn export`` writes a directory::

    OUT/model.safetensors   the online network's weights (tensors only: safetensors cannot hold code)
    OUT/model.json          {"format": "borgdqn.export.v1", "env": {...}, "network": {...}, "frame_shape": [...],
                             "is_image": ..., "num_actions": ..., "agent": ..., "env_steps": ..., "best_mean": ...,
                             "source": "..."}

``env`` and ``network`` are borgdqn's config sections (the game, its preprocessing and frame stack; the network's
torso, heads and LSTM), so ``borgdqn eval OUT`` (or any program with borgdqn) rebuilds the network, loads the
weights and plays. Exports are read as untrusted input: the JSON is validated by the config models and every
tensor is checked against the network it must fit, with a one-line error for anything else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from borgdqn.config import BorgConfig, EnvConfig, NetworkConfig
from borgdqn.one_line import one_line
from borgdqn.rl.checkpoint import CHECKPOINT_DIR, AgentCheckpoint, CheckpointError, read_checkpoint
from borgdqn.rl.networks import QNetwork, build_q_network

EXPORT_FORMAT = "borgdqn.export.v1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
_MAX_META_BYTES = 1 << 20


class ExportError(ValueError):
    """An export that cannot be written or read (one line)."""


@dataclass(frozen=True)
class NetSpec:
    """What a network is built for (``networks.SpecLike``), as an export records it."""

    frame_shape: tuple[int, ...]
    is_image: bool
    num_actions: int


@dataclass(frozen=True)
class Export:
    env: EnvConfig
    network: NetworkConfig
    spec: NetSpec
    weights: dict[str, torch.Tensor]  # the online network's state dict
    meta: dict[str, Any]


def export_model(config: BorgConfig, state: AgentCheckpoint, spec: NetSpec, out: Path, source: str) -> Path:
    """Write agent ``state``'s online network (of ``config``, for ``spec``) to ``out``; returns ``out``."""
    from safetensors.torch import save_file

    online = state.learner.get("online") if isinstance(state.learner, Mapping) else None
    if not isinstance(online, Mapping) or not online:
        raise ExportError(f"{source} holds no online network to export")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in online.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": EXPORT_FORMAT})
    best = state.best_mean if state.best_mean is not None and math.isfinite(state.best_mean) else None
    meta = {
        "format": EXPORT_FORMAT,
        "env": config.env.model_dump(mode="json"),
        "network": config.network.model_dump(mode="json"),
        "frame_shape": list(spec.frame_shape),
        "is_image": spec.is_image,
        "num_actions": spec.num_actions,
        "agent": state.agent,
        "env_steps": state.env_steps,
        "best_mean": best,
        "source": source,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_export(path: Path) -> Export:
    """The export in directory ``path`` (or the directory of its ``model.json``); ExportError for anything else."""
    folder = path.parent if path.name in (META_FILE, WEIGHTS_FILE) else path
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise ExportError(f"{folder} is not a borgdqn export (it needs {META_FILE} and {WEIGHTS_FILE})")
    try:
        if meta_path.stat().st_size > _MAX_META_BYTES:
            raise ValueError(f"larger than {_MAX_META_BYTES} bytes")
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
            raise ValueError(f"not of format {EXPORT_FORMAT}")
        env = EnvConfig.model_validate(meta["env"])
        network = NetworkConfig.model_validate(meta["network"])
        spec = NetSpec(tuple(int(d) for d in meta["frame_shape"]), bool(meta["is_image"]), int(meta["num_actions"]))
        if not spec.frame_shape or min(spec.frame_shape) < 1 or spec.num_actions < 1:
            raise ValueError(f"frame shape {spec.frame_shape} and {spec.num_actions} actions")
    except (OSError, KeyError, TypeError, ValueError, ValidationError) as err:
        raise ExportError(f"{meta_path} is not a borgdqn export's description: {one_line(err, 160)}") from None
    try:
        from safetensors.torch import load_file

        weights = load_file(str(weights_path))
    except Exception as err:  # a truncated or foreign file: the header or the data does not read
        raise ExportError(f"cannot read {weights_path} (truncated, or not safetensors): {one_line(err, 160)}") from None
    export = Export(env, network, spec, weights, meta)
    check_weights(export, weights_path)
    return export


def build_network(export: Export) -> QNetwork:
    """The export's network, built from its description (weights not loaded)."""
    return build_q_network(export.network, export.spec, export.env.frame_stack)


def check_weights(export: Export, where: Path) -> None:
    """ExportError unless the weights are exactly the tensors (names and shapes) of the described network."""
    expected = {name: tuple(t.shape) for name, t in build_network(export).state_dict().items()}
    got = {name: tuple(t.shape) for name, t in export.weights.items()}
    for name, shape in expected.items():
        if got.get(name) != shape:
            found = "missing" if name not in got else f"{list(got[name])}"
            raise ExportError(f"{where} does not fit its network: {name} is {found}, the network's {list(shape)}")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise ExportError(f"{where} does not fit its network: {extra[0]} is not in it")


def pick_checkpoint(run_dir: Path, agent: int | None) -> Path:
    """The checkpoint to export from a run dir: agent ``agent``'s best (else latest) checkpoint, or, with no agent,
    the best checkpoint of the agent with the best mean return over 20 episodes."""
    folder = run_dir / CHECKPOINT_DIR
    if agent is not None:
        for name in (f"agent-{agent}-best.pt", f"agent-{agent}.pt"):
            if (folder / name).is_file():
                return folder / name
        raise ExportError(f"{folder} holds no checkpoint of agent {agent}")
    best: tuple[float, Path] | None = None
    for path in sorted(folder.glob("agent-*-best.pt")):
        try:
            mean = read_checkpoint(path)[1].best_mean
        except CheckpointError:
            continue
        if mean is not None and (best is None or mean > best[0]):
            best = (mean, path)
    if best is not None:
        return best[1]
    latest = sorted(folder.glob("agent-*.pt"))
    if not latest:
        raise ExportError(f"{run_dir} holds no checkpoints ({folder})")
    return latest[0]
