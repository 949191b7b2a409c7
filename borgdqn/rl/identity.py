"""Who an agent is: the numbers that must differ between agents that write to one replay memory.

A local hive numbers its agents 0..N-1. A collective on Kubernetes runs one agent per pod of a StatefulSet, whose
pods are named ``<statefulset>-<k>``: agent k keeps its ordinal k across container restarts, pod replacements,
config rolls, reschedules and scaling down and up, and the StatefulSet controller never runs two pods of one
ordinal at once. A member (``borgdqn train --member NAME``) takes its numbers from that ordinal:

- its agent id (what the memory counts steps by, the dashboards split by, and the run's files are named after) is
  k itself: ids are distinct among live pods and stay with the agent;
- its replay streams and seeds come from k, in a block above every local hive agent's, so two live pods never
  share a stream (a shared stream would link one pod's steps to the other's) and never play the same games;
- its place on the epsilon ladder is the k-th point of the base-2 van der Corput sequence (0, 1/2, 1/4, 3/4,
  1/8, ...): the first N points spread over the whole ladder for any N, and scaling moves nobody (Ape-X's
  ``i / (N - 1)`` would give every agent a new epsilon at each ``kubectl scale``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from borgdqn.config import BorgConfig
from borgdqn.rl.adder import STREAMS_PER_AGENT
from borgdqn.rl.schedules import epsilon_ladder, ladder_epsilon_at

# The memory's per-agent counts cover ids [0, MAX_AGENT_IDS) (SharedReplay's max_agents default); a collective
# has at most as many agent pods.
MAX_AGENT_IDS = 1024
# Members' streams and seeds start above every hive agent's (256 agents at most): the two kinds never meet.
_MEMBER_BLOCK = 256
_MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # a pod's name is a DNS label: 63 at most
_ORDINAL = re.compile(r"-(0|[1-9][0-9]*)$")


@dataclass(frozen=True)
class AgentIdentity:
    agent_id: int  # the memory's per-agent counts, file names, telemetry's ``agent`` field
    label: str  # logs and telemetry sources: ``agent-3`` in a hive, the pod's name in a collective
    seed: int  # envs use seed + e; the network and the policy use seed
    stream_base: int  # env e writes replay stream stream_base + e
    steps: int  # env steps this agent runs
    ladder_epsilon: float | None  # where the epsilon ladder ends this agent's exploration (None: no ladder)
    reports_memory: bool  # writes the memory's records: agent 0 of a hive (a collective has its memory monitor)


def agent_seed(base: int, agent: int) -> int:
    # Far-apart seeds: agent i's envs use seed + e, so consecutive agents must not overlap.
    return base * 1_000_003 + agent * 10_007


def hive_agent(config: BorgConfig, agent: int) -> AgentIdentity:
    """Agent ``agent`` of a local hive of ``hive.agents``; the first agents take the step budget's remainder."""
    hive = config.hive
    ladder = config.epsilon_ladder
    return AgentIdentity(
        agent_id=agent,
        label=f"agent-{agent}",
        seed=agent_seed(hive.seed, agent),
        stream_base=agent * STREAMS_PER_AGENT,
        steps=hive.steps // hive.agents + (1 if agent < hive.steps % hive.agents else 0),
        ladder_epsilon=epsilon_ladder(agent, hive.agents, ladder.base, ladder.alpha) if ladder.enabled else None,
        reports_memory=agent == 0,
    )


def member_ordinal(name: str) -> int:
    """The ordinal ``k`` of the StatefulSet pod ``name`` (``<statefulset>-<k>``); ValueError for another name."""
    found = _ORDINAL.search(name) if _MEMBER_NAME.match(name) else None
    if found is None:
        raise ValueError(f"member name {name!r}: give the agent pod's name, <statefulset>-<ordinal> "
                         "(1-63 letters, digits, '.', '_', '-'), e.g. pong-agents-3")
    ordinal = int(found.group(1))
    if ordinal >= MAX_AGENT_IDS:
        raise ValueError(f"member name {name!r}: ordinal {ordinal} is past the {MAX_AGENT_IDS} agents a memory counts")
    return ordinal


def ladder_position(k: int) -> float:
    """The ``k``-th point of the base-2 van der Corput sequence in [0, 1): k's bits mirrored behind the point."""
    position, weight = 0.0, 0.5
    while k:
        position += weight * (k & 1)
        k >>= 1
        weight /= 2
    return position


def collective_member(config: BorgConfig, name: str) -> AgentIdentity:
    """The one agent of a collective's pod ``name`` (``<statefulset>-<k>``): everything derives from ``k``."""
    k = member_ordinal(name)
    ladder = config.epsilon_ladder
    return AgentIdentity(
        agent_id=k,
        label=name,
        seed=agent_seed(config.hive.seed, _MEMBER_BLOCK + k),
        stream_base=(_MEMBER_BLOCK + k) * STREAMS_PER_AGENT,
        steps=config.hive.steps,
        ladder_epsilon=ladder_epsilon_at(ladder_position(k), ladder.base, ladder.alpha) if ladder.enabled else None,
        reports_memory=False,
    )
