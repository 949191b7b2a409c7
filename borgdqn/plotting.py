"""Learning curves of finished (or running) hives as PNGs: the backend of ``borgdqn plot``.

Figures, per run (``<run>`` is the run's label: its directory name, or the label given):

- ``<run>-returns-by-agent.png``: episode return vs the agent's own env steps, one line per agent
- ``<run>-returns-by-policy.png``: episode return vs hive env steps, one line per episode ``policy`` label
- ``<run>-training.png``: loss and mean Q vs updates, one line per agent (only when ``train`` records exist)

and, when several runs are given, ``compare-returns.png``: the hive's return vs hive env steps and vs wall time,
one line per run (e.g. frame stacking against an LSTM).

Raw episode returns are drawn as faint points, the trailing mean of the last ``smooth`` episodes as a line.

Hive env steps at a record are the sum over agents of each agent's latest ``env_steps`` reported up to that
record's wall time, merging all records of a run (episodes and train reports) in wall-time order. When some
record has no wall time (older or hand-written metrics), ``env_steps * number of agents`` stands in for it.

Matplotlib is imported only when plotting (the light install has none), and figures are drawn on their own Agg
canvas without pyplot, so plotting neither needs a display nor touches the caller's pyplot backend or state.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from borgdqn.metrics import METRICS_DIR, read_records

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["build_figures", "plot_runs"]

log = logging.getLogger(__name__)

INSTALL_HINT = "plotting needs matplotlib: pip install 'borgdqn[plot]'"
RAW_ALPHA = 0.25
LEGEND_ROWS = 12  # more entries than this go into extra legend columns


@dataclass
class _Episodes:
    agent: np.ndarray  # int
    env_steps: np.ndarray  # the agent's own
    hive_steps: np.ndarray
    wall: np.ndarray  # NaN where unknown
    ret: np.ndarray
    policy: list[str]


@dataclass
class LoadedRun:
    label: str
    stem: str
    path: Path
    episodes: _Episodes
    # agent -> updates, loss, mean_q, env_steps, epsilon, env_steps_per_s, wall (NaN where absent), by updates
    train: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    exact_hive_steps: bool = True
    # The memory records (agent 0 writes them): wall, size, capacity, inserted, sampled, bytes, in file order; and
    # agent -> (wall, steps stored) where the records carry ``per_agent`` (steps stored now, by agent).
    memory: dict[str, np.ndarray] = field(default_factory=dict)
    memory_per_agent: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    # (agent, donor, the agent's env steps) of each assimilation, in file order
    assimilations: list[tuple[int, int, float]] = field(default_factory=list)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


def load_run(path: Path, label: str, stem: str) -> LoadedRun:
    if not path.is_dir():
        raise ValueError(f"{path}: not a run directory (it does not exist or is a file)")
    records = list(read_records(path))
    if not records:
        raise ValueError(f"{path}: no metrics found (expected {path / METRICS_DIR}/agent-*.jsonl)")

    # Records that carry an agent's progress: (wall, order, agent, env_steps); order keeps ties in file order.
    progress: list[tuple[float, int, int, int]] = []
    episodes: list[tuple[int, int, float, float, str, int]] = []  # agent, env_steps, wall, return, policy, i
    train: dict[int, list[tuple[float, ...]]] = defaultdict(list)  # agent -> (updates, loss, mean_q, ...)
    memory: list[tuple[float, ...]] = []  # _MEMORY_SERIES
    memory_per_agent: dict[int, list[tuple[float, float]]] = defaultdict(list)
    assimilations: list[tuple[int, int, float]] = []
    skipped = 0
    for i, rec in enumerate(records):
        kind, agent, steps = rec.get("kind"), rec.get("agent"), _number(rec.get("env_steps"))
        if kind == "memory":
            _memory_record(rec, memory, memory_per_agent)
            continue
        if kind == "assimilation":
            donor = rec.get("donor")
            if isinstance(agent, int) and isinstance(donor, int) and steps is not None:
                assimilations.append((agent, donor, steps))
            continue
        if kind not in ("episode", "train"):
            continue
        if not isinstance(agent, int) or steps is None:
            skipped += 1
            continue
        wall = _number(rec.get("wall"))
        wall_s = math.nan if wall is None else wall
        progress.append((wall_s, i, agent, int(steps)))
        if kind == "episode":
            ret = _number(rec.get("return"))
            policy = str(rec.get("policy") or "unknown")
            if ret is None:
                skipped += 1
            else:
                episodes.append((agent, int(steps), wall_s, ret, policy, i))
        else:
            updates = _number(rec.get("updates"))
            loss, mean_q = _number(rec.get("loss")), _number(rec.get("mean_q"))
            if updates is None:
                skipped += 1
            else:
                extra = (_number(rec.get("epsilon")), _number(rec.get("env_steps_per_s")))
                train[agent].append((updates, _nan_if_none(loss), _nan_if_none(mean_q), steps,
                                     *(_nan_if_none(v) for v in extra), wall_s))
    if skipped:
        log.warning("run=%s skipped=%d records without the fields a plot needs", path, skipped)
    if not episodes and not train:
        raise ValueError(f"{path}: metrics hold no episode or train records to plot")

    exact = all(not math.isnan(p[0]) for p in progress)
    hive_at: dict[int, int] = {}  # record index -> hive env steps
    if exact:
        latest: dict[int, int] = {}
        total = 0
        for _, i, agent, steps in sorted(progress):
            if steps > latest.get(agent, 0):
                total += steps - latest.get(agent, 0)
                latest[agent] = steps
            hive_at[i] = total
    else:
        agents = len({p[2] for p in progress})
        hive_at = {i: steps * agents for _, i, _, steps in progress}
        log.info("run=%s some records lack wall time: hive env steps ~ agent env steps * %d agents", path, agents)

    episodes.sort(key=lambda e: (hive_at[e[5]], e[5]))
    eps = _Episodes(
        agent=np.array([e[0] for e in episodes], dtype=np.int64),
        env_steps=np.array([e[1] for e in episodes], dtype=np.float64),
        hive_steps=np.array([hive_at[e[5]] for e in episodes], dtype=np.float64),
        wall=np.array([e[2] for e in episodes], dtype=np.float64),
        ret=np.array([e[3] for e in episodes], dtype=np.float64),
        policy=[e[4] for e in episodes],
    )
    train_arrays = {}
    for agent, rows in sorted(train.items()):
        arr = np.array(sorted(rows), dtype=np.float64)
        train_arrays[agent] = {name: arr[:, k] for k, name in enumerate(_TRAIN_SERIES)}
    mem = np.array(memory, dtype=np.float64).reshape(-1, len(_MEMORY_SERIES))
    return LoadedRun(label=label, stem=stem, path=path, episodes=eps, train=train_arrays, exact_hive_steps=exact,
                memory={name: mem[:, k] for k, name in enumerate(_MEMORY_SERIES)},
                memory_per_agent=dict(sorted(memory_per_agent.items())), assimilations=assimilations)


_TRAIN_SERIES = ("updates", "loss", "mean_q", "env_steps", "epsilon", "env_steps_per_s", "wall")
_MEMORY_SERIES = ("wall", "size", "capacity", "inserted", "sampled", "bytes")


def _memory_record(rec: dict[str, Any], rows: list[tuple[float, ...]],
                   per_agent: dict[int, list[tuple[float, float]]]) -> None:
    wall, size = _number(rec.get("wall")), _number(rec.get("size"))
    if wall is None or size is None:
        return
    rows.append((wall, size, *(_nan_if_none(_number(rec.get(k))) for k in _MEMORY_SERIES[2:])))
    agents = rec.get("per_agent")
    if isinstance(agents, dict):
        for key, count in agents.items():
            n = _number(count)
            if str(key).isdigit() and n is not None:
                per_agent[int(key)].append((wall, n))


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean of the last ``window`` values (fewer at the start), as the run's summary reports it."""
    csum = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


# ------------------------------------------------------------------------------------------------ drawing
def import_matplotlib() -> tuple[Any, Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return Figure, FigureCanvasAgg, EngFormatter


def new_figure(ncols: int = 1) -> tuple[Figure, list[Axes]]:
    figure_cls, canvas_cls, eng = import_matplotlib()
    fig = figure_cls(figsize=(7.5 * ncols, 4.5), layout="constrained")
    canvas_cls(fig)
    axes = [fig.add_subplot(1, ncols, k + 1) for k in range(ncols)]
    for ax in axes:
        ax.xaxis.set_major_formatter(eng())
        ax.grid(True, alpha=0.3)
    return fig, axes


def add_legend(ax: Axes) -> None:
    n = len(ax.get_lines())
    if n:
        ax.legend(fontsize="small", ncols=max(1, math.ceil(n / LEGEND_ROWS)))


def _curve(ax: Axes, x: np.ndarray, y: np.ndarray, label: str, smooth: int, raw: bool = True) -> None:
    # The mean is the one Line2D per series (tests and readers count lines); raw points are a scatter.
    (line,) = ax.plot(x, rolling_mean(y, smooth), label=label, linewidth=1.6)
    if raw:
        ax.scatter(x, y, s=4, color=line.get_color(), alpha=RAW_ALPHA, linewidths=0, zorder=1)


def returns_by_agent_figure(run: LoadedRun, smooth: int) -> Figure:
    from matplotlib.colors import to_hex

    fig, (ax,) = new_figure()
    ep = run.episodes
    colors: dict[int, str] = {}
    for agent in np.unique(ep.agent):
        sel = ep.agent == agent
        order = np.argsort(ep.env_steps[sel], kind="stable")
        _curve(ax, ep.env_steps[sel][order], ep.ret[sel][order], f"agent {agent}", smooth)
        colors[int(agent)] = to_hex(ax.get_lines()[-1].get_color())
    for agent, donor, steps in run.assimilations:
        # A LineCollection, not a Line2D: the curves stay the figure's only lines.
        color = colors.get(agent, "gray")
        ax.vlines(steps, 0.0, 1.0, transform=ax.get_xaxis_transform(), colors=color, linestyles=":", linewidth=1.0)
        ax.annotate(f"{agent}\u2190{donor}", (steps, 0.98), xycoords=("data", "axes fraction"), rotation=90,
                    fontsize="x-small", va="top", ha="right", color=color)
    marks = " ; dotted: agent\u2190donor assimilations" if run.assimilations else ""
    ax.set(
        xlabel="env steps (agent's own)",
        ylabel="episode return",
        title=f"{run.label}: return per agent (mean of last {smooth}){marks}",
    )
    add_legend(ax)
    return fig


def returns_by_policy_figure(run: LoadedRun, smooth: int) -> Figure:
    fig, (ax,) = new_figure()
    ep = run.episodes
    policies = np.array(ep.policy, dtype=object)
    for name in dict.fromkeys(ep.policy):  # order of first appearance: early-phase policies come first
        sel = policies == name
        _curve(ax, ep.hive_steps[sel], ep.ret[sel], str(name), smooth)
    ax.set(
        xlabel=hive_label(run),
        ylabel="episode return",
        title=f"{run.label}: return per policy (mean of last {smooth})",
    )
    add_legend(ax)
    return fig


def hive_label(run: LoadedRun) -> str:
    return "env steps (hive)" if run.exact_hive_steps else "env steps (hive, ~ agent steps x agents)"


def training_figure(run: LoadedRun) -> Figure:
    fig, (loss_ax, q_ax) = new_figure(ncols=2)
    for agent, series in run.train.items():
        loss_ax.plot(series["updates"], series["loss"], label=f"agent {agent}", linewidth=1.2)
        q_ax.plot(series["updates"], series["mean_q"], label=f"agent {agent}", linewidth=1.2)
    losses = np.concatenate([s["loss"] for s in run.train.values()])
    finite = losses[np.isfinite(losses)]
    if finite.size and np.all(finite > 0):
        loss_ax.set_yscale("log")  # losses span decades as the pool fills and targets move
    loss_ax.set(xlabel="updates", ylabel="loss", title=f"{run.label}: training loss")
    q_ax.set(xlabel="updates", ylabel="mean Q", title=f"{run.label}: mean Q of sampled batches")
    add_legend(loss_ax)
    add_legend(q_ax)
    return fig


def _comparison(runs: list[LoadedRun], smooth: int) -> Figure:
    fig, (steps_ax, wall_ax) = new_figure(ncols=2)
    walls = np.concatenate([r.episodes.wall for r in runs])
    top = float(np.nanmax(walls)) if np.isfinite(walls).any() else 0.0
    unit, scale = ("h", 3600.0) if top > 7200 else ("min", 60.0) if top > 120 else ("s", 1.0)
    wall_ax.xaxis.set_major_formatter("{x:g}")
    for run in runs:
        ep = run.episodes
        if not ep.ret.size:
            continue
        # The hive's curve: all agents' episodes in hive-step order, one trailing mean over them.
        _curve(steps_ax, ep.hive_steps, ep.ret, run.label, smooth, raw=False)
        timed = np.isfinite(ep.wall)
        order = np.argsort(ep.wall[timed], kind="stable")
        _curve(wall_ax, ep.wall[timed][order] / scale, ep.ret[timed][order], run.label, smooth, raw=False)
    exact = all(r.exact_hive_steps for r in runs)
    steps_ax.set(
        xlabel="env steps (hive)" if exact else "env steps (hive, approximate)",
        ylabel=f"hive return (mean of last {smooth})",
        title="return vs experience",
    )
    wall_ax.set(
        xlabel=f"wall time ({unit})", ylabel=f"hive return (mean of last {smooth})", title="return vs wall time"
    )
    add_legend(steps_ax)
    add_legend(wall_ax)
    return fig


# --------------------------------------------------------------------------------------------------- API
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "run"


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def build_figures(run_dirs: list[Path], *, labels: list[str] | None = None, smooth: int = 20) -> dict[str, Figure]:
    """The figures :func:`plot_runs` writes, keyed by file stem; for callers that show or inspect them."""
    if not run_dirs:
        raise ValueError("no run directories given")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"labels: {len(labels)} labels for {len(run_dirs)} runs")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1 (got {smooth})")
    import_matplotlib()  # fail on a missing matplotlib before reading any metrics
    names = _unique(list(labels) if labels is not None else [Path(d).resolve().name for d in run_dirs])
    stems = _unique([_slug(name) for name in names])  # distinct labels may still share a file-safe form
    runs = [load_run(Path(d), n, s) for d, n, s in zip(run_dirs, names, stems, strict=True)]
    figures: dict[str, Figure] = {}
    for run in runs:
        stem = run.stem
        if run.episodes.ret.size:
            figures[f"{stem}-returns-by-agent"] = returns_by_agent_figure(run, smooth)
            figures[f"{stem}-returns-by-policy"] = returns_by_policy_figure(run, smooth)
        else:
            log.warning("run=%s has no finished episodes yet: no return curves", run.path)
        if run.train:
            figures[f"{stem}-training"] = training_figure(run)
    if len(runs) > 1:
        figures["compare-returns"] = _comparison(runs, smooth)
    return figures


def plot_runs(run_dirs: list[Path], out_dir: Path, *, labels: list[str] | None = None, smooth: int = 20) -> list[Path]:
    """Write the runs' learning curves as PNGs into ``out_dir``; returns the paths written.

    Raises ValueError (naming the directory) for a run without metrics, ImportError when matplotlib is missing.
    """
    figures = build_figures(run_dirs, labels=labels, smooth=smooth)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, fig in figures.items():
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=120)
        written.append(path)
        log.info("plot written path=%s", path)
    return written
