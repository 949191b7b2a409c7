"""Agent identities: a hive's numbered agents and a collective's pods named by Kubernetes."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from borgdqn.config import BorgConfig, EpsilonLadder, HiveConfig, ReplayConfig
from borgdqn.rl.adder import STREAMS_PER_AGENT
from borgdqn.rl.identity import MAX_AGENT_IDS, agent_seed, collective_member, hive_agent
from borgdqn.rl.schedules import epsilon_ladder

LADDER = EpsilonLadder(enabled=True, base=0.4, alpha=7.0)


def _config(agents: int = 1, steps: int = 1000) -> BorgConfig:
    return BorgConfig(hive=HiveConfig(agents=agents, steps=steps, seed=7), epsilon_ladder=LADDER,
                      replay=ReplayConfig(backend="redis", redis_url="redis://memory:6379/0"))


def _pod_names(n: int) -> list[str]:
    # What a Deployment's ReplicaSet names its pods: NAME-agents-<template hash>-<5 random characters>.
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    return [f"pong-agents-7d9f8c6b5-{''.join(alphabet[(i // 27**k) % 27] for k in range(5))}" for i in range(n)]


def test_a_hive_numbers_its_agents_as_before() -> None:
    config = _config(agents=3, steps=1000)
    identities = [hive_agent(config, i) for i in range(3)]
    assert [a.agent_id for a in identities] == [0, 1, 2]
    assert [a.seed for a in identities] == [agent_seed(7, i) for i in range(3)]
    assert [a.stream_base for a in identities] == [0, STREAMS_PER_AGENT, 2 * STREAMS_PER_AGENT]
    assert [a.steps for a in identities] == [334, 333, 333]  # the first agents take the remainder
    assert [a.ladder_epsilon for a in identities] == [epsilon_ladder(i, 3, 0.4, 7.0) for i in range(3)]
    assert [a.reports_memory for a in identities] == [True, False, False]
    assert identities[2].label == "agent-2"


def test_a_member_is_the_same_agent_every_time_its_pod_restarts() -> None:
    config = _config()
    assert collective_member(config, "pong-agents-abc-x2x4z") == collective_member(config, "pong-agents-abc-x2x4z")


def test_members_never_share_streams_or_seeds_and_never_meet_hive_agents() -> None:
    config = _config(steps=5000)
    members = [collective_member(config, name) for name in _pod_names(2000)]
    bases = sorted(m.stream_base for m in members)
    # Each member owns STREAMS_PER_AGENT stream ids from its base: no two ranges overlap.
    assert all(b - a >= STREAMS_PER_AGENT for a, b in itertools.pairwise(bases))
    assert bases[0] >= 256 * STREAMS_PER_AGENT  # above a hive's largest (256 agents)
    assert bases[-1] < 1 << 62  # the memory's stream ids
    seeds = sorted(m.seed for m in members)
    assert all(b - a >= 1024 for a, b in itertools.pairwise(seeds))  # envs use seed + e, e < 1024
    assert seeds[0] > agent_seed(7, 255)
    assert all(0 <= m.agent_id < MAX_AGENT_IDS and m.steps == 5000 and not m.reports_memory for m in members)
    assert len({m.agent_id for m in members}) > 800  # spread over the id space (2000 names into 1024 ids)


def test_members_spread_over_the_whole_epsilon_ladder() -> None:
    members = [collective_member(_config(), name) for name in _pod_names(2000)]
    low, high = 0.4 ** (1 + 7.0), 0.4
    epsilons = [m.ladder_epsilon for m in members]
    assert all(e is not None and low <= e <= high for e in epsilons)
    # The position is uniform on [0, 1): about half the members are above the ladder's midpoint 0.4 ** 4.5.
    above = sum(e is not None and e > 0.4**4.5 for e in epsilons) / len(epsilons)
    assert 0.45 < above < 0.55
    assert collective_member(_config().model_copy(update={"epsilon_ladder": EpsilonLadder()}),
                             "pod-a").ladder_epsilon is None


@pytest.mark.parametrize("name", ["", "-leading-dash", "has/slash", "x" * 64, "spaces in it"])
def test_a_member_name_must_be_a_pod_name(name: str) -> None:
    with pytest.raises(ValueError, match="member name"):
        collective_member(_config(), name)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--agents", "2", "--memory", "redis://127.0.0.1:1/0"], "a member runs one agent, but hive.agents is 2"),
        (["--agents", "1"], "set replay.backend to redis"),
        (["--agents", "1", "--memory", "redis://127.0.0.1:1/0", "--member", "has/slash"], "member name"),
        (["--resume"], "not allowed with argument --resume"),
    ],
)
def test_train_member_refuses_what_a_member_cannot_be(flags: list[str], message: str, tmp_path: object) -> None:
    args = [sys.executable, "-m", "borgdqn", "train", "--env", "CartPole-v1", "--no-live", "--out", str(tmp_path),
            *flags]
    if "--member" not in flags:
        args += ["--member", "pod-a"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
