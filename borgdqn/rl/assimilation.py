"""Assimilation: population-based training's exploit and explore step between the agents of a hive.

Every ``hive.assimilation.every`` env steps an agent puts its state in the hive's model store (the run dir on one
machine, the memory's Redis in a collective) and ranks the agents whose entries carry a mean return (of their last
20 episodes when they saved). When it is in the bottom fraction it adopts the state of an agent drawn at random
from the top fraction (exploit): the donor's online and target networks, Adam's moments and the donor's learning
rate, as PBT copies weights and hyper-parameters. With ``perturb`` it then scales that learning rate and its own
epsilon floor by a factor drawn from ``factors``, within bounds (explore).

It keeps its own identity, env-step and update counters, replay, policy state and episode count. Its recent
returns start anew, so it is ranked again only on games of the adopted network. Agents never wait for each other:
each ranks the entries as they are (an entry is at most ``every`` env steps old when every agent assimilates).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from borgdqn.config import AssimilationConfig, BorgConfig
from borgdqn.memory.redis.model_store import ModelEntry
from borgdqn.rl.checkpoint import AgentCheckpoint, check_learner_state, parse_checkpoint
from borgdqn.rl.learner import Learner


def ranked(entries: Mapping[int, ModelEntry]) -> list[ModelEntry]:
    """The entries that carry a mean return, worst first (ties: the lower agent id first)."""
    scored = [e for e in entries.values() if e.mean_return is not None]
    return sorted(scored, key=lambda e: (e.mean_return, e.agent))


def choose_donor(entries: Mapping[int, ModelEntry], agent: int, config: AssimilationConfig,
                 rng: np.random.Generator) -> ModelEntry | None:
    """The entry whose state ``agent`` adopts, or None: it is not in the bottom fraction of the ranked entries
    (at least one agent each side: a hive of 2 has a bottom and a top of one), or no top agent beats it."""
    order = ranked(entries)
    if len(order) < 2 or agent not in {e.agent for e in order}:
        return None
    bottom = order[: max(1, int(len(order) * config.bottom))]
    top = order[len(order) - max(1, int(len(order) * config.top)):]
    me = next((e for e in bottom if e.agent == agent), None)
    if me is None or me.mean_return is None:
        return None
    better = [e for e in top if e.agent != agent and e.mean_return is not None and e.mean_return > me.mean_return]
    return better[int(rng.integers(len(better)))] if better else None


def perturbed(value: float, config: AssimilationConfig, bounds: tuple[float, float],
              rng: np.random.Generator) -> float:
    """``value`` scaled by one of ``config.factors`` drawn at random, kept within ``bounds``."""
    factor = config.factors[int(rng.integers(len(config.factors)))]
    return float(min(max(value * factor, bounds[0]), bounds[1]))


def learning_rate_of(config: BorgConfig, state: AgentCheckpoint) -> float:
    """The learning rate an agent's state trains with: its own (set by an earlier assimilation) or its config's."""
    return state.learning_rate if state.learning_rate is not None else config.learner.lr


def adopt(learner: Learner, data: bytes, where: str) -> tuple[AgentCheckpoint, float]:
    """Load the donor checkpoint ``data`` into ``learner`` (networks, Adam's moments, the donor's learning rate;
    this learner keeps its update count); returns the donor's state and learning rate. CheckpointError, and
    nothing loaded, for a checkpoint that does not read or does not fit this learner's network."""
    donor_config, donor = parse_checkpoint(data, where)
    check_learner_state(donor.learner, learner.online, where)
    updates = learner.updates
    learner.load_state_dict(donor.learner)
    learner.updates = updates
    rate = learning_rate_of(donor_config, donor)
    learner.set_learning_rate(rate)
    return donor, rate


def epsilon_floor(ladder_epsilon: float | None, state: AgentCheckpoint, final_epsilon: float) -> float | None:
    """The epsilon an agent's policy anneals to: set by assimilation, else the ladder's, else its schedule's end
    (``final_epsilon``, NaN when the policy has no epsilon-greedy leaf: then None, nothing to perturb)."""
    if state.epsilon_floor is not None:
        return state.epsilon_floor
    if ladder_epsilon is not None:
        return ladder_epsilon
    return None if math.isnan(final_epsilon) else final_epsilon
