"""Acting and learning at the same time (learner.concurrent): the same updates as inline, a failing learner thread
surfaces in the agent, and checkpoints see a learner that holds still."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from borgdqn.config import BorgConfig, build_config
from borgdqn.memory.shared.replay import SharedReplay
from borgdqn.rl.adder import ChunkAdder
from borgdqn.rl.agent import sampling_spec
from borgdqn.rl.learner import Learner
from borgdqn.rl.learning import ConcurrentLearning, InlineLearning, make_learning

pytestmark = pytest.mark.integration


def _train(out: Path, concurrent: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "borgdqn", "train", "--env", "CartPole-v1", "--agents", "1", "--steps", "4000",
         "--seed", "3", "--no-live", "--out", str(out), f"--set=learner.concurrent={concurrent}",
         "--set=learner.learning_starts=1000", "--set=learner.rate_limit_slack=4"],
        capture_output=True, text=True, timeout=300, check=False)


def _final_train_record(out: Path) -> dict[str, object]:
    lines = (out / "metrics" / "agent-0.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if '"kind":"train"' in line]
    return records[-1]


def test_concurrent_learning_takes_the_updates_inline_learning_takes(tmp_path: Path) -> None:
    """One agent on CartPole, 4,000 env steps: inline and concurrent learning end with the same number of updates
    (one per update_every steps after the warm-up), and the concurrent one did learn in its own thread."""
    runs = {mode: _train(tmp_path / mode, mode) for mode in ("off", "on")}
    for mode, run in runs.items():
        assert run.returncode == 0, (mode, run.stderr[-3000:])
    inline, concurrent = _final_train_record(tmp_path / "off"), _final_train_record(tmp_path / "on")
    assert inline["env_steps"] == concurrent["env_steps"] == 4000
    # The preset's update_every is 2, the memory is warm after 1,000 steps (+ a chunk): about 1,500 updates.
    assert 1400 <= int(str(inline["updates"])) <= 1500
    assert concurrent["updates"] == inline["updates"]
    logs = {mode: (tmp_path / mode / "logs" / "agent-0.log").read_text() for mode in runs}
    assert "concurrent learning: " not in logs["off"]
    line = next(text for text in logs["on"].splitlines() if "concurrent learning: " in text)
    assert f"concurrent learning: {inline['updates']} updates, 0 forgone" in line, line


@dataclass(frozen=True)
class _Spec:
    frame_shape: tuple[int, ...]
    is_image: bool = False
    num_actions: int = 2


def _filled_memory(steps: int, actor_sync_every: int = 10) -> tuple[SharedReplay, BorgConfig]:
    """A private memory holding ``steps`` steps of one made-up CartPole-shaped stream, and a small config."""
    config = build_config(environ={}, overrides={"env.id": "CartPole-v1", "env.frame_stack": 1,
                                                 "network.mlp_hidden": [8], "learner.batch_size": 8,
                                                 "learner.learning_starts": 64, "learner.update_every": 1,
                                                 "learner.concurrent": "on", "learner.device": "cpu",
                                                 "learner.actor_sync_every": actor_sync_every})
    memory = SharedReplay.create(1024, (4,), np.float32, prioritized=True, alpha=0.6, priority_eps=1e-6,
                                 private=True, spec=sampling_spec(config))
    adder = ChunkAdder(memory, agent=0, stream_base=0, num_envs=1, chunk_length=8, frame_shape=(4,),
                       frame_dtype=np.dtype(np.float32))
    no = np.zeros(1, dtype=bool)
    for t in range(steps):
        adder.add_step(np.full((1, 4), t, np.float32), np.zeros(1, np.int64), np.ones(1, np.float32),
                       np.array([t == 0]), no, no, np.zeros(1, np.int64))
    adder.flush()
    return memory, config


def test_a_failing_learner_thread_fails_the_agent_with_its_reason() -> None:
    """A learner built for 5 features fed the memory's 4: the thread's error comes out of the actor's next step."""
    memory, config = _filled_memory(200)
    try:
        learner = Learner(config.network, config.learner, _Spec((5,)), 1, seed=0)
        learning = make_learning(learner, memory, config, lambda steps: 0.4)
        assert isinstance(learning, ConcurrentLearning)
        with pytest.raises(RuntimeError, match="the learner thread failed: ") as failed:
            for step in range(1000):
                learning.stepped(1, step + 1)
        assert isinstance(failed.value.__cause__, RuntimeError)  # torch's shape error, as the thread raised it
        assert "shape '[8, 5]' is invalid" in str(failed.value)
        with pytest.raises(RuntimeError, match="the learner thread failed"):  # and it is said again at the end
            learning.finish(drain=True)
    finally:
        memory.close()


def test_paused_holds_the_learner_still_and_refreshes_the_actor() -> None:
    memory, config = _filled_memory(200, actor_sync_every=10_000)  # only a pause refreshes the actor here
    try:
        learner = Learner(config.network, config.learner, _Spec((4,)), 1, seed=0)
        learning = make_learning(learner, memory, config, lambda steps: 0.4)
        assert isinstance(learning, ConcurrentLearning)
        obs = np.ones((1, 1, 4), np.float32)
        for step in range(64):
            learning.stepped(1, step + 1)
        with learning.paused():
            before = learner.updates
            weights = [p.detach().clone() for p in learner.online.parameters()]
            learning.stepped(8, 72)  # paid for, but the learner holds still
            assert learner.updates == before
            assert all(bool((p == w).all()) for p, w in zip(learner.online.parameters(), weights, strict=True))
            with torch.no_grad():
                for p in learner.online.parameters():  # what an adoption does: new weights
                    p.add_(1.0)
            expected, _ = learner.act(obs)
            stale, _ = learning.act(obs, None, None)
            assert not np.array_equal(stale, expected)  # the actor still has its copy of the old weights
        acted, _ = learning.act(obs, None, None)
        np.testing.assert_array_equal(acted, expected)  # on leaving the pause it acts with the new ones at once
        learning.finish(drain=True)
        assert learning.limiter.updates == 72 == learner.updates
    finally:
        memory.close()


def test_inline_is_the_default_on_a_cpu() -> None:
    memory, config = _filled_memory(10)
    try:
        config = config.model_copy(update={"learner": config.learner.model_copy(update={"concurrent": "auto"})})
        learner = Learner(config.network, config.learner, _Spec((4,)), 1, seed=0)
        assert isinstance(make_learning(learner, memory, config, lambda steps: 0.4), InlineLearning)
    finally:
        memory.close()
