"""Agent identities: a hive's numbered agents and a collective's StatefulSet pods, agent k for ordinal k."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from borgdqn.config import BorgConfig, EpsilonLadder, HiveConfig, ReplayConfig
from borgdqn.rl.adder import STREAMS_PER_AGENT
from borgdqn.rl.identity import MAX_AGENT_IDS, agent_seed, collective_member, hive_agent, ladder_position
from borgdqn.rl.schedules import epsilon_ladder

LADDER = EpsilonLadder(enabled=True, base=0.4, alpha=7.0)


def _config(agents: int = 1, steps: int = 1000) -> BorgConfig:
    return BorgConfig(hive=HiveConfig(agents=agents, steps=steps, seed=7), epsilon_ladder=LADDER,
                      replay=ReplayConfig(backend="redis", redis_url="redis://memory:6379/0"))


def _pod_names(n: int, statefulset: str = "pong-agents") -> list[str]:
    # What a StatefulSet names its pods: NAME-agents-<ordinal>.
    return [f"{statefulset}-{k}" for k in range(n)]


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


def test_a_member_is_agent_k_of_its_pod_name_every_time_its_pod_comes_back() -> None:
    config = _config()
    member = collective_member(config, "pong-agents-3")
    assert member == collective_member(config, "pong-agents-3")  # a restart, a replacement, a roll: the same
    assert (member.agent_id, member.label) == (3, "pong-agents-3")
    # The collective's name is not part of the identity: agent 3 of any collective has agent 3's numbers.
    assert collective_member(config, "breakout-agents-3").seed == member.seed


def test_members_never_share_ids_streams_or_seeds_and_never_meet_hive_agents() -> None:
    config = _config(steps=5000)
    members = [collective_member(config, name) for name in _pod_names(MAX_AGENT_IDS)]
    assert [m.agent_id for m in members] == list(range(MAX_AGENT_IDS))
    bases = [m.stream_base for m in members]
    # Each member owns STREAMS_PER_AGENT stream ids from its base: no two ranges overlap.
    assert all(b - a >= STREAMS_PER_AGENT for a, b in itertools.pairwise(bases))
    assert bases[0] >= 256 * STREAMS_PER_AGENT  # above a hive's largest (256 agents)
    seeds = [m.seed for m in members]
    assert all(b - a >= 1024 for a, b in itertools.pairwise(seeds))  # envs use seed + e, e < 1024
    assert seeds[0] > agent_seed(7, 255)
    assert all(m.steps == 5000 and not m.reports_memory for m in members)


@pytest.mark.parametrize("replicas", [1, 2, 3, 5, 8, 13, 64, 1000])
def test_any_number_of_members_spreads_over_the_whole_epsilon_ladder(replicas: int) -> None:
    members = [collective_member(_config(), name) for name in _pod_names(replicas)]
    low, high = 0.4 ** (1 + 7.0), 0.4
    epsilons = [m.ladder_epsilon for m in members]
    assert all(e is not None and low <= e <= high for e in epsilons)
    assert epsilons[0] == high  # agent 0 explores most, as in Ape-X
    # Their positions on the ladder leave no gap wider than 2/N: a scaled hive still covers it.
    positions = sorted(ladder_position(k) for k in range(replicas))
    assert len(set(positions)) == replicas
    assert max(b - a for a, b in itertools.pairwise([*positions, 1.0])) <= 2 / replicas


def test_scaling_moves_nobody_on_the_ladder() -> None:
    config = _config()
    three = [collective_member(config, name).ladder_epsilon for name in _pod_names(3)]
    eight = [collective_member(config, name).ladder_epsilon for name in _pod_names(8)]
    assert eight[:3] == three
    assert collective_member(config.model_copy(update={"epsilon_ladder": EpsilonLadder()}),
                             "pod-0").ladder_epsilon is None


@pytest.mark.parametrize("name", ["", "-leading-dash", "has/slash", "x" * 62 + "-1", "spaces in-1",
                                  "pong-agents-7d9f8c6b5-x2x4z", "pong-agents", "pong-agents-01",
                                  f"pong-agents-{MAX_AGENT_IDS}"])
def test_a_member_name_must_be_an_agent_pods_name(name: str) -> None:
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
        args += ["--member", "pod-0"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
