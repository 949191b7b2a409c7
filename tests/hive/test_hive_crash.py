"""Crash drills for the local hive: an agent SIGKILLed stops the hive with its cause and log tail; the runner
SIGKILLed takes its agents with it, each saving first; a memory that /dev/shm cannot hold is one line, exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from borgdqn.rl.checkpoint import agent_checkpoint_path, read_checkpoint
from tests.support.conditions import eventually

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BUDGET = 10_000_000  # far more than any drill runs: the hive only ends because of the drill

pytestmark = pytest.mark.integration


def start_hive(out: Path, log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "borgdqn", "train", "--config", str(EXAMPLES / "cartpole.yaml"), "--out", str(out),
            "--steps", str(BUDGET), "--no-live", "--set", "hive.report_every_s=0.5",
            "--set", "learner.learning_starts=200"]
    with log.open("wb") as sink:
        return subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)


def agent_pids(runner: int) -> dict[int, int]:
    """Agent id -> pid of the runner's agent processes (they name themselves borg-agent-<k>)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == runner and comm.startswith("borg-agent-"):
            found[int(comm.removeprefix("borg-agent-"))] = int(entry.name)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def learning(out: Path) -> bool:
    """Both agents write train records: their loops run (and the memory is warm)."""
    return all((out / "metrics" / f"agent-{a}.jsonl").exists()
               and '"kind":"train"' in (out / "metrics" / f"agent-{a}.jsonl").read_text() for a in (0, 1))


def learning_hive(out: Path, log: Path) -> tuple[subprocess.Popen[bytes], dict[int, int]]:
    """A 2-agent hive whose agents both learn; its runner and the agents' pids."""
    runner = start_hive(out, log)
    try:
        eventually(lambda: learning(out) and len(agent_pids(runner.pid)) == 2, "both agents learning", 120, 0.2)
    except BaseException:
        runner.kill()
        raise
    return runner, agent_pids(runner.pid)


def test_an_agent_killed_stops_the_hive_with_its_cause_and_log_tail(tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "runner.log"
    runner, pids = learning_hive(out, log)
    try:
        os.kill(pids[1], signal.SIGKILL)
        assert runner.wait(timeout=120) == 1, log.read_text()[-3000:]
    finally:
        runner.kill()
    output = log.read_text()
    assert "borgdqn-agent-1 died (killed by SIGKILL); stopping the hive" in output, output[-3000:]
    assert "agent 1 died (killed by SIGKILL); " in output, output[-3000:]
    # The tail of agent 1's own log comes with it.
    last_line = (out / "logs" / "agent-1.log").read_text().splitlines()[-1]
    assert last_line in output
    assert not alive(pids[0]), "agent 0 stopped with the hive"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hive"]["env_steps"] < BUDGET


def test_the_runner_killed_takes_its_agents_with_it_and_each_saves(tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "runner.log"
    runner, pids = learning_hive(out, log)
    try:
        killed_at = time.time()
        runner.kill()
        runner.wait(timeout=10)
        eventually(lambda: not any(alive(pid) for pid in pids.values()), "the orphaned agents gone", 60, 0.2)
    finally:
        runner.kill()
        for pid in agent_pids(runner.pid).values():
            os.kill(pid, signal.SIGKILL)
    for agent in (0, 1):
        path = agent_checkpoint_path(out, agent)
        assert path.stat().st_mtime >= killed_at, f"agent {agent} saved when its runner died"
        assert read_checkpoint(path)[1].env_steps > 0
    leftovers = [p.name for p in Path("/dev/shm").glob(f"borgdqn-replay-{runner.pid}-*")]
    eventually(lambda: not list(Path("/dev/shm").glob(f"borgdqn-replay-{runner.pid}-*")),
               f"the hive's shared memory freed ({leftovers})", 30, 0.2)


def test_a_memory_dev_shm_cannot_hold_is_one_line_and_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # 3e9 CartPole steps need ~180 GB of shared memory: more than this machine's /dev/shm has free.
    proc = subprocess.run([sys.executable, "-m", "borgdqn", "train", "--env", "CartPole-v1", "--out", str(out),
                           "--no-live", "--set", "replay.capacity=3000000000"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("borgdqn: error: replay.capacity 3,000,000,000: the replay memory needs "), last
    assert "GB of shared memory and /dev/shm has" in last and "--shm-size" in last
    assert "Traceback" not in proc.stderr
    assert not out.exists(), "nothing was left to --resume"
