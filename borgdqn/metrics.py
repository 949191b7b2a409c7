"""Run metrics as JSON lines under ``DIR/metrics/`` and the end-of-run ``DIR/summary.json``.

One file per agent (``agent-<i>.jsonl``), one JSON object per line with a ``kind``:

- ``episode``: agent, env_steps (the agent's own, at the episode end), episode, return (raw, unclipped),
  length, policy (label of the policy that played it), epsilon, wall (seconds since the run started)
- ``train``: agent, env_steps, updates, loss, mean_q, replay_sample_age (mean age, in steps added to the memory
  since, of the steps sampled since the previous train record, see ``memory.protocol``; null, like loss and mean_q,
  when no batch was drawn), env_steps_per_s, updates_per_s, epsilon, wall
- ``memory``: size, capacity, inserted, sampled, per_agent (steps stored now, by agent id), wall (agent 0 only)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

METRICS_DIR = "metrics"
SUMMARY_FILE = "summary.json"
MEAN_WINDOW = 20


def agent_metrics_path(run_dir: Path, agent: int) -> Path:
    return run_dir / METRICS_DIR / f"agent-{agent}.jsonl"


class MetricsWriter:
    """Appends records to one agent's JSON-lines file; line-buffered so a crash loses at most one line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] = path.open("a", buffering=1)

    def write(self, kind: str, **fields: Any) -> None:
        record = {"kind": kind, **{k: _finite(v) for k, v in fields.items()}}
        self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._fh.close()


def _finite(value: Any) -> Any:
    # JSON has no NaN/inf; null keeps the line parseable by every reader (jq, Elasticsearch, pandas).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_records(run_dir: Path, kind: str | None = None) -> Iterator[dict[str, Any]]:
    """Every record of every agent of a run, file by file; a torn last line (crash) is skipped."""
    for path in sorted((run_dir / METRICS_DIR).glob("agent-*.jsonl")):
        with path.open() as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and (kind is None or record.get("kind") == kind):
                    yield record


@dataclass
class EpisodeTally:
    """Running statistics of a stream of episode returns (an agent's or the hive's)."""

    episodes: int = 0
    env_steps: int = 0
    recent: list[float] = field(default_factory=list)
    best_mean: float | None = None

    def add(self, episode_return: float) -> None:
        self.episodes += 1
        self.recent.append(float(episode_return))
        if len(self.recent) > MEAN_WINDOW:
            del self.recent[0]
        if len(self.recent) == MEAN_WINDOW:
            mean = sum(self.recent) / MEAN_WINDOW
            if self.best_mean is None or mean > self.best_mean:
                self.best_mean = mean

    @property
    def mean(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else None


def summarize(run_dir: Path, wall_seconds: float) -> dict[str, Any]:
    """Per agent and for the hive: env steps, episodes, mean return of the last 20, best mean of 20, wall time.

    The hive's episodes are merged in order of wall time, so its "last 20" are the 20 most recent anywhere.
    """
    per_agent: dict[int, EpisodeTally] = {}
    steps: dict[int, int] = {}
    episodes = sorted(read_records(run_dir, "episode"), key=lambda r: r.get("wall") or 0.0)
    hive = EpisodeTally()
    for rec in episodes:
        agent = int(rec["agent"])
        per_agent.setdefault(agent, EpisodeTally()).add(rec["return"])
        hive.add(rec["return"])
    walls: dict[int, float] = {}
    for rec in read_records(run_dir):
        if "agent" in rec and "env_steps" in rec:
            agent = int(rec["agent"])
            steps[agent] = max(steps.get(agent, 0), int(rec["env_steps"]))
            walls[agent] = max(walls.get(agent, 0.0), float(rec.get("wall") or 0.0))
    agents = sorted(set(per_agent) | set(steps))

    def block(tally: EpisodeTally, env_steps: int, wall: float) -> dict[str, Any]:
        return {
            "env_steps": env_steps,
            "episodes": tally.episodes,
            "mean_return_last_20": tally.mean,
            "best_mean_return_20": tally.best_mean,
            "wall_seconds": round(wall, 2),
        }

    summary = {
        "agents": {str(a): block(per_agent.get(a, EpisodeTally()), steps.get(a, 0), walls.get(a, 0.0)) for a in agents},
        "hive": block(hive, sum(steps.values()), wall_seconds),
        "wall_seconds": round(wall_seconds, 2),
    }
    return summary


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / SUMMARY_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)
    return path
