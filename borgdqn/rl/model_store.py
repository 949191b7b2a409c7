"""Where the hive keeps its agents' states: the model store's interface, and its one-machine form in the run dir.

A collective's store is the memory's Redis (:class:`borgdqn.memory.redis.model_store.RedisModelStore`); on one
machine the same interface writes under the run dir: agent k's checkpoint is ``checkpoints/agent-<k>.pt`` (what
``--resume`` loads) and its entry ``checkpoints/agent-<k>.json`` beside it. Each file is replaced atomically, the
checkpoint before its entry, so a reader finds a whole checkpoint at least as new as the entry it read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

from borgdqn.memory.redis.model_store import ModelEntry
from borgdqn.rl.checkpoint import CHECKPOINT_DIR, agent_checkpoint_path, write_checkpoint


class ModelStore(Protocol):
    """Each agent's latest checkpoint and its entry (what assimilation ranks and adopts, what a new pod resumes)."""

    def put(self, entry: ModelEntry, checkpoint: bytes) -> int:
        """Store ``entry.agent``'s checkpoint in place of its previous one; returns the store's bytes."""
        ...

    def get(self, agent: int) -> bytes | None:
        """Agent ``agent``'s latest checkpoint, or None."""
        ...

    def entries(self) -> dict[int, ModelEntry]:
        """Every agent's entry that reads as one (hostile or torn values are skipped)."""
        ...

    def close(self) -> None: ...


class RunDirModelStore:
    """The model store of a hive on one machine: files in ``run_dir/checkpoints``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def _entry_path(self, agent: int) -> Path:
        return self.run_dir / CHECKPOINT_DIR / f"agent-{agent}.json"

    def put(self, entry: ModelEntry, checkpoint: bytes) -> int:
        write_checkpoint(agent_checkpoint_path(self.run_dir, entry.agent), checkpoint)
        sized = dataclasses.replace(entry, size_bytes=len(checkpoint))
        write_checkpoint(self._entry_path(entry.agent), sized.to_json().encode())  # atomic, as the checkpoint
        return sum(e.size_bytes for e in self.entries().values())

    def get(self, agent: int) -> bytes | None:
        path = agent_checkpoint_path(self.run_dir, agent)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def entries(self) -> dict[int, ModelEntry]:
        found = {}
        for path in (self.run_dir / CHECKPOINT_DIR).glob("agent-*.json"):
            try:
                entry = ModelEntry.from_json(path.read_bytes())
            except OSError:
                continue
            if entry is not None and path.name == f"agent-{entry.agent}.json":
                found[entry.agent] = entry
        return found

    def close(self) -> None:
        """Nothing to release (the interface's Redis form holds a connection)."""
