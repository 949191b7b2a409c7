"""``borgdqn dashboard DIR``: the Kibana "Borg collective" views, drawn from a local run's metrics as PNGs.

The same views as the dashboard (:mod:`borgdqn.telemetry.kibana_objects`), one PNG each, from
``DIR/metrics/agent-*.jsonl`` (read and drawn with :mod:`borgdqn.plotting`'s loader and helpers):

- ``return-per-agent.png``: episode return per agent over its own env steps (the figure ``borgdqn plot`` draws)
- ``hive-return.png``: the hive's mean return of the last 20 episodes and the best such mean so far
- ``return-per-policy.png``: episode return per acting policy over hive env steps (``borgdqn plot``'s figure)
- ``episodes-per-agent.png``: games each agent has finished, over its own env steps
- ``epsilon-per-agent.png``, ``env-steps-per-s.png``: from the agents' train records, over wall time
- ``loss.png``: loss (and mean Q) per agent over updates (``borgdqn plot``'s training figure)
- ``memory.png``: steps stored and capacity, and steps inserted per second (from the memory records)
- ``memory-bytes.png``: the bytes the memory holds (the records' ``bytes``: the shared segment or the replica)
- ``memory-shares.png``: each agent's share of the stored steps when the memory records carry ``per_agent``;
  otherwise each agent's share of the hive's env steps so far, titled as such (the substitute is said)

Dropped telemetry events have no local counterpart (a local run's metrics are files, nothing is dropped):
that view is a note, not a figure. Assimilations are marked on ``return-per-agent.png`` (agent<-donor). Each
view a run cannot fill (no train records yet, no memory records) is a note too; the notes come back with the
paths.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from borgdqn.metrics import MEAN_WINDOW
from borgdqn.plotting import (
    LoadedRun,
    add_legend,
    hive_label,
    import_matplotlib,
    load_run,
    new_figure,
    returns_by_agent_figure,
    returns_by_policy_figure,
    rolling_mean,
    training_figure,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["NO_DROPS_NOTE", "Dashboard", "build_dashboard", "write_dashboard"]

log = logging.getLogger(__name__)

NO_DROPS_NOTE = "dropped telemetry events: no telemetry drops recorded (a local run writes its metrics to files)"


@dataclass
class Dashboard:
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _seconds_axis(ax: object) -> None:
    ax.xaxis.set_major_formatter("{x:g}")  # type: ignore[attr-defined]


def _hive_return(run: LoadedRun, smooth: int) -> Figure:
    fig, (ax,) = new_figure()
    ep = run.episodes
    mean = rolling_mean(ep.ret, smooth)
    ax.plot(ep.hive_steps, mean, label=f"mean return (last {smooth})", linewidth=1.6)
    full = np.arange(1, len(mean) + 1) >= smooth  # as EpisodeTally: a best mean only over full windows
    if full.any():
        best = np.maximum.accumulate(np.where(full, mean, -np.inf))
        ax.plot(ep.hive_steps[full], best[full], label=f"best mean of {smooth}", linewidth=1.6)
    ax.scatter(ep.hive_steps, ep.ret, s=4, alpha=0.2, linewidths=0, color="grey", zorder=1)
    ax.set(xlabel=hive_label(run), ylabel="episode return", title=f"{run.label}: hive best and mean return")
    add_legend(ax)
    return fig


def _per_agent_over_wall(run: LoadedRun, key: str, ylabel: str, title: str, total: bool = False) -> Figure:
    fig, (ax,) = new_figure()
    _seconds_axis(ax)
    for agent, series in run.train.items():
        ok = np.isfinite(series["wall"]) & np.isfinite(series[key])
        order = np.argsort(series["wall"][ok], kind="stable")
        ax.plot(series["wall"][ok][order], series[key][ok][order], label=f"agent {agent}", linewidth=1.2)
    if total and len(run.train) > 1:
        walls = np.unique(np.concatenate([s["wall"][np.isfinite(s["wall"])] for s in run.train.values()]))
        hive = np.zeros_like(walls)
        for series in run.train.values():
            ok = np.isfinite(series["wall"]) & np.isfinite(series[key])
            if ok.any():  # each agent's latest report at each time (0 before its first)
                w, v = series["wall"][ok], series[key][ok]
                order = np.argsort(w, kind="stable")
                idx = np.searchsorted(w[order], walls, side="right") - 1
                live = (idx >= 0) & (walls <= w.max())  # an agent that finished adds nothing after its last report
                hive += np.where(live, v[order][np.maximum(idx, 0)], 0.0)
        ax.plot(walls, hive, label="hive", linewidth=1.6, color="black")
    ax.set(xlabel="wall time (s)", ylabel=ylabel, title=f"{run.label}: {title}")
    add_legend(ax)
    return fig


def _episodes_per_agent(run: LoadedRun) -> Figure:
    fig, (ax,) = new_figure()
    ep = run.episodes
    for agent in np.unique(ep.agent):
        steps = np.sort(ep.env_steps[ep.agent == agent], kind="stable")
        ax.step(steps, np.arange(1, steps.size + 1), where="post", label=f"agent {agent}", linewidth=1.4)
    ax.set(xlabel="env steps (agent's own)", ylabel="episodes played", title=f"{run.label}: episodes per agent")
    add_legend(ax)
    return fig


def _memory_bytes(run: LoadedRun) -> Figure:
    fig, (ax,) = new_figure()
    _seconds_axis(ax)
    mem = run.memory
    ok = np.isfinite(mem["bytes"])
    order = np.argsort(mem["wall"][ok], kind="stable")
    ax.plot(mem["wall"][ok][order], mem["bytes"][ok][order] / 2**20, label="MiB", linewidth=1.6)
    ax.set(xlabel="wall time (s)", ylabel="MiB", title=f"{run.label}: replay memory bytes")
    add_legend(ax)
    return fig


def _memory(run: LoadedRun) -> Figure:
    fig, (ax,) = new_figure()
    _seconds_axis(ax)
    mem = run.memory
    order = np.argsort(mem["wall"], kind="stable")
    wall = mem["wall"][order]
    ax.plot(wall, mem["size"][order], label="size (steps)", linewidth=1.6)
    if np.isfinite(mem["capacity"]).any():
        ax.plot(wall, mem["capacity"][order], label="capacity (steps)", linewidth=1.0, linestyle="--")
    ax.set(xlabel="wall time (s)", ylabel="steps stored", title=f"{run.label}: replay memory size and growth")
    handles, labels = ax.get_legend_handles_labels()
    inserted = mem["inserted"][order]
    dt = np.diff(wall)
    ok = (dt > 0) & np.isfinite(np.diff(inserted)) & (np.diff(inserted) >= 0)  # a resumed run restarts counters
    if ok.any():
        rate_ax = ax.twinx()
        rate_ax.plot(wall[1:][ok], (np.diff(inserted) / np.where(dt > 0, dt, 1.0))[ok], color="tab:green",
                     linewidth=1.0, label="inserted/s")
        rate_ax.set_ylabel("steps inserted per second")
        more_handles, more_labels = rate_ax.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize="small", loc="center right")  # one legend for both axes
    return fig


def _shares(run: LoadedRun) -> tuple[Figure, str | None]:
    fig, (ax,) = new_figure()
    _seconds_axis(ax)
    note = None
    if run.memory_per_agent:
        walls = np.unique(np.concatenate([[w for w, _ in rows] for rows in run.memory_per_agent.values()]))
        counts = np.zeros((len(run.memory_per_agent), len(walls)))
        for k, rows in enumerate(run.memory_per_agent.values()):
            for wall, n in rows:
                counts[k, np.searchsorted(walls, wall)] = n
        title = "per-agent share of the memory"
        agents = list(run.memory_per_agent)
    else:
        # Substitute: each agent's share of the hive's env steps so far, from the train records.
        series = {a: s for a, s in run.train.items() if np.isfinite(s["wall"]).any()}
        walls = np.unique(np.concatenate([s["wall"][np.isfinite(s["wall"])] for s in series.values()]))
        counts = np.zeros((len(series), len(walls)))
        for k, s in enumerate(series.values()):
            ok = np.isfinite(s["wall"])
            order = np.argsort(s["wall"][ok], kind="stable")
            idx = np.searchsorted(s["wall"][ok][order], walls, side="right") - 1
            counts[k] = np.where(idx >= 0, s["env_steps"][ok][order][np.maximum(idx, 0)], 0.0)
        title = "per-agent share of env steps (the memory records carry no per-agent counts)"
        agents = list(series)
        note = ("memory shares: this run's memory records carry no per-agent counts; drawn: each agent's share "
                "of the hive's env steps")
    totals = counts.sum(axis=0)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    ax.stackplot(walls, shares, labels=[f"agent {a}" for a in agents], alpha=0.8)
    ax.set_ylim(0, 1)
    ax.set(xlabel="wall time (s)", ylabel="share", title=f"{run.label}: {title}")
    ax.legend(fontsize="small", loc="upper left")
    return fig, note


def build_dashboard(run_dir: Path, *, smooth: int = MEAN_WINDOW) -> Dashboard:
    """The dashboard's figures (keyed by file stem) and notes for what a run cannot show.

    Raises ValueError (naming the directory) for a run without metrics, ImportError without matplotlib."""
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1 (got {smooth})")
    import_matplotlib()
    run = load_run(Path(run_dir), Path(run_dir).resolve().name, "run")
    out = Dashboard()
    if run.episodes.ret.size:
        out.figures["return-per-agent"] = returns_by_agent_figure(run, smooth)
        out.figures["hive-return"] = _hive_return(run, smooth)
        out.figures["return-per-policy"] = returns_by_policy_figure(run, smooth)
        out.figures["episodes-per-agent"] = _episodes_per_agent(run)
    else:
        out.notes.append("returns: no finished episodes yet")
    timed_train = any(np.isfinite(s["wall"]).any() for s in run.train.values())
    if timed_train:
        out.figures["epsilon-per-agent"] = _per_agent_over_wall(run, "epsilon", "epsilon", "epsilon per agent")
    else:
        out.notes.append("epsilon, env steps/s: no train records with wall times yet")
    if run.train:
        out.figures["loss"] = training_figure(run)
    else:
        out.notes.append("loss: no train records yet")
    if timed_train:
        out.figures["env-steps-per-s"] = _per_agent_over_wall(
            run, "env_steps_per_s", "env steps/s", "env steps/s per agent", total=True)
    if run.memory["wall"].size:
        out.figures["memory"] = _memory(run)
    else:
        out.notes.append("memory: no memory records (agent 0 writes them at report pace)")
    if (run.memory["bytes"] > 0).any():
        out.figures["memory-bytes"] = _memory_bytes(run)
    elif run.memory["wall"].size:
        out.notes.append("memory bytes: this run's memory records carry no byte counts")
    if run.memory_per_agent or timed_train:
        fig, note = _shares(run)
        out.figures["memory-shares"] = fig
        if note:
            out.notes.append(note)
    out.notes.append(NO_DROPS_NOTE)
    return out


def write_dashboard(run_dir: Path, out_dir: Path, *, smooth: int = MEAN_WINDOW) -> tuple[list[Path], list[str]]:
    """Write the dashboard's PNGs into ``out_dir``; returns (paths written, notes)."""
    board = build_dashboard(run_dir, smooth=smooth)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, fig in board.figures.items():
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=120)
        written.append(path)
        log.info("dashboard figure written path=%s", path)
    return written, board.notes

