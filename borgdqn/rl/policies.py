"""Actor policies: how an agent turns Q-values into actions, vectorised over the E environments it runs.

A policy spec (:mod:`borgdqn.config`) is a tree: leaves (random, greedy, epsilon-greedy, Boltzmann) choose
actions; ``switch`` and ``mixture`` nodes decide, per environment, which leaf acts. Every node works on an
index array of environments at once, so one :meth:`ActorPolicy.select` costs a handful of numpy calls per
node whatever E is.

Labels
    Every node has a label: its spec's ``name`` if given, else ``random`` / ``greedy`` / ``epsilon_greedy``
    / ``boltzmann`` for leaves, ``switch(<first>-><second>)`` and ``mixture(<a>|<b>|...)`` built from the
    children's labels. Labels are unique in a tree: two *different* specs that would get the same default
    label are told apart by a suffix in order of appearance (``epsilon_greedy``, ``epsilon_greedy-2``), while
    identical specs share one label (and, for leaves, one id). A user-given name that would label two
    different specs is an error. ``ActorPolicy.labels`` lists the leaves' labels; a leaf's index there is the
    policy id stored in replay (``uint8``, so at most 256 leaves).

Episode labels
    An episode is recorded under the label of the node that plays it: a leaf's or a switch's own label; for a
    mixture, the label of the component drawn for that episode (followed down through nested mixtures).

Episode steps
    Each env counts the actions selected since its last :meth:`ActorPolicy.begin_episodes`; a switch compares
    that count with ``after`` (so nested switches all count from the episode's start, not from the moment
    their parent handed over).

Greedy ties are broken uniformly at random (Q-values of a fresh network, or of a game's no-op-equivalent
actions, tie exactly; always picking the lowest index would bias the data towards one action). NaN Q-values
are treated as -inf, and a row of only NaN acts uniformly, so a diverging network degrades instead of crashing
the actor.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from borgdqn.config import (
    BoltzmannPolicySpec,
    EpsilonGreedyPolicySpec,
    GreedyPolicySpec,
    MixturePolicySpec,
    PolicySpec,
    RandomPolicySpec,
    SwitchPolicySpec,
)
from borgdqn.rl.schedules import anneal_to, make_schedule, schedule_bounds

__all__ = ["ActorPolicy", "build_policy"]

log = logging.getLogger(__name__)

MAX_LEAVES = 256  # policy ids travel as uint8 in replay chunks
_STATE_VERSION = 1


# ------------------------------------------------------------------------------------------------- nodes
class _Node:
    label: str

    def begin(self, mask: np.ndarray, step: int) -> None:
        """A new episode starts in the envs of ``mask`` (bool [E])."""

    def act(
        self,
        q: np.ndarray,
        rows: np.ndarray,
        step: int,
        ep_step: np.ndarray,
        actions: np.ndarray,
        ids: np.ndarray,
    ) -> None:
        """Write actions (and the acting leaf's id) for the envs ``rows`` into ``actions`` / ``ids``."""
        raise NotImplementedError

    def fill_episode_labels(self, out: np.ndarray, rows: np.ndarray) -> None:
        out[rows] = self.label


class _Leaf(_Node):
    def __init__(self, label: str, leaf_id: int, rng: np.random.Generator, num_actions: int) -> None:
        self.label = label
        self.leaf_id = leaf_id
        self.rng = rng
        self.num_actions = num_actions

    def act(
        self,
        q: np.ndarray,
        rows: np.ndarray,
        step: int,
        ep_step: np.ndarray,
        actions: np.ndarray,
        ids: np.ndarray,
    ) -> None:
        actions[rows] = self.choose(q[rows], step)
        ids[rows] = self.leaf_id

    def choose(self, q: np.ndarray, step: int) -> np.ndarray:
        raise NotImplementedError


class _Random(_Leaf):
    def choose(self, q: np.ndarray, step: int) -> np.ndarray:
        return self.rng.integers(self.num_actions, size=(q.shape[0],))


def _argmax_random_ties(q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if np.isnan(q).any():
        q = np.where(np.isnan(q), -np.inf, q)
    ties = q == q.max(axis=1, keepdims=True)  # a row of only -inf ties everywhere: uniform
    return np.argmax(np.where(ties, rng.random(q.shape), -1.0), axis=1)


class _Greedy(_Leaf):
    def choose(self, q: np.ndarray, step: int) -> np.ndarray:
        return _argmax_random_ties(q, self.rng)


class _ScheduledLeaf(_Leaf):
    """A leaf with one scheduled parameter (epsilon, temperature), a function of the agent's env steps."""

    def __init__(
        self,
        label: str,
        leaf_id: int,
        rng: np.random.Generator,
        num_actions: int,
        schedule: Callable[[int], float],
    ) -> None:
        super().__init__(label, leaf_id, rng, num_actions)
        self.schedule = schedule


class _EpsilonGreedy(_ScheduledLeaf):
    def choose(self, q: np.ndarray, step: int) -> np.ndarray:
        n = q.shape[0]
        greedy = _argmax_random_ties(q, self.rng)
        explore = self.rng.random(n) < self.schedule(step)
        return np.where(explore, self.rng.integers(self.num_actions, size=n), greedy)


class _Boltzmann(_ScheduledLeaf):
    def choose(self, q: np.ndarray, step: int) -> np.ndarray:
        temp = max(self.schedule(step), np.finfo(np.float64).tiny)
        x = q.astype(np.float64)
        x[np.isnan(x)] = -np.inf
        # Finite bounds keep max-subtraction free of inf - inf; a row of only -inf becomes uniform.
        np.clip(x, -1e300, 1e300, out=x)
        x -= x.max(axis=1, keepdims=True)
        with np.errstate(over="ignore", under="ignore"):
            x /= temp
            np.exp(x, out=x)
        cdf = np.cumsum(x, axis=1)
        # Scaling u by the row total (>= 1: the max entry is exp(0)) instead of normalising: an action of
        # probability 0 can then never be drawn, not even the last one through rounding.
        u = self.rng.random(q.shape[0]) * cdf[:, -1]
        return (cdf <= u[:, None]).sum(axis=1)


class _Switch(_Node):
    def __init__(self, label: str, first: _Node, second: _Node, after: int) -> None:
        self.label = label
        self.first = first
        self.second = second
        self.after = after

    def begin(self, mask: np.ndarray, step: int) -> None:
        self.first.begin(mask, step)
        self.second.begin(mask, step)

    def act(
        self,
        q: np.ndarray,
        rows: np.ndarray,
        step: int,
        ep_step: np.ndarray,
        actions: np.ndarray,
        ids: np.ndarray,
    ) -> None:
        early = ep_step[rows] < self.after
        _act(self.first, q, rows[early], step, ep_step, actions, ids)
        _act(self.second, q, rows[~early], step, ep_step, actions, ids)


class _Mixture(_Node):
    def __init__(
        self,
        label: str,
        children: list[_Node],
        weights: list[Callable[[int], float]],
        field: str,
        rng: np.random.Generator,
        num_envs: int,
    ) -> None:
        self.label = label
        self.children = children
        self.weights = weights
        self.field = field
        self.rng = rng
        self.choice = np.zeros(num_envs, dtype=np.int64)

    def probabilities(self, step: int) -> np.ndarray:
        w = np.array([f(step) for f in self.weights], dtype=np.float64)
        for k, wk in enumerate(w):
            if not (math.isfinite(wk) and wk >= 0.0):
                raise ValueError(f"{self.field}.components[{k}].weight: is {wk:g} at step {step}, must be >= 0")
        total = w.sum()
        if total <= 0.0:
            raise ValueError(f"{self.field}.components: all weights are 0 at step {step}; one must be > 0")
        return w / total

    def begin(self, mask: np.ndarray, step: int) -> None:
        n = int(np.count_nonzero(mask))
        if n:
            p = self.probabilities(step)
            self.choice[mask] = self.rng.choice(len(p), size=n, p=p) if len(p) > 1 else 0
        for child in self.children:
            child.begin(mask, step)

    def act(
        self,
        q: np.ndarray,
        rows: np.ndarray,
        step: int,
        ep_step: np.ndarray,
        actions: np.ndarray,
        ids: np.ndarray,
    ) -> None:
        chosen = self.choice[rows]
        for k, child in enumerate(self.children):
            _act(child, q, rows[chosen == k], step, ep_step, actions, ids)

    def fill_episode_labels(self, out: np.ndarray, rows: np.ndarray) -> None:
        chosen = self.choice[rows]
        for k, child in enumerate(self.children):
            child.fill_episode_labels(out, rows[chosen == k])


def _act(
    node: _Node,
    q: np.ndarray,
    rows: np.ndarray,
    step: int,
    ep_step: np.ndarray,
    actions: np.ndarray,
    ids: np.ndarray,
) -> None:
    # Skipping empty subsets keeps the random stream independent of how often a branch happens to be empty.
    if rows.size:
        node.act(q, rows, step, ep_step, actions, ids)


# ---------------------------------------------------------------------------------------------- builder
class _Builder:
    def __init__(self, num_envs: int, num_actions: int, rng: np.random.Generator, ladder_epsilon: float | None) -> None:
        self.num_envs = num_envs
        self.num_actions = num_actions
        self.rng = rng
        self.ladder_epsilon = ladder_epsilon
        self.owners: dict[str, str] = {}  # label -> canonical JSON of the spec it names
        self.leaf_ids: dict[str, int] = {}  # canonical JSON of a leaf spec -> its id
        self.labels: list[str] = []
        self.mixtures: list[_Mixture] = []
        self.epsilon_schedules: list[Callable[[int], float]] = []

    def claim(self, spec: PolicySpec, default: str, field: str) -> str:
        key = spec.model_dump_json()
        if spec.name is not None:
            if not spec.name.strip():
                raise ValueError(f"{field}.name: must not be empty")
            owner = self.owners.get(spec.name)
            if owner is not None and owner != key:
                raise ValueError(f"{field}.name: {spec.name!r} already labels a different policy in this spec")
            self.owners[spec.name] = key
            return spec.name
        label, n = default, 1
        while self.owners.get(label, key) != key:
            n += 1
            label = f"{default}-{n}"
        self.owners[label] = key
        return label

    def leaf_id(self, spec: PolicySpec, label: str, field: str) -> int:
        key = spec.model_dump_json()
        if key not in self.leaf_ids:
            if len(self.labels) >= MAX_LEAVES:
                raise ValueError(f"{field}: more than {MAX_LEAVES} distinct leaf policies (ids are uint8)")
            self.leaf_ids[key] = len(self.labels)
            self.labels.append(label)
        return self.leaf_ids[key]

    def build(self, spec: PolicySpec, field: str) -> _Node:
        if isinstance(spec, SwitchPolicySpec):
            first = self.build(spec.first, f"{field}.first")
            second = self.build(spec.second, f"{field}.second")
            label = self.claim(spec, f"switch({first.label}->{second.label})", field)
            return _Switch(label, first, second, spec.after)
        if isinstance(spec, MixturePolicySpec):
            children = [self.build(c.policy, f"{field}.components[{k}].policy") for k, c in enumerate(spec.components)]
            for k, comp in enumerate(spec.components):
                lo, _ = schedule_bounds(comp.weight)
                if lo < 0:
                    raise ValueError(f"{field}.components[{k}].weight: reaches {lo:g}; weights must be >= 0")
            label = self.claim(spec, f"mixture({'|'.join(c.label for c in children)})", field)
            mixture = _Mixture(
                label,
                children,
                [make_schedule(c.weight) for c in spec.components],
                field,
                self.rng,
                self.num_envs,
            )
            mixture.probabilities(0)  # a mixture that cannot draw its first episode is a config error
            self.mixtures.append(mixture)
            return mixture
        return self.build_leaf(spec, field)

    def build_leaf(self, spec: PolicySpec, field: str) -> _Leaf:
        label = self.claim(spec, spec.kind, field)
        leaf_id = self.leaf_id(spec, label, field)
        args = (label, leaf_id, self.rng, self.num_actions)
        if isinstance(spec, RandomPolicySpec):
            return _Random(*args)
        if isinstance(spec, GreedyPolicySpec):
            return _Greedy(*args)
        if isinstance(spec, EpsilonGreedyPolicySpec):
            schedule = spec.epsilon
            why = ""
            if self.ladder_epsilon is not None:
                schedule = anneal_to(schedule, self.ladder_epsilon)
                why = f" after the epsilon ladder set its end to {self.ladder_epsilon:g}"
            lo, hi = schedule_bounds(schedule)
            if lo < 0.0 or hi > 1.0:
                raise ValueError(f"{field}.epsilon: spans {lo:g}..{hi:g}{why}; must stay within [0, 1]")
            fn = make_schedule(schedule)
            self.epsilon_schedules.append(fn)
            return _EpsilonGreedy(*args, fn)
        if isinstance(spec, BoltzmannPolicySpec):
            lo, _ = schedule_bounds(spec.temperature)
            if lo <= 0.0:
                raise ValueError(f"{field}.temperature: reaches {lo:g}; must stay > 0")
            return _Boltzmann(*args, make_schedule(spec.temperature))
        raise TypeError(f"{field}: not a policy spec: {type(spec).__name__}")


# ------------------------------------------------------------------------------------------ the policy
class ActorPolicy:
    """The acting policy of one agent over its E environments; build it with :func:`build_policy`.

    Per step: ``begin_episodes(new_episode_mask, step)`` for envs whose next action is the first of a new
    episode (all envs after the first reset), then ``select(q, step)``. Read ``episode_labels()`` for an env
    *before* beginning its next episode, and ``acting_ids()`` right after the ``select`` whose actions they
    describe.
    """

    def __init__(
        self,
        root: _Node,
        labels: list[str],
        *,
        num_envs: int,
        num_actions: int,
        rng: np.random.Generator,
        mixtures: list[_Mixture],
        epsilon_schedules: list[Callable[[int], float]],
    ) -> None:
        self.labels: list[str] = labels
        self.num_envs = num_envs
        self.num_actions = num_actions
        self._root = root
        self._rng = rng
        self._mixtures = mixtures
        self._epsilon = epsilon_schedules[0] if epsilon_schedules else None
        self._all = np.arange(num_envs)
        self._episode_step = np.zeros(num_envs, dtype=np.int64)
        self._begun = np.zeros(num_envs, dtype=bool)
        self._ids = np.zeros(num_envs, dtype=np.uint8)

    def begin_episodes(self, envs: np.ndarray, step: int) -> None:
        """A new episode starts in the envs of the bool mask ``envs`` [E]; mixtures draw components here."""
        mask = np.asarray(envs, dtype=bool)
        if mask.shape != (self.num_envs,):
            raise ValueError(f"begin_episodes: mask has shape {mask.shape}, expected ({self.num_envs},)")
        if not mask.any():
            return
        self._root.begin(mask, step)
        self._episode_step[mask] = 0
        self._begun |= mask

    def select(self, q: np.ndarray, step: int) -> np.ndarray:
        """Actions [E] int64 for Q-values ``q`` [E, A]; each env's episode step counter advances by one."""
        if q.shape != (self.num_envs, self.num_actions):
            raise ValueError(f"select: q has shape {q.shape}, expected ({self.num_envs}, {self.num_actions})")
        if not self._begun.all():
            missing = np.flatnonzero(~self._begun).tolist()
            raise RuntimeError(f"select: no episode begun in envs {missing}; call begin_episodes first")
        actions = np.empty(self.num_envs, dtype=np.int64)
        self._root.act(q, self._all, step, self._episode_step, actions, self._ids)
        self._episode_step += 1
        return actions

    def episode_labels(self) -> list[str]:
        """Per env: the label its current episode is recorded under."""
        out = np.empty(self.num_envs, dtype=object)
        self._root.fill_episode_labels(out, self._all)
        return [str(x) for x in out]

    def acting_ids(self) -> np.ndarray:
        """[E] uint8: index in ``labels`` of the leaf that chose each env's last action (0 before any)."""
        return self._ids.copy()

    def episode_steps(self) -> np.ndarray:
        """[E] int64: actions selected in each env's current episode."""
        return self._episode_step.copy()

    def epsilon(self, step: int) -> float:
        """The first epsilon-greedy leaf's epsilon at ``step`` (depth-first in the spec); NaN if none."""
        return self._epsilon(step) if self._epsilon is not None else math.nan

    def state_dict(self) -> dict[str, Any]:
        """RNG state and per-env counters, as plain Python values (loadable with weights_only=True)."""
        return {
            "version": _STATE_VERSION,
            "labels": list(self.labels),
            "num_envs": self.num_envs,
            "rng": self._rng.bit_generator.state,
            "episode_step": self._episode_step.tolist(),
            "begun": self._begun.tolist(),
            "acting_ids": self._ids.tolist(),
            "mixture_choices": [m.choice.tolist() for m in self._mixtures],
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("version") != _STATE_VERSION:
            raise ValueError(f"policy state: version {d.get('version')!r}, expected {_STATE_VERSION}")
        if d["labels"] != self.labels or d["num_envs"] != self.num_envs:
            raise ValueError(
                f"policy state: saved for labels {d['labels']} x {d['num_envs']} envs, "
                f"this policy has {self.labels} x {self.num_envs}"
            )
        if len(d["mixture_choices"]) != len(self._mixtures):
            raise ValueError("policy state: number of mixtures differs from this policy's spec")
        self._rng.bit_generator.state = d["rng"]
        self._episode_step[:] = d["episode_step"]
        self._begun[:] = d["begun"]
        self._ids[:] = d["acting_ids"]
        for mixture, choice in zip(self._mixtures, d["mixture_choices"], strict=True):
            mixture.choice[:] = choice


def build_policy(
    spec: PolicySpec,
    *,
    num_envs: int,
    num_actions: int,
    seed: int,
    ladder_epsilon: float | None = None,
) -> ActorPolicy:
    """Build an agent's policy; raises ValueError (one line, naming the field) for a spec that cannot work.

    ``ladder_epsilon`` (from :func:`borgdqn.rl.schedules.epsilon_ladder`) makes every epsilon-greedy leaf
    anneal from its schedule's start to that value instead of its schedule's end.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1 (got {num_envs})")
    if num_actions < 1:
        raise ValueError(f"num_actions must be >= 1 (got {num_actions})")
    if ladder_epsilon is not None and not 0.0 <= ladder_epsilon <= 1.0:
        raise ValueError(f"epsilon_ladder: epsilon {ladder_epsilon:g} is outside [0, 1]")
    rng = np.random.default_rng(seed)
    builder = _Builder(num_envs, num_actions, rng, ladder_epsilon)
    root = builder.build(spec, "policy")
    log.debug("policy built labels=%s num_envs=%d num_actions=%d", builder.labels, num_envs, num_actions)
    return ActorPolicy(
        root,
        builder.labels,
        num_envs=num_envs,
        num_actions=num_actions,
        rng=rng,
        mixtures=builder.mixtures,
        epsilon_schedules=builder.epsilon_schedules,
    )
