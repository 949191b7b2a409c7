"""``borgdqn export`` and ``borgdqn eval`` of an export: from a run dir and from a collective's model store (a real
Redis), the weights are the agent's own and play exactly as its checkpoint does; a bad export is one line and
exit 2. The checkpoint is a real one, from a short CartPole run of the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
import torch
from safetensors.torch import load_file, save_file

from borgdqn.memory.redis.model_store import ModelEntry, RedisModelStore
from borgdqn.rl.checkpoint import read_checkpoint
from tests.harness.redis import RedisServer

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def borgdqn(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **(env or {})}
    environ.pop("BORG_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "borgdqn", *map(str, args)], capture_output=True, text=True,
                          timeout=180, env=environ)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    done = borgdqn("train", "--config", EXAMPLES / "cartpole.yaml", "--agents", "2", "--steps", "1200", "--out", out,
                   "--set", "learner.learning_starts=100", "--set", "replay.capacity=2000", "--set",
                   "network.mlp_hidden=[16]", "--set", "env.num_envs=2", "--no-live")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def returns(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr[-2000:]
    return [line for line in result.stdout.splitlines() if line.startswith("episode ")]


def one_line_exit_2(result: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines and lines[-1].startswith("borgdqn: error: ") and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[-1], lines[-1]


def test_an_export_of_a_run_is_its_best_agents_network_and_plays_as_its_checkpoint(run: Path, tmp_path: Path) -> None:
    bests = {k: read_checkpoint(run / "checkpoints" / f"agent-{k}-best.pt")[1].best_mean for k in (0, 1)}
    best = max((k for k in bests if bests[k] is not None), key=lambda k: bests[k] or 0.0)
    out = tmp_path / "model"
    exported = borgdqn("export", run, "--out", out)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert f"exported agent {best} " in exported.stdout
    meta = json.loads((out / "model.json").read_text())
    assert (meta["format"], meta["agent"], meta["env"]["id"], meta["num_actions"]) == ("borgdqn.export.v1", best,
                                                                                         "CartPole-v1", 2)
    checkpoint = run / "checkpoints" / f"agent-{best}-best.pt"
    online = read_checkpoint(checkpoint)[1].learner["online"]
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == online.keys() and all(torch.equal(weights[k], online[k]) for k in online)
    # The same greedy games: the export plays exactly as the checkpoint it came from.
    assert returns(borgdqn("eval", out, "--episodes", "3")) == returns(borgdqn("eval", checkpoint, "--episodes", "3"))

    other = 1 - best
    named = borgdqn("export", run, "--agent", str(other), "--out", tmp_path / "other")
    assert named.returncode == 0 and f"exported agent {other} " in named.stdout, named.stderr[-2000:]


def test_an_export_from_a_collectives_model_store(run: Path, tmp_path: Path, redis_server: RedisServer) -> None:
    name = uuid.uuid4().hex[:8]
    client = redis.Redis.from_url(redis_server.url)
    store = RedisModelStore(client, name, budget_bytes=1 << 30)
    memory = ["--memory", f"redis://127.0.0.1:{redis_server.port}/0", "--name", name]
    env = {"BORG_REDIS_PASSWORD": redis_server.password}
    try:
        data = (run / "checkpoints" / "agent-1.pt").read_bytes()
        state = read_checkpoint(run / "checkpoints" / "agent-1.pt")[1]
        store.put(ModelEntry(agent=1, env_steps=state.env_steps, best_mean=None, size_bytes=0, saved_unix=0.0), data)
        one_line_exit_2(borgdqn("export", *memory, "--out", tmp_path / "x", env=env), "no best agent yet")
        one_line_exit_2(borgdqn("export", *memory, "--agent", "5", "--out", tmp_path / "x", env=env),
                        "holds no checkpoint of agent 5")
        store.put(ModelEntry(agent=1, env_steps=state.env_steps, best_mean=12.5, size_bytes=0, saved_unix=0.0), data)
        exported = borgdqn("export", *memory, "--out", tmp_path / "store", env=env)
        assert exported.returncode == 0, exported.stderr[-2000:]
        assert "exported agent 1 " in exported.stdout and redis_server.password not in exported.stdout
        weights = load_file(str(tmp_path / "store" / "model.safetensors"))
        assert all(torch.equal(weights[k], v) for k, v in state.learner["online"].items())
        assert returns(borgdqn("eval", tmp_path / "store", "--episodes", "1"))
    finally:
        client.close()


def test_a_bad_export_is_one_line_and_exit_2(run: Path, tmp_path: Path) -> None:
    good = tmp_path / "good"
    assert borgdqn("export", run, "--agent", "0", "--out", good).returncode == 0

    def broken(name: str) -> Path:
        path = tmp_path / name
        shutil.copytree(good, path)
        return path

    garbled = broken("garbled")
    (garbled / "model.json").write_text("{not json")
    one_line_exit_2(borgdqn("eval", garbled), "is not a borgdqn export's description")

    truncated = broken("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    one_line_exit_2(borgdqn("eval", truncated), "cannot read", "truncated")

    reshaped = broken("reshaped")
    weights = load_file(str(reshaped / "model.safetensors"))
    first = next(iter(weights))
    weights[first] = torch.zeros(3, 3)
    save_file(weights, str(reshaped / "model.safetensors"))
    one_line_exit_2(borgdqn("eval", reshaped), "does not fit its network", first)

    elsewhere = broken("elsewhere")  # CartPole's network, described as Acrobot's game (6 numbers, 3 actions)
    meta = json.loads((elsewhere / "model.json").read_text())
    meta["env"]["id"] = "Acrobot-v1"
    (elsewhere / "model.json").write_text(json.dumps(meta))
    one_line_exit_2(borgdqn("eval", elsewhere), "was exported for frames (4,) and 2 actions", "Acrobot-v1")

    one_line_exit_2(borgdqn("export", "--out", tmp_path / "none"), "give a run directory or --memory")
    one_line_exit_2(borgdqn("export", tmp_path / "nowhere", "--out", tmp_path / "none"), "holds no checkpoints")
