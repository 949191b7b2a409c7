"""``borgdqn dashboard DIR``: the Kibana dashboard's views as PNGs, from a real short local run's metrics."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from borgdqn.dashboard import NO_DROPS_NOTE, build_dashboard, write_dashboard
from borgdqn.metrics import MetricsWriter, agent_metrics_path
from tests.support.runs import PNG_MAGIC, write_run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
VIEWS = ["return-per-agent", "hive-return", "return-per-policy", "episodes-per-agent", "epsilon-per-agent", "loss",
         "env-steps-per-s", "memory", "memory-bytes", "memory-shares"]


def check_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and 300 < image.shape[0] < 3000 and 500 < image.shape[1] < 4000, (path, image.shape)
    assert image.std() > 0, f"{path}: blank"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real short hive: 2 agent processes on CartPole sharing the embedded memory (as tests/hive/test_hive.py)."""
    from borgdqn.config import build_config
    from borgdqn.hive import train
    from tests.support.hive import small_config

    out = tmp_path_factory.mktemp("dash") / "cartpole"
    train(build_config(yaml_path=EXAMPLES / "cartpole.yaml", environ={}, overrides=small_config(out, 1500)))
    return out


@pytest.mark.integration
def test_dashboard_of_a_real_run_writes_every_view_and_lists_it(local_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "pngs"
    result = subprocess.run([sys.executable, "-m", "borgdqn", "dashboard", str(local_run), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    paths = [Path(line) for line in lines if not line.startswith("note: ")]
    assert paths == [out / f"{view}.png" for view in VIEWS]
    for path in paths:
        check_png(path)
    notes = [line for line in lines if line.startswith("note: ")]
    # The hive's memory records carry per-agent counts, so the shares are the memory's own (no substitute note);
    # the absence of drops is said.
    assert not any("per-agent" in n for n in notes)
    assert notes[-1] == f"note: {NO_DROPS_NOTE}" and "no telemetry drops recorded" in NO_DROPS_NOTE


@pytest.mark.integration
def test_default_out_is_the_runs_dashboard_dir(local_run: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "borgdqn", "dashboard", str(local_run)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (local_run / "dashboard").glob("*.png")) == sorted(f"{v}.png" for v in VIEWS)


def _add_memory_records(run: Path, per_agent: bool, with_bytes: bool = True) -> None:
    w = MetricsWriter(agent_metrics_path(run, 0))
    for k in range(1, 11):
        extra: dict[str, object] = {"per_agent": {"0": 60 * k, "1": 40 * k}} if per_agent else {}
        if with_bytes:
            extra["bytes"] = (1 << 20) * k
        w.write("memory", size=100 * k, capacity=2000, inserted=100 * k, sampled=30 * k, wall=float(k), **extra)
    w.close()


def test_memory_shares_come_from_the_memory_records_when_they_carry_per_agent(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", agents=2, episodes=30)
    _add_memory_records(run, per_agent=True)
    board = build_dashboard(run)
    assert list(board.figures) == VIEWS
    ax = board.figures["memory-shares"].axes[0]
    assert "share of the memory" in ax.get_title() and "carry no" not in ax.get_title()
    # Two stacked areas: agent 0 holds 60 % of every reading, agent 1 the rest.
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["agent 0", "agent 1"]
    assert not any("per-agent" in n for n in board.notes)
    # The memory view draws size and capacity, and the insert rate (100 steps per second) on a second axis.
    mem_fig = board.figures["memory"]
    size_ax, rate_ax = mem_fig.axes
    assert [ln.get_label() for ln in size_ax.get_lines()] == ["size (steps)", "capacity (steps)"]
    assert np.allclose(rate_ax.get_lines()[0].get_ydata(), 100.0)
    # The bytes view: the records' bytes, in MiB, over wall time.
    (bytes_line,) = board.figures["memory-bytes"].axes[0].get_lines()
    assert np.array_equal(bytes_line.get_ydata(), np.arange(1, 11)) and np.array_equal(bytes_line.get_xdata(),
                                                                                      np.arange(1, 11))
    # Episodes per agent: a step from 1 to each agent's 30 games, over its own env steps.
    counts = {ln.get_label(): ln.get_ydata() for ln in board.figures["episodes-per-agent"].axes[0].get_lines()}
    assert {k: list(v) for k, v in counts.items()} == {f"agent {a}": list(range(1, 31)) for a in (0, 1)}
    # Returns by acting policy: one curve per policy the run's games were played with.
    policies = [ln.get_label() for ln in board.figures["return-per-policy"].axes[0].get_lines()]
    assert policies == ["random", "epsilon_greedy"]


def test_memory_records_without_bytes_make_a_note_not_a_figure(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", agents=2, episodes=30)
    _add_memory_records(run, per_agent=True, with_bytes=False)
    board = build_dashboard(run)
    assert "memory-bytes" not in board.figures and "memory" in board.figures
    assert any(n.startswith("memory bytes:") for n in board.notes)


def test_hive_return_is_the_trailing_mean_and_its_best(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", agents=1, episodes=30, train=False)
    board = build_dashboard(run, smooth=5)
    lines = {ln.get_label(): ln for ln in board.figures["hive-return"].axes[0].get_lines()}
    mean, best = lines["mean return (last 5)"].get_ydata(), lines["best mean of 5"].get_ydata()
    assert len(best) == 26 and np.all(np.diff(best) >= 0) and best[-1] == pytest.approx(np.max(mean[4:]))
    # No train or memory records: those views are notes, not empty figures.
    assert set(board.figures) == {"return-per-agent", "hive-return", "return-per-policy", "episodes-per-agent"}
    assert any(n.startswith("loss:") for n in board.notes) and any(n.startswith("memory:") for n in board.notes)


def test_written_pngs_are_valid(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", agents=3, episodes=20)
    _add_memory_records(run, per_agent=False)
    paths, notes = write_dashboard(run, tmp_path / "out")
    assert [p.name for p in paths] == [f"{v}.png" for v in VIEWS]
    for path in paths:
        check_png(path)
    assert notes[-1] == NO_DROPS_NOTE


@pytest.mark.parametrize("layout", ["missing", "empty", "empty_metrics"])
def test_a_dir_without_metrics_is_one_line_and_exit_2(tmp_path: Path, layout: str) -> None:
    bad = tmp_path / "bad"
    if layout != "missing":
        bad.mkdir()
    if layout == "empty_metrics":
        (bad / "metrics").mkdir()
    result = subprocess.run([sys.executable, "-m", "borgdqn", "dashboard", str(bad)], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("borgdqn: error: ") and str(bad) in result.stderr
    assert not (bad / "dashboard").exists()
