"""Who an agent is: the numbers that must differ between agents that write to one replay memory.

A local hive numbers its agents 0..N-1. A collective on Kubernetes runs one agent per pod, and a Deployment's pods
have no ordinal, so a member takes its numbers from its pod's name instead (``borgdqn train --member NAME``):

- its replay streams and seeds come from a 64-bit hash of the name, so two live pods never share a stream (a shared
  stream would link one pod's steps to the other's) and never play the same games;
- its place on the epsilon ladder is the same hash read as a fraction in [0, 1): the pods' final epsilons spread
  over the whole ladder whatever the replica count, and scaling re-rolls nobody;
- its agent id (what the memory counts steps by and the dashboards split by) is the hash modulo
  :data:`MAX_AGENT_IDS`. Two pods rarely share one (about 1 in 9 for 16 pods); that merges only their counts.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from borgdqn.config import BorgConfig
from borgdqn.rl.adder import STREAMS_PER_AGENT
from borgdqn.rl.schedules import epsilon_ladder, ladder_epsilon_at

# The memory's per-agent counts cover ids [0, MAX_AGENT_IDS) (SharedReplay's max_agents default).
MAX_AGENT_IDS = 1024
# Members' streams start above every hive agent's (256 agents at most), so the two kinds never meet in one memory.
_MEMBER_STREAM_BLOCKS = 1 << 20
_MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # a Deployment's pod names fit in 63


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


def collective_member(config: BorgConfig, name: str) -> AgentIdentity:
    """The one agent of a collective's pod ``name`` (its Kubernetes name): everything derives from the name."""
    if not _MEMBER_NAME.match(name):
        raise ValueError(f"member name {name!r}: use 1-63 letters, digits, '.', '_', '-' (a pod's name)")
    digest = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")
    ladder = config.epsilon_ladder
    position = (digest >> 11) / float(1 << 53)  # the top 53 bits: a uniform fraction in [0, 1)
    return AgentIdentity(
        agent_id=digest % MAX_AGENT_IDS,
        label=name,
        # 31 bits of the hash, 10_007 apart: far above any hive agent's offset, and envs (< 1024) never overlap.
        seed=agent_seed(config.hive.seed, 256 + (digest >> 33)),
        stream_base=(_MEMBER_STREAM_BLOCKS + (digest >> 24)) * STREAMS_PER_AGENT,
        steps=config.hive.steps,
        ladder_epsilon=ladder_epsilon_at(position, ladder.base, ladder.alpha) if ladder.enabled else None,
        reports_memory=False,
    )
