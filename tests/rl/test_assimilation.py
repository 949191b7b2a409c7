"""Assimilation (population-based training's exploit/explore between agents): who adopts whom, what is adopted,
the run-dir model store it reads on one machine, a collective member adopting from the Redis store, and the
issue's drill: a crippled agent of a 3-agent CartPole hive is assimilated and then plays like its healthy fellows,
and without assimilation it learns nothing (docs/assimilation.md says why the bar is relative)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from borgdqn.config import AssimilationConfig, BorgConfig, ConfigError, agent_config, build_config
from borgdqn.hive import train
from borgdqn.memory.redis.client import REDIS_PASSWORD_ENV
from borgdqn.memory.redis.model_store import ModelEntry, RedisModelStore
from borgdqn.metrics import read_records
from borgdqn.rl.assimilation import adopt, choose_donor, perturbed
from borgdqn.rl.checkpoint import (
    AgentCheckpoint,
    CheckpointError,
    agent_checkpoint_path,
    checkpoint_bytes,
    read_checkpoint,
    write_checkpoint,
)
from borgdqn.rl.envs import make_vector_env
from borgdqn.rl.learner import Learner
from borgdqn.rl.model_store import RunDirModelStore
from tests.harness.redis import RedisServer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def entry(agent: int, mean: float | None, steps: int = 1000) -> ModelEntry:
    return ModelEntry(agent=agent, env_steps=steps, best_mean=mean, size_bytes=0, saved_unix=1.0, mean_return=mean)


def cartpole(**overrides: Any) -> BorgConfig:
    return build_config(yaml_path=EXAMPLES / "cartpole.yaml", environ={}, overrides=overrides)


# ------------------------------------------------------------------------------------------ who adopts whom
def test_the_bottom_adopts_from_the_top_and_no_one_else_adopts() -> None:
    cfg = AssimilationConfig(enabled=True, bottom=0.25, top=0.25)
    entries = {k: entry(k, float(10 * k)) for k in range(8)}  # agent 0 worst ... agent 7 best
    rng = np.random.default_rng(0)
    donors = {choose_donor(entries, a, cfg, rng).agent for a in (0, 1) for _ in range(50)}  # type: ignore[union-attr]
    assert donors == {6, 7}, "the bottom quarter draws from the top quarter, both of them"
    assert all(choose_donor(entries, a, cfg, rng) is None for a in range(2, 8))


def test_agents_without_a_mean_are_not_ranked_and_a_tie_is_no_reason_to_adopt() -> None:
    cfg = AssimilationConfig(enabled=True, bottom=0.5, top=0.5)
    rng = np.random.default_rng(0)
    assert choose_donor({0: entry(0, None), 1: entry(1, 100.0)}, 0, cfg, rng) is None  # 0 has no mean yet
    assert choose_donor({0: entry(0, 5.0), 1: entry(1, None)}, 0, cfg, rng) is None  # nobody to compare with
    assert choose_donor({0: entry(0, 5.0), 1: entry(1, 5.0)}, 0, cfg, rng) is None
    assert choose_donor({0: entry(0, 5.0), 1: entry(1, 6.0)}, 0, cfg, rng).agent == 1  # type: ignore[union-attr]
    assert choose_donor({1: entry(1, 6.0)}, 0, cfg, rng) is None  # not in the store: not ranked


def test_perturbations_scale_by_a_factor_within_bounds() -> None:
    cfg = AssimilationConfig(factors=(0.5, 2.0))
    rng = np.random.default_rng(1)
    seen = {perturbed(1e-3, cfg, (1e-6, 1e-2), rng) for _ in range(40)}
    assert seen == {5e-4, 2e-3}
    assert {perturbed(0.4, cfg, (0.0, 0.5), rng) for _ in range(40)} == {0.2, 0.5}  # 0.8 clipped to 0.5


def test_settings_that_cannot_work_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="bottom \\+ top must not exceed 1"):
        cartpole(**{"hive.assimilation.bottom": 0.6, "hive.assimilation.top": 0.5})
    with pytest.raises(ConfigError, match=r"agent 2: learner\.lr"):
        cartpole(**{"hive.learner_by_agent": {2: {"lr": -1.0}}})
    proc = subprocess.run([sys.executable, "-m", "borgdqn", "train", "--config", str(EXAMPLES / "cartpole.yaml"),
                           "--set", "hive.assimilation.factors=[0.0, 1.2]", "--no-live"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "factors must be positive" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_learner_by_agent_changes_that_agent_only() -> None:
    config = cartpole(**{"hive.learner_by_agent": {"2": {"lr": 1e-6}}})
    assert agent_config(config, 2).learner.lr == 1e-6
    assert agent_config(config, 2).learner.batch_size == config.learner.batch_size
    assert agent_config(config, 1).learner.lr == config.learner.lr == 1e-3


# ------------------------------------------------------------------------------------------ what is adopted
def _learner(config: BorgConfig, seed: int) -> Learner:
    env = make_vector_env(config.env, seed=seed)
    try:
        return Learner(config.network, config.learner, env.spec, config.env.frame_stack, seed=seed)
    finally:
        env.close()


def test_adopting_takes_the_donors_networks_moments_and_rate_and_keeps_the_update_count() -> None:
    donor_config = cartpole(**{"learner.lr": 3e-3})
    donor = _learner(donor_config, seed=1)
    donor.updates = 999
    mine = _learner(cartpole(), seed=2)
    mine.updates = 7
    state = AgentCheckpoint(agent=1, env_steps=500, learner=donor.state_dict())
    data = checkpoint_bytes(state, donor_config)

    adopted, rate = adopt(mine, data, "agent 1's checkpoint")
    assert adopted.env_steps == 500 and rate == mine.learning_rate == 3e-3
    assert mine.updates == 7
    for ours, theirs in zip(mine.online.state_dict().values(), donor.online.state_dict().values(), strict=True):
        assert np.array_equal(ours.numpy(), theirs.numpy())

    # A donor assimilation gave its own rate: that one travels (not its config's).
    data = checkpoint_bytes(dataclasses.replace(state, learning_rate=5e-4), donor_config)
    assert adopt(mine, data, "agent 1's checkpoint")[1] == mine.learning_rate == 5e-4


def test_a_donor_of_another_shape_is_refused_and_nothing_is_loaded() -> None:
    other_config = cartpole(**{"network.mlp_hidden": [16]})
    other = _learner(other_config, seed=1)
    mine = _learner(cartpole(), seed=2)
    before = [t.clone() for t in mine.online.state_dict().values()]
    data = checkpoint_bytes(AgentCheckpoint(agent=1, learner=other.state_dict()), other_config)
    with pytest.raises(CheckpointError, match="another shape"):
        adopt(mine, data, "agent 1's checkpoint")
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(before, mine.online.state_dict().values(),
                                                                    strict=True))
    assert mine.learning_rate == 1e-3


def _rate_in_checkpoint(run: Path) -> tuple[float | None, float]:
    state = read_checkpoint(agent_checkpoint_path(run, 0))[1]
    return state.learning_rate, state.learner["optimizer"]["param_groups"][0]["lr"]


@pytest.mark.integration
def test_an_adopted_rate_survives_resume_unless_the_config_changes_the_rate(tmp_path: Path) -> None:
    run = tmp_path / "run"

    def session(steps: int, **extra: Any) -> None:
        train(cartpole(**{"hive.out": str(run), "hive.agents": 1, "hive.steps": steps, "hive.live": "off",
                          "env.num_envs": 2, "learner.learning_starts": 100, **extra}), resume=run.exists())

    session(300)
    # As an assimilation leaves it: the donor's rate, perturbed, in the agent's state.
    saved_config, state = read_checkpoint(agent_checkpoint_path(run, 0))
    write_checkpoint(agent_checkpoint_path(run, 0),
                     checkpoint_bytes(dataclasses.replace(state, learning_rate=2.5e-3), saved_config))
    session(600)
    assert _rate_in_checkpoint(run) == (2.5e-3, 2.5e-3), "the learner trained on with the adopted rate"
    session(900, **{"learner.lr": 5e-4})  # the user sets a new rate: theirs wins
    assert _rate_in_checkpoint(run) == (None, 5e-4)


# ------------------------------------------------------------------------------------------ the run-dir store
def test_the_run_dir_store_keeps_each_agents_checkpoint_and_entry_and_skips_torn_entries(tmp_path: Path) -> None:
    store = RunDirModelStore(tmp_path)
    assert (store.get(0), store.entries()) == (None, {})
    assert store.put(entry(0, 12.5), b"zero") == 4
    assert store.put(entry(1, None), b"one!!") == 9
    assert store.get(0) == b"zero" == agent_checkpoint_path(tmp_path, 0).read_bytes()
    assert store.entries() == {0: dataclasses.replace(entry(0, 12.5), size_bytes=4),
                               1: dataclasses.replace(entry(1, None), size_bytes=5)}
    (tmp_path / "checkpoints" / "agent-2.json").write_text('{"agent": 2, "env_steps": "x"')  # torn
    (tmp_path / "checkpoints" / "agent-3.json").write_text(entry(4, 1.0).to_json())  # under another agent's name
    assert sorted(store.entries()) == [0, 1]


# ------------------------------------------------------------------------------------------ in a collective
@pytest.mark.integration
def test_a_collective_member_adopts_a_better_agent_from_the_redis_store(
        redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REDIS_PASSWORD_ENV, redis_server.password)
    name = f"as-{uuid.uuid4().hex[:8]}"

    def member(out: Path, steps: int, **extra: Any) -> BorgConfig:
        overrides = {"replay.backend": "redis", "replay.redis_url": f"redis://127.0.0.1:{redis_server.port}/0",
                     "replay.redis_name": name, "replay.capacity": 5000, "learner.learning_starts": 100,
                     "hive.out": str(out), "hive.agents": 1, "hive.steps": steps, "hive.live": "off", "env.num_envs": 2,
                     **extra}
        return build_config(yaml_path=EXAMPLES / "cartpole.yaml", environ={}, overrides=overrides)

    # Agent 0 of the collective trains a little with its own rate; the store then says it is far better.
    train(member(tmp_path / "pod-0", 600, **{"learner.lr": 3e-3}), member=f"{name}-agents-0")
    client = redis.Redis.from_url(redis_server.url)
    store = RedisModelStore(client, name, budget_bytes=1 << 30)
    try:
        data = store.get(0)
        assert data is not None
        store.put(dataclasses.replace(store.entries()[0], mean_return=500.0), data)

        out = tmp_path / "pod-1"
        train(member(out, 2000, **{"hive.assimilation.enabled": True, "hive.assimilation.every": 1000}),
              member=f"{name}-agents-1")
        records = list(read_records(out, "assimilation"))
        assert records, "agent 1 (mean ~20 over its first 20 random games) adopted nothing"
        assert {(r["agent"], r["donor"], r["donor_mean_return"]) for r in records} == {(1, 0, 500.0)}
        assert records[0]["donor_env_steps"] == 600
        final = read_checkpoint(agent_checkpoint_path(out, 1))[1]
        assert final.learning_rate is not None and final.learning_rate in (pytest.approx(3e-3 * 0.8),
                                                                            pytest.approx(3e-3 * 1.25))
        assert store.entries()[1].env_steps == 2000  # its own state went to the store, under its own id
    finally:
        store.close()


# ------------------------------------------------------------------------------------------ the bar
def _crippled_hive(out: Path, assimilation: bool, steps: int) -> dict[str, Any]:
    overrides = {"hive.out": str(out), "hive.agents": 3, "hive.steps": steps, "hive.live": "off",
                 "hive.learner_by_agent": {2: {"lr": 1e-6}},  # 1,000x too small
                 "hive.assimilation.enabled": assimilation, "hive.assimilation.every": 4000,
                 "hive.assimilation.bottom": 0.34, "hive.assimilation.top": 0.34,
                 # Each agent stops at CartPole's bar on its own; the stopped ones stay donors in the store.
                 "hive.stop_at_mean_return": 475, "hive.stop_when": "each"}
    train(build_config(yaml_path=EXAMPLES / "cartpole.yaml", environ={}, overrides=overrides))
    return json.loads((out / "summary.json").read_text())


# Env steps per agent. Measured (2 cores, 2026-12-06): ~150 s a run of 70k; without assimilation agent 2's best
# mean of 20 stayed under 30 while the others reached 439-500; with it agent 2 adopted twice or three times and
# reached 493-500 by 60k steps of its own (459 once with checks every 8000 steps, and 456 once at 70k with checks
# every 4000 while the whole hive did worse than usual: hence 4000 and 85k). A learning rate of 1e-6 learns
# nothing in any budget (its best mean of 20 stayed under 30 in 35k), so the run without assimilation stops at 20k.
# Since 2026-12-08 each agent stops on its own at 475 (hive.stop_when each): the healthy ones when they get there,
# the adopter when it does (or at its budget); the stopped agents' last states stay donors in the store.
CRIPPLED_HIVE_STEPS_ON = 3 * 85_000
CRIPPLED_HIVE_STEPS_OFF = 3 * 20_000


@pytest.mark.slow
def test_a_crippled_agent_is_assimilated_and_plays_like_its_healthy_fellows_and_alone_it_learns_nothing(
        tmp_path: Path) -> None:
    off = _crippled_hive(tmp_path / "off", assimilation=False, steps=CRIPPLED_HIVE_STEPS_OFF)
    assert not list(read_records(tmp_path / "off", "assimilation"))
    crippled_off = off["agents"]["2"]["best_mean_return_20"]
    assert crippled_off is None or crippled_off < 200, off["agents"]

    on = _crippled_hive(tmp_path / "on", assimilation=True, steps=CRIPPLED_HIVE_STEPS_ON)
    adopted = [r for r in read_records(tmp_path / "on", "assimilation") if r["agent"] == 2]
    assert adopted, "the crippled agent was never assimilated"
    assert adopted[0]["learning_rate"] >= 1e-3 * 0.8 * 0.8, "it goes on with a donor's rate, not its own"
    episodes = [r for r in read_records(tmp_path / "on", "episode") if r["agent"] == 2
                and r["env_steps"] > adopted[0]["env_steps"]]
    returns = [r["return"] for r in episodes]
    best = max(np.mean(returns[i:i + 20]) for i in range(len(returns) - 19))
    # Adopted, it plays like its healthy fellows (what PBT's exploit step promises) and far beyond what it reached
    # alone. Not the fixed CartPole bar: this 3-agent hive's healthy agents themselves peak at 480-500 around 32k
    # steps and then decline, and the adopter, taking a donor's latest state, ended 433-465 in 3 of 8 runs
    # (2026-12-06/07) and 493-500 in the rest.
    healthy = min(on["agents"][str(k)]["best_mean_return_20"] for k in (0, 1))
    assert best >= max(2 * 200, 0.85 * healthy), (best, on["agents"])
