"""What a user watching a local hive sees: a rich live table on a terminal, progress lines elsewhere (CI, logs)."""

from __future__ import annotations

import logging
import math
import time
from typing import Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from borgdqn.rl.reporting import AgentReport

log = logging.getLogger(__name__)


class HiveView(Protocol):
    def update(self, report: AgentReport) -> None: ...
    def note(self, message: str) -> None: ...
    def __enter__(self) -> HiveView: ...
    def __exit__(self, *exc: object) -> None: ...


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


class _Board:
    """The latest report of every agent and the hive's totals."""

    def __init__(self, agents: int, total_steps: int) -> None:
        self.agents = agents
        self.total_steps = total_steps
        self.latest: dict[int, AgentReport] = {}
        self.started = time.monotonic()
        self.message = ""

    def update(self, report: AgentReport) -> None:
        self.latest[report.agent] = report

    @property
    def hive_steps(self) -> int:
        return sum(r.env_steps for r in self.latest.values())

    def memory(self) -> tuple[int, int]:
        if not self.latest:
            return 0, 0
        newest = max(self.latest.values(), key=lambda r: r.memory_size)
        return newest.memory_size, newest.memory_capacity


def _progress_row(done: int, total: int) -> Table:
    # A grid keeps the bar on a line of its own inside the Group.
    row = Table.grid(padding=(0, 1))
    row.add_row(
        ProgressBar(total=max(total, 1), completed=min(done, total), width=60),
        Text(f"{100.0 * done / max(total, 1):.0f}%"),
    )
    return row


class RichHiveView:
    def __init__(self, agents: int, total_steps: int, console: Console | None = None) -> None:
        self._board = _Board(agents, total_steps)
        self._console = console or Console(stderr=True)
        self._live = Live(self._render(), console=self._console, refresh_per_second=4, transient=False)

    def __enter__(self) -> RichHiveView:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.update(self._render())
        self._live.__exit__(None, None, None)

    def update(self, report: AgentReport) -> None:
        self._board.update(report)
        self._live.update(self._render())

    def note(self, message: str) -> None:
        self._board.message = message
        self._live.update(self._render())

    def _render(self) -> Group:
        b = self._board
        table = Table(title="Borg-DQN hive", expand=False)
        for col in ("agent", "env steps", "episodes", "mean return (20)", "best", "epsilon", "loss",
                    "steps/s", "updates/s"):  # fmt: skip
            table.add_column(col, justify="right")
        for agent in range(b.agents):
            r = b.latest.get(agent)
            if r is None:
                table.add_row(str(agent), "starting", "", "", "", "", "", "", "")
                continue
            table.add_row(
                str(agent) + (" ✓" if r.done else ""),
                f"{r.env_steps:,}",
                str(r.episodes),
                _fmt(r.mean_return),
                _fmt(r.best_mean_return),
                _fmt(r.epsilon, 3),
                _fmt(r.loss, 4),
                _fmt(r.env_steps_per_s, 0),
                f"loading log {r.loading:.0%}" if r.loading is not None else _fmt(r.updates_per_s, 0),
            )
        size, capacity = b.memory()
        elapsed = time.monotonic() - b.started
        lines: list[RenderableType] = [
            table,
            Text(f"hive env steps {b.hive_steps:,} / {b.total_steps:,}   elapsed {elapsed:,.0f}s"),
            _progress_row(b.hive_steps, b.total_steps),
            Text(f"replay memory {size:,} / {capacity:,} steps ({100.0 * size / max(capacity, 1):.1f}% full)"),
        ]
        if b.message:
            lines.append(Text(b.message, style="bold yellow"))
        return Group(*lines)


class LogHiveView:
    """Plain progress lines (key=value) at most every ``every_s`` seconds, for CI logs and pipes."""

    def __init__(self, agents: int, total_steps: int, every_s: float = 10.0) -> None:
        self._board = _Board(agents, total_steps)
        self._every = every_s
        self._last = 0.0

    def __enter__(self) -> LogHiveView:
        return self

    def __exit__(self, *exc: object) -> None:
        self._emit()

    def update(self, report: AgentReport) -> None:
        self._board.update(report)
        if time.monotonic() - self._last >= self._every:
            self._emit()

    def note(self, message: str) -> None:
        log.warning("%s", message)

    def _emit(self) -> None:
        self._last = time.monotonic()
        b = self._board
        size, capacity = b.memory()
        pct = 100.0 * b.hive_steps / max(b.total_steps, 1)
        log.info(
            "hive steps=%d/%d (%.0f%%) memory=%d/%d elapsed=%.0fs",
            b.hive_steps, b.total_steps, pct, size, capacity, time.monotonic() - b.started,
        )  # fmt: skip
        for agent in sorted(b.latest):
            r = b.latest[agent]
            log.info(
                "agent=%d steps=%d episodes=%d mean_return=%s epsilon=%s loss=%s steps_per_s=%s%s",
                agent, r.env_steps, r.episodes, _fmt(r.mean_return), _fmt(r.epsilon, 3),
                _fmt(r.loss, 4), _fmt(r.env_steps_per_s, 0),
                "" if r.loading is None else f" loading_log={r.loading:.0%}",
            )  # fmt: skip
