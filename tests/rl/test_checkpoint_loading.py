"""Loading a checkpoint never runs code, and a bad file is one line and exit code 2, for ``borgdqn eval`` and for
``borgdqn train --resume``: a crafted file (a pickle that would run code), a truncated file, and a checkpoint of
another network shape. The checkpoint is a real one, from a short CartPole run of the real CLI."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SMALL = ["--set", "learner.learning_starts=100", "--set", "replay.capacity=2000", "--set", "network.mlp_hidden=[16]",
         "--set", "env.num_envs=2", "--no-live"]  # fmt: skip


def borgdqn(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("BORG_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "borgdqn", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    done = borgdqn("train", "--config", EXAMPLES / "cartpole.yaml", "--agents", "1", "--steps", "400", "--out", out,
                   *SMALL)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "checkpoints" / "agent-0.pt").is_file()
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


class RunsCode:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do to whoever loads it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def craft(good: Path, path: Path, marker: Path) -> None:
    """A checkpoint that is ours in every field but one, which runs code when unpickled."""
    payload = torch.load(good, weights_only=True)
    payload["state"]["recent_returns"] = RunsCode(marker)
    torch.save(payload, path)


def assert_one_line_exit_2(done: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert lines and lines[-1].startswith("borgdqn: error: "), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[-1], lines[-1]


def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    crafted = tmp_path / "agent-0.pt"
    craft(run / "checkpoints" / "agent-0.pt", crafted, marker)
    # The file is truly hostile: an unrestricted load runs its payload.
    torch.load(crafted, weights_only=False)
    assert marker.exists()
    marker.unlink()

    assert_one_line_exit_2(borgdqn("eval", crafted, "--episodes", "1"), "refused to load", str(crafted))
    assert not marker.exists()

    out = copy_run(run, tmp_path)
    craft(run / "checkpoints" / "agent-0.pt", out / "checkpoints" / "agent-0.pt", marker)
    resumed = borgdqn("train", "--config", EXAMPLES / "cartpole.yaml", "--agents", "1", "--steps", "800", "--out", out,
                      "--resume", *SMALL)  # fmt: skip
    assert_one_line_exit_2(resumed, "refused to load")
    assert not marker.exists()


def test_a_truncated_checkpoint_is_one_line_and_exit_2(run: Path, tmp_path: Path) -> None:
    out = copy_run(run, tmp_path)
    path = out / "checkpoints" / "agent-0.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_exit_2(borgdqn("eval", path, "--episodes", "1"), "cannot read checkpoint", "truncated")
    resumed = borgdqn("train", "--config", EXAMPLES / "cartpole.yaml", "--agents", "1", "--steps", "800", "--out", out,
                      "--resume", *SMALL)  # fmt: skip
    assert_one_line_exit_2(resumed, "cannot read checkpoint")
    assert path.read_bytes() == data[: len(data) // 2]  # a refused resume leaves the run as it found it


def test_a_checkpoint_of_another_network_shape_is_one_line_and_exit_2(run: Path, tmp_path: Path) -> None:
    out = copy_run(run, tmp_path)
    resumed = borgdqn("train", "--config", EXAMPLES / "cartpole.yaml", "--agents", "1", "--steps", "800", "--out", out,
                      "--resume", *SMALL, "--set", "network.mlp_hidden=[24]")  # fmt: skip
    assert_one_line_exit_2(resumed, "holds a network of another shape", "[24", "[16")

    # A file whose config claims one network and whose tensors hold another: eval builds from the config.
    path = out / "checkpoints" / "agent-0.pt"
    payload = torch.load(path, weights_only=True)
    payload["config"]["network"]["mlp_hidden"] = [24]
    torch.save(payload, path)
    assert_one_line_exit_2(borgdqn("eval", path, "--episodes", "1"), "holds a network of another shape")


def test_our_own_checkpoint_still_resumes_and_plays(run: Path, tmp_path: Path) -> None:
    out = copy_run(run, tmp_path)
    resumed = borgdqn("train", "--config", EXAMPLES / "cartpole.yaml", "--agents", "1", "--steps", "800", "--out", out,
                      "--resume", *SMALL)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = torch.load(out / "checkpoints" / "agent-0.pt", weights_only=True)["state"]["env_steps"]
    assert steps >= 800
    played = borgdqn("eval", out / "checkpoints" / "agent-0.pt", "--episodes", "2")
    assert played.returncode == 0, played.stderr[-2000:]
    assert "mean return over 2 episodes" in played.stdout
