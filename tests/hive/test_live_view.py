"""The hive's live view shows what each agent is doing, a replica loading the hive's log included."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from borgdqn.live_view import LogHiveView, RichHiveView
from borgdqn.rl.reporting import AgentReport


def report(agent: int, loading: float | None) -> AgentReport:
    return AgentReport(agent=agent, env_steps=1200, episodes=3, updates=0 if loading is not None else 40,
                       mean_return=-20.0, best_mean_return=-19.0, epsilon=0.5, loss=None, env_steps_per_s=300.0,
                       updates_per_s=12.0, memory_size=5000, memory_capacity=10000, loading=loading)


def test_an_agent_loading_the_log_says_how_far_it_is_in_both_views(caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()
    view = RichHiveView(2, 10_000, console=Console(file=out, width=160, force_terminal=False))
    with view:
        view.update(report(0, 0.25))
        view.update(report(1, None))
    text = out.getvalue()
    assert "loading log 25%" in text and text.count("loading log") == 1, text
    caplog.set_level(logging.INFO, logger="borgdqn.live_view")
    with LogHiveView(2, 10_000, every_s=0.0) as plain:
        plain.update(report(0, 0.5))
        plain.update(report(1, None))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("agent=")]
    assert any(line.startswith("agent=0 ") and line.endswith(" loading_log=50%") for line in lines), lines
    assert all("loading_log" not in line for line in lines if line.startswith("agent=1 ")), lines
