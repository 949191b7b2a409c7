"""benchmarks/gpu_run.sh end to end on the CPU with a tiny budget, so that the one-command GPU run cannot rot.

Stand-in: the CPU plays the GPU (no GPU here): ``BORG_DEVICE=cpu`` runs the eager row only (bf16 and CUDA-graph
rows are CUDA's), against the same CPU fp32 check. The wheels are real: ``gpu_wheels.py`` fetches them from PyPI
for this interpreter (the GPU machine gets the cp312 set) and the script installs them with ``--no-index``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def _run_script(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT)],
        env={**os.environ, "OUT": str(out), **env},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


@pytest.mark.integration
@pytest.mark.slow
def test_gpu_run_end_to_end_on_cpu_with_its_wheels(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    made = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_wheels.py"), "--out", str(wheels),
         "--python-version", PYTHON_VERSION],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    names = {w.name.split("-")[0].lower() for w in wheels.glob("*.whl")}
    assert {"borgdqn", "gymnasium", "ale_py", "pydantic", "numpy", "matplotlib"} <= names
    assert not names & {"torch", "redis", "aiokafka", "elasticsearch", "pytest"}, names

    out = tmp_path / "out"
    done = _run_script(
        out,
        BORG_WHEELS=str(wheels),
        BORG_DEVICE="cpu",
        BORG_BUDGET_S="130",
        BORG_BATCHES="32",
        BORG_BENCH_S="1",
        BORG_AGENTS="1",
        BORG_CONCURRENT_STEPS="320",
        # Games cut at 100 steps: the returns plot needs a finished game, and a Pong game takes ~1,000 steps, more
        # than the seconds left here give on a slow start (one CI run ended with none).
        BORG_TRAIN_SET="env.num_envs=2 env.max_episode_steps=100 learner.learning_starts=100 replay.capacity=5000 "
                       "hive.checkpoint_every=500",
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    env = (out / "env.txt").read_text()
    # The wheels were installed and used: gymnasium comes from the script's own site directory.
    gymnasium_line = next(line for line in env.splitlines() if line.startswith("gymnasium "))
    assert "/site/gymnasium/" in gymnasium_line and "site-packages" not in gymnasium_line, env

    learner = json.loads((out / "learner.json").read_text())
    assert [(r["variant"], r["batch"], r["agrees"]) for r in learner["rows"]] == [("eager fp32", 32, True)]
    assert learner["rows"][0]["updates_per_s"] > 0
    assert "| eager fp32 | 32 |" in (out / "learner.md").read_text()

    # The concurrency comparison ran both ways and held the ratio (the script refuses a table where it did not).
    concurrent = (out / "concurrent.md").read_text()
    rows = {line.split("|")[2].strip(): line.split("|")[4].strip() for line in concurrent.splitlines()
            if line.startswith("| 1 |")}
    assert set(rows) == {"inline", "concurrent", "acting only"}, concurrent
    assert rows["inline"] == rows["concurrent"] != "0" and rows["acting only"] == "0", concurrent

    summary = json.loads((out / "pong" / "summary.json").read_text())
    assert summary["interrupted"] is True  # stopped by the budget, the clean way
    assert summary["hive"]["env_steps"] > 100 and summary["hive"]["episodes"] > 0, summary
    records = [json.loads(line) for line in (out / "pong" / "metrics" / "agent-0.jsonl").read_text().splitlines()]
    assert max(r.get("updates", 0) for r in records if r["kind"] == "train") > 0  # it learned, not only acted
    assert {p.name for p in (out / "pong" / "plots").glob("*.png")} >= {"run-training.png", "run-returns-by-agent.png"}
    assert "| agents | env steps |" in (out / "pong" / "figures.md").read_text()
    assert not list(out.rglob("*.pt")), "checkpoints stay in the scratch directory"


def test_gpu_run_says_what_is_missing(tmp_path: Path) -> None:
    no_out = subprocess.run(["bash", str(SCRIPT)], env={k: v for k, v in os.environ.items() if k != "OUT"},
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert no_out.returncode != 0 and "set OUT" in no_out.stderr

    no_wheels = _run_script(tmp_path / "out", BORG_WHEELS=str(tmp_path / "nowhere"))
    assert no_wheels.returncode == 2
    assert "no wheels under" in no_wheels.stdout and "gpu_wheels.py --out" in no_wheels.stdout
