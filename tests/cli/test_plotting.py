"""``borgdqn plot``'s backend: PNG learning curves from real metrics files (written here with MetricsWriter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from borgdqn.metrics import MetricsWriter, agent_metrics_path
from borgdqn.plotting import build_figures, plot_runs, rolling_mean
from tests.support.runs import PNG_MAGIC, write_run


def lines_by_label(fig: object, axes: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ax = fig.axes[axes]  # type: ignore[attr-defined]
    return {
        line.get_label(): (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
        for line in ax.get_lines()
    }


def test_plot_runs_writes_valid_pngs(tmp_path: Path) -> None:
    import matplotlib.image

    run = write_run(tmp_path / "pong")
    paths = plot_runs([run], tmp_path / "plots")
    assert [p.name for p in paths] == [
        "pong-returns-by-agent.png", "pong-returns-by-policy.png", "pong-training.png",
    ]  # fmt: skip
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0  # something was drawn, not a blank canvas


def test_returns_by_policy_has_one_line_per_policy_with_the_rolling_mean(tmp_path: Path) -> None:
    policies = ("random", "switch(random->greedy)", "epsilon_greedy")
    run = write_run(tmp_path / "run", agents=1, episodes=30, policies=policies)
    fig = build_figures([run], smooth=4)["run-returns-by-policy"]
    lines = lines_by_label(fig)
    assert list(lines) == list(policies)
    # One agent: hive steps are its own steps; each policy played every third episode.
    x, y = lines["epsilon_greedy"]
    assert np.array_equal(x, 100.0 * np.arange(3, 31, 3))
    returns = [float(r["return"]) for r in _episodes(run) if r["policy"] == "epsilon_greedy"]
    assert np.allclose(y, rolling_mean(np.array(returns), 4))


def _episodes(run: Path) -> list[dict]:
    from borgdqn.metrics import read_records

    return list(read_records(run, "episode"))


def test_returns_by_agent_has_one_line_per_agent_over_its_own_steps(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", agents=3, episodes=10)
    lines = lines_by_label(build_figures([run])["run-returns-by-agent"])
    assert list(lines) == ["agent 0", "agent 1", "agent 2"]
    for x, _ in lines.values():
        assert np.array_equal(x, 100.0 * np.arange(1, 11))


def test_assimilations_are_marked_on_the_adopting_agents_curve(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", agents=3, episodes=10)
    writer = MetricsWriter(agent_metrics_path(run, 2))
    writer.write("assimilation", agent=2, donor=0, env_steps=500, mean_return=1.0, donor_mean_return=9.0, wall=5.0)
    writer.close()
    fig = build_figures([run])["run-returns-by-agent"]
    ax = fig.axes[0]  # type: ignore[attr-defined]
    assert list(lines_by_label(fig)) == ["agent 0", "agent 1", "agent 2"], "the marks are no curves"
    from matplotlib.collections import LineCollection

    marks = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert [float(seg[0][0]) for c in marks for seg in c.get_segments()] == [500.0]
    agent2 = next(line for line in ax.get_lines() if line.get_label() == "agent 2")
    assert tuple(marks[0].get_colors()[0][:3]) == pytest.approx(matplotlib_rgb(agent2.get_color()))
    assert [t.get_text() for t in ax.texts] == ["2\u21900"]


def matplotlib_rgb(color: str) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(color)


def test_hive_steps_sum_each_agents_latest_steps_in_wall_order(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # (agent, wall, env_steps): the hive has done 100, 150, 250, 350 steps at these four episodes.
    for agent, wall, steps in [(0, 1.0, 100), (1, 2.0, 50), (0, 3.0, 200), (1, 4.0, 150)]:
        w = MetricsWriter(agent_metrics_path(run, agent))
        w.write("episode", agent=agent, env_steps=steps, episode=1, **{"return": 1.0}, length=1, policy="p",
                epsilon=0.1, wall=wall)  # fmt: skip
        w.close()
    x, _ = lines_by_label(build_figures([run])["run-returns-by-policy"])["p"]
    assert np.array_equal(x, [100, 150, 250, 350])


def test_hive_steps_without_wall_times_are_agent_steps_times_agents(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", agents=2, episodes=3, policies=("p",), train=False, wall=False)
    fig = build_figures([run])["run-returns-by-policy"]
    x, _ = lines_by_label(fig)["p"]
    assert np.array_equal(x, [200, 200, 400, 400, 600, 600])
    assert "~" in fig.axes[0].get_xlabel()  # the approximation is said on the axis


def test_several_runs_are_compared_on_one_figure(tmp_path: Path) -> None:
    stack = write_run(tmp_path / "stack", seed=1)
    lstm = write_run(tmp_path / "lstm", seed=2, agents=4)
    paths = plot_runs([stack, lstm], tmp_path / "plots", labels=["frame stack", "LSTM"])
    names = [p.name for p in paths]
    assert "compare-returns.png" in names
    assert "frame_stack-returns-by-agent.png" in names and "LSTM-training.png" in names
    fig = build_figures([stack, lstm], labels=["frame stack", "LSTM"])["compare-returns"]
    by_steps, by_wall = lines_by_label(fig, 0), lines_by_label(fig, 1)
    assert list(by_steps) == list(by_wall) == ["frame stack", "LSTM"]
    # The LSTM hive has 4 agents: its last episode comes at 4 x 3000 hive steps.
    assert by_steps["LSTM"][0][-1] == 4 * 3000 and by_steps["frame stack"][0][-1] == 2 * 3000


def test_runs_default_to_directory_names_and_clashing_names_stay_apart(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a" / "run", train=False)
    b = write_run(tmp_path / "b" / "run", train=False)
    figures = build_figures([a, b])
    assert {"run-returns-by-agent", "run-2-returns-by-agent", "compare-returns"} <= set(figures)
    assert list(lines_by_label(figures["compare-returns"])) == ["run", "run-2"]
    assert not any(k.endswith("-training") for k in figures)  # no train records, no training figure


def test_training_figure_plots_loss_and_mean_q_per_agent(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", agents=2, episodes=10)
    fig = build_figures([run])["run-training"]
    loss, mean_q = lines_by_label(fig, 0), lines_by_label(fig, 1)
    assert list(loss) == list(mean_q) == ["agent 0", "agent 1"]
    assert np.array_equal(loss["agent 1"][0], [125, 250])
    assert np.allclose(loss["agent 1"][1], [1 / 5, 1 / 10])
    assert fig.axes[0].get_yscale() == "log"


def test_torn_lines_and_null_values_are_skipped(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", agents=1, episodes=5, policies=("p",), train=False)
    w = MetricsWriter(agent_metrics_path(run, 0))
    w.write("episode", agent=0, env_steps=900, episode=6, **{"return": float("nan")}, length=1, policy="p",
            wall=9.0)  # fmt: skip
    w.close()
    with agent_metrics_path(run, 0).open("a") as fh:
        fh.write('{"kind":"episode","agent":0,"env_st')  # a crash mid-line
    x, _ = lines_by_label(build_figures([run])["run-returns-by-policy"])["p"]
    assert len(x) == 5


@pytest.mark.parametrize("layout", ["missing", "empty", "empty_metrics", "unrelated_records"])
def test_a_run_without_metrics_is_an_error_naming_the_dir(tmp_path: Path, layout: str) -> None:
    good = write_run(tmp_path / "good")
    bad = tmp_path / f"bad-{layout}"
    if layout != "missing":
        bad.mkdir()
    if layout in ("empty_metrics", "unrelated_records"):
        (bad / "metrics").mkdir()
        (bad / "metrics" / "agent-0.jsonl").write_text("")
    if layout == "unrelated_records":
        w = MetricsWriter(agent_metrics_path(bad, 0))
        w.write("memory", size=1, capacity=10, inserted=1, sampled=0, wall=1.0)
        w.close()
    with pytest.raises(ValueError, match=f"bad-{layout}") as err:
        plot_runs([good, bad], tmp_path / "plots")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "plots").exists()  # nothing half-written


def test_bad_arguments_are_errors(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    with pytest.raises(ValueError, match="labels"):
        plot_runs([run], tmp_path / "plots", labels=["a", "b"])
    with pytest.raises(ValueError, match="smooth"):
        plot_runs([run], tmp_path / "plots", smooth=0)
    with pytest.raises(ValueError, match="no run"):
        plot_runs([], tmp_path / "plots")


def test_missing_matplotlib_says_what_to_install(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    # A fresh interpreter where matplotlib cannot be imported, as on the light install.
    code = f"""
import sys
from importlib.abc import MetaPathFinder

class NoMatplotlib(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named " + repr(name))
        return None

sys.meta_path.insert(0, NoMatplotlib())
from pathlib import Path
from borgdqn.plotting import plot_runs
try:
    plot_runs([Path({str(run)!r})], Path({str(tmp_path / "plots")!r}))
except ImportError as err:
    print("ERR", err)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ERR" in result.stdout and "pip install 'borgdqn[plot]'" in result.stdout
