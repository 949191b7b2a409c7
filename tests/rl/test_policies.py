"""Actor policies: action frequencies, switching and mixing on schedule, labels, ids and checkpointed state.

Statistical checks use fixed seeds and a tolerance of 5 standard errors of the sample proportion
(``5 * sqrt(p (1 - p) / n)``): loose enough never to fail by chance at a new seed, tight enough that every
broken variant named next to each test lands well outside it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from pydantic import TypeAdapter

from borgdqn.config import PolicySpec
from borgdqn.rl.policies import ActorPolicy, build_policy
from borgdqn.rl.schedules import epsilon_ladder

_SPEC: TypeAdapter[Any] = TypeAdapter(PolicySpec)


def spec(data: dict[str, Any]) -> Any:
    """A policy spec as a user writes it in YAML."""
    return _SPEC.validate_python(data)


def tolerance(p: float, n: int) -> float:
    return 5.0 * math.sqrt(p * (1.0 - p) / n)


def policy(data: dict[str, Any], envs: int = 64, actions: int = 6, seed: int = 0, **kw: Any) -> ActorPolicy:
    pol = build_policy(spec(data), num_envs=envs, num_actions=actions, seed=seed, **kw)
    pol.begin_episodes(np.ones(envs, dtype=bool), 0)
    return pol


def distinct_q(envs: int, actions: int, seed: int = 1) -> np.ndarray:
    """Q-values with one clear maximum per row, at a different action in different rows."""
    return np.random.default_rng(seed).permutation(np.tile(np.arange(actions, dtype=np.float32), (envs, 1)).T).T


def run(pol: ActorPolicy, q: np.ndarray, steps: int, step: int = 0) -> np.ndarray:
    return np.stack([pol.select(q, step) for _ in range(steps)])


# --------------------------------------------------------------------------------------------- leaves
def test_epsilon_greedy_frequencies() -> None:
    # Broken variants: eps ignored (greedy share 1.0), eps/A term dropped (0.70), random always (1/6).
    envs, actions, eps, steps = 64, 6, 0.3, 200
    pol = policy({"kind": "epsilon_greedy", "epsilon": {"kind": "constant", "value": eps}}, envs, actions)
    q = distinct_q(envs, actions)
    chosen = run(pol, q, steps)
    assert chosen.dtype == np.int64 and chosen.shape == (steps, envs)
    n = chosen.size
    greedy_share = float(np.mean(chosen == q.argmax(axis=1)))
    expected = 1 - eps + eps / actions
    assert abs(greedy_share - expected) < tolerance(expected, n)
    # Exploration is uniform over all actions: each non-greedy action has probability eps / A.
    ranks = np.argsort(np.argsort(-q, axis=1), axis=1)  # 0 = greedy action
    chosen_rank = np.take_along_axis(np.broadcast_to(ranks, (steps, envs, actions)), chosen[..., None], 2)
    for r in range(1, actions):
        share = float(np.mean(chosen_rank == r))
        assert abs(share - eps / actions) < tolerance(eps / actions, n)


def test_epsilon_follows_its_schedule_in_the_actions() -> None:
    envs, actions, steps = 64, 4, 200
    pol = policy(
        {"kind": "epsilon_greedy", "epsilon": {"kind": "linear", "start": 1.0, "end": 0.0, "steps": 1000}},
        envs,
        actions,
    )
    q = distinct_q(envs, actions)
    assert pol.epsilon(0) == 1.0 and pol.epsilon(500) == 0.5 and pol.epsilon(5000) == 0.0
    for step, eps in ((500, 0.5), (2000, 0.0)):
        share = float(np.mean(run(pol, q, steps, step) == q.argmax(axis=1)))
        expected = 1 - eps + eps / actions
        assert abs(share - expected) < tolerance(expected, steps * envs) + 1e-12


def test_ladder_overrides_the_end_of_the_schedule() -> None:
    data = {"kind": "epsilon_greedy", "epsilon": {"kind": "linear", "start": 1.0, "end": 0.01, "steps": 100}}
    low = epsilon_ladder(7, 8, 0.4, 7.0)
    pol = policy(data, ladder_epsilon=low)
    assert pol.epsilon(0) == 1.0
    assert pol.epsilon(50) == pytest.approx((1.0 + 0.4**8) / 2)
    assert pol.epsilon(100) == pytest.approx(0.4**8)
    assert pol.epsilon(10**6) == pytest.approx(0.4**8)
    # And in the actions: agent 0 of the ladder (eps 0.4) explores far more than the schedule's end (0.01).
    envs, actions, steps = 64, 4, 150
    q = distinct_q(envs, actions)
    for ladder, eps in ((epsilon_ladder(0, 8, 0.4, 7.0), 0.4), (None, 0.01)):
        pol = policy(data, envs, actions, ladder_epsilon=ladder)
        share = float(np.mean(run(pol, q, steps, step=1000) == q.argmax(axis=1)))
        expected = 1 - eps + eps / actions
        assert abs(share - expected) < tolerance(expected, steps * envs)


def test_ladder_applies_to_every_epsilon_greedy_leaf_of_a_mixture() -> None:
    data = {
        "kind": "mixture",
        "components": [
            {
                "policy": {"kind": "epsilon_greedy", "epsilon": {"kind": "constant", "value": 0.05}},
                "weight": {"kind": "constant", "value": 1},
            },
            {"policy": {"kind": "random"}, "weight": {"kind": "constant", "value": 1}},
        ],
    }
    assert policy(data).epsilon(0) == 0.05
    assert policy(data, ladder_epsilon=0.3).epsilon(0) == 0.3


def test_greedy_is_argmax_with_random_tie_breaking() -> None:
    envs, actions = 64, 5
    pol = policy({"kind": "greedy"}, envs, actions)
    q = distinct_q(envs, actions)
    assert np.array_equal(pol.select(q, 0), q.argmax(axis=1))
    # Two tied maxima (actions 1 and 3): each is picked half the time, never the others.
    tied = np.zeros((envs, actions), dtype=np.float32)
    tied[:, [1, 3]] = 1.0
    chosen = run(pol, tied, 100)
    assert set(np.unique(chosen)) == {1, 3}
    assert abs(float(np.mean(chosen == 1)) - 0.5) < tolerance(0.5, chosen.size)


def test_greedy_treats_nan_as_worst() -> None:
    pol = policy({"kind": "greedy"}, envs=3, actions=3)
    q = np.array([[np.nan, 1.0, 0.0], [np.nan, np.nan, np.nan], [2.0, np.nan, 1.0]], dtype=np.float32)
    chosen = run(pol, q, 200)
    assert np.all(chosen[:, 0] == 1) and np.all(chosen[:, 2] == 0)
    assert set(np.unique(chosen[:, 1])) == {0, 1, 2}  # all NaN: uniform, not a crash or always action 0


def test_random_is_uniform() -> None:
    envs, actions = 64, 6
    chosen = run(policy({"kind": "random"}, envs, actions), distinct_q(envs, actions), 100)
    counts = np.bincount(chosen.ravel(), minlength=actions) / chosen.size
    assert np.all(np.abs(counts - 1 / actions) < tolerance(1 / actions, chosen.size))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_boltzmann_frequencies_match_softmax() -> None:
    # Broken variants: q*T instead of q/T, or argmax, give frequencies far outside the tolerance.
    envs, steps, temp = 64, 300, 0.5
    row = np.array([1.0, 2.0, 0.0, 1.5], dtype=np.float32)
    pol = policy({"kind": "boltzmann", "temperature": {"kind": "constant", "value": temp}}, envs, 4)
    chosen = run(pol, np.tile(row, (envs, 1)), steps)
    freq = np.bincount(chosen.ravel(), minlength=4) / chosen.size
    expected = softmax(row.astype(np.float64) / temp)
    for f, p in zip(freq, expected, strict=True):
        assert abs(f - p) < tolerance(p, chosen.size)


def test_boltzmann_temperature_schedule_and_numerical_stability() -> None:
    envs = 64
    data = {"kind": "boltzmann", "temperature": {"kind": "linear", "start": 100.0, "end": 0.01, "steps": 1000}}
    pol = policy(data, envs, 3)
    q = np.tile(np.array([1e30, 1e30 - 1e24, -1e30], dtype=np.float32), (envs, 1))
    # Cold (step 1000, T = 0.01): gaps of 1e24 make it greedy; huge Q-values must not overflow into NaN.
    assert np.all(run(pol, q, 20, step=1000) == 0)
    # Hot (step 0, T = 100) on small Q-values: close to uniform.
    small = np.tile(np.array([0.0, 1.0, 2.0], dtype=np.float32), (envs, 1))
    chosen = run(pol, small, 200, step=0)
    expected = softmax(np.array([0.0, 1.0, 2.0]) / 100.0)
    freq = np.bincount(chosen.ravel(), minlength=3) / chosen.size
    assert np.all(np.abs(freq - expected) < [tolerance(p, chosen.size) for p in expected])
    # NaN and -inf actions get probability 0; a row of only NaN acts uniformly.
    odd = np.array([[np.nan, 0.0, -np.inf], [np.nan, np.nan, np.nan]], dtype=np.float32)
    pol2 = policy({"kind": "boltzmann"}, envs=2, actions=3)
    chosen = run(pol2, odd, 300)
    assert np.all(chosen[:, 0] == 1)
    assert set(np.unique(chosen[:, 1])) == {0, 1, 2}


# ------------------------------------------------------------------------------------------- switches
SWITCH = {"kind": "switch", "first": {"kind": "random"}, "second": {"kind": "greedy"}, "after": 5}


def test_switch_changes_policy_exactly_at_episode_step_after() -> None:
    envs, actions = 8, 4
    pol = policy(SWITCH, envs, actions)
    assert pol.labels == ["random", "greedy"]
    rnd, greedy = pol.labels.index("random"), pol.labels.index("greedy")
    q = distinct_q(envs, actions)
    for t in range(12):
        chosen = pol.select(q, t)
        ids = pol.acting_ids()
        assert ids.dtype == np.uint8 and ids.shape == (envs,)
        if t < 5:
            assert np.all(ids == rnd), t
        else:
            assert np.all(ids == greedy), t
            assert np.array_equal(chosen, q.argmax(axis=1))
    assert pol.episode_labels() == ["switch(random->greedy)"] * envs


def test_switch_restarts_per_env_on_begin_episodes() -> None:
    envs = 8
    pol = policy(SWITCH, envs, 4)
    q = distinct_q(envs, 4)
    run(pol, q, 7)
    restarted = np.arange(envs) % 2 == 0
    pol.begin_episodes(restarted, 7)
    for t in range(7):
        pol.select(q, 7 + t)
        ids = pol.acting_ids()
        assert np.all(ids[~restarted] == 1)  # still greedy: their episodes did not restart
        assert np.all(ids[restarted] == (0 if t < 5 else 1)), t
    assert np.array_equal(pol.episode_steps(), np.where(restarted, 7, 14))


# ------------------------------------------------------------------------------------------- mixtures
def staged_mixture() -> dict[str, Any]:
    """Random only for the first 50k steps, then 20% random / 80% epsilon-greedy."""
    return {
        "kind": "mixture",
        "components": [
            {
                "policy": {"kind": "random"},
                "weight": {"kind": "piecewise", "points": [(0, 1.0), (50_000, 1.0), (50_000, 0.2)]},
            },
            {
                "policy": {"kind": "epsilon_greedy", "epsilon": {"kind": "constant", "value": 0.1}},
                "weight": {"kind": "piecewise", "points": [(0, 0.0), (50_000, 0.0), (50_000, 0.8)]},
            },
        ],
    }


def test_mixture_switches_on_schedule_and_mixes_by_weight() -> None:
    envs, rounds = 64, 200
    pol = policy(staged_mixture(), envs)
    everyone = np.ones(envs, dtype=bool)
    before: list[str] = []
    for _ in range(20):
        pol.begin_episodes(everyone, 49_999)
        before += pol.episode_labels()
    assert set(before) == {"random"}
    after: list[str] = []
    for _ in range(rounds):
        pol.begin_episodes(everyone, 50_000)
        after += pol.episode_labels()
    share = after.count("epsilon_greedy") / len(after)
    assert abs(share - 0.8) < tolerance(0.8, len(after))
    assert set(after) == {"random", "epsilon_greedy"}


def test_mixture_component_is_fixed_for_the_episode_and_matches_acting_ids() -> None:
    envs = 64
    pol = policy(staged_mixture(), envs)
    pol.begin_episodes(np.ones(envs, dtype=bool), 60_000)
    labels = pol.episode_labels()
    q = distinct_q(envs, 6)
    for t in range(10):
        pol.select(q, 60_000 + t)
        assert pol.episode_labels() == labels  # drawn once per episode, not per step
        assert [pol.labels[i] for i in pol.acting_ids()] == labels


def test_nested_specs_label_and_act_consistently() -> None:
    data = {
        "kind": "mixture",
        "components": [
            {"policy": {**SWITCH, "after": 3}, "weight": {"kind": "constant", "value": 1}},
            {"policy": {"kind": "epsilon_greedy"}, "weight": {"kind": "constant", "value": 1}},
            {
                "policy": {
                    "kind": "mixture",
                    "components": [
                        {"policy": {"kind": "boltzmann"}, "weight": {"kind": "constant", "value": 1}},
                        {"policy": {"kind": "random"}, "weight": {"kind": "constant", "value": 1}},
                    ],
                },
                "weight": {"kind": "constant", "value": 1},
            },
        ],
    }
    envs = 64
    pol = policy(data, envs)
    # The two identical random leaves share one id; composite labels are not leaves.
    assert pol.labels == ["random", "greedy", "epsilon_greedy", "boltzmann"]
    q = distinct_q(envs, 6)
    seen: set[str] = set()
    for t in range(6):
        pol.select(q, t)
        for episode, acting in zip(pol.episode_labels(), pol.acting_ids(), strict=True):
            seen.add(episode)
            if episode == "switch(random->greedy)":
                assert pol.labels[acting] == ("random" if t < 3 else "greedy")
            else:
                assert pol.labels[acting] == episode
    assert seen == {"switch(random->greedy)", "epsilon_greedy", "boltzmann", "random"}


def test_labels_are_unique_and_names_are_used() -> None:
    eps = {"kind": "epsilon_greedy", "epsilon": {"kind": "constant", "value": 0.1}}
    data = {
        "kind": "mixture",
        "components": [
            {"policy": {"kind": "epsilon_greedy"}, "weight": {"kind": "constant", "value": 1}},
            {"policy": eps, "weight": {"kind": "constant", "value": 1}},
            {"policy": {**eps, "name": "explorer"}, "weight": {"kind": "constant", "value": 1}},
            {"policy": {**SWITCH, "name": "warmup"}, "weight": {"kind": "constant", "value": 1}},
        ],
    }
    pol = policy(data)
    assert pol.labels == ["epsilon_greedy", "epsilon_greedy-2", "explorer", "random", "greedy"]
    assert len(set(pol.labels)) == len(pol.labels)
    pol.begin_episodes(np.ones(64, dtype=bool), 0)
    assert set(pol.episode_labels()) <= {"epsilon_greedy", "epsilon_greedy-2", "explorer", "warmup"}


# --------------------------------------------------------------------------------------------- errors
def weighted(*weights: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "mixture",
        "components": [
            {"policy": {"kind": k}, "weight": w} for k, w in zip(("random", "greedy"), weights, strict=True)
        ],
    }


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (weighted({"kind": "constant", "value": 0}, {"kind": "constant", "value": 0}), "policy.components:"),
        (
            weighted({"kind": "constant", "value": 1}, {"kind": "linear", "start": 1, "end": -1, "steps": 9}),
            "policy.components[1].weight:",
        ),
        ({"kind": "epsilon_greedy", "epsilon": {"kind": "constant", "value": 1.5}}, "policy.epsilon:"),
        ({"kind": "boltzmann", "temperature": {"kind": "constant", "value": 0}}, "policy.temperature:"),
        (
            {**SWITCH, "second": weighted({"kind": "constant", "value": 0}, {"kind": "constant", "value": 0})},
            "policy.second.components:",
        ),
        (
            {
                "kind": "switch",
                "first": {"kind": "random", "name": "x"},
                "second": {"kind": "greedy", "name": "x"},
                "after": 3,
            },
            "policy.second.name:",
        ),
    ],
)
def test_specs_that_cannot_work_name_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError) as err:
        build_policy(spec(data), num_envs=2, num_actions=3, seed=0)
    message = str(err.value)
    assert message.startswith(field) and "\n" not in message


def test_weights_that_reach_zero_later_fail_at_that_episode_start() -> None:
    data = weighted({"kind": "linear", "start": 1, "end": 0, "steps": 100}, {"kind": "constant", "value": 0})
    pol = policy(data, envs=2)
    pol.begin_episodes(np.array([True, False]), 50)
    with pytest.raises(ValueError, match=r"policy\.components: all weights are 0 at step 100"):
        pol.begin_episodes(np.array([True, False]), 100)


def test_ladder_epsilon_outside_unit_interval_is_rejected() -> None:
    with pytest.raises(ValueError, match="epsilon_ladder"):
        build_policy(spec({"kind": "epsilon_greedy"}), num_envs=2, num_actions=3, seed=0, ladder_epsilon=1.5)


def test_select_before_any_episode_and_wrong_shapes_are_errors() -> None:
    pol = build_policy(spec({"kind": "greedy"}), num_envs=2, num_actions=3, seed=0)
    with pytest.raises(RuntimeError, match="begin_episodes"):
        pol.select(np.zeros((2, 3), dtype=np.float32), 0)
    pol.begin_episodes(np.ones(2, dtype=bool), 0)
    with pytest.raises(ValueError, match="shape"):
        pol.select(np.zeros((3, 3), dtype=np.float32), 0)


def test_epsilon_is_nan_without_an_epsilon_greedy_leaf() -> None:
    assert math.isnan(policy(SWITCH).epsilon(0))


# ---------------------------------------------------------------------------------------------- state
def test_state_dict_round_trip_reproduces_the_future() -> None:
    data = {
        "kind": "mixture",
        "components": [
            {"policy": SWITCH, "weight": {"kind": "constant", "value": 1}},
            {"policy": {"kind": "epsilon_greedy"}, "weight": {"kind": "constant", "value": 2}},
            {"policy": {"kind": "boltzmann"}, "weight": {"kind": "constant", "value": 1}},
        ],
    }
    envs, actions = 16, 6
    rng = np.random.default_rng(7)
    qs = rng.normal(size=(60, envs, actions)).astype(np.float32)
    masks = rng.random((60, envs)) < 0.1

    def play(pol: ActorPolicy, start: int, stop: int) -> list[tuple[Any, ...]]:
        out = []
        for t in range(start, stop):
            pol.begin_episodes(masks[t], t * envs)
            actions_t = pol.select(qs[t], t * envs)
            out.append((actions_t.tolist(), pol.acting_ids().tolist(), pol.episode_labels()))
        return out

    original = policy(data, envs, actions, seed=3)
    play(original, 0, 30)
    # Through JSON: the state is plain data (a checkpoint can store it without pickling numpy objects).
    saved = json.loads(json.dumps(original.state_dict()))
    expected = play(original, 30, 60)

    restored = build_policy(spec(data), num_envs=envs, num_actions=actions, seed=999)
    restored.load_state_dict(saved)
    assert play(restored, 30, 60) == expected
    # A different seed without the state diverges, so the equality above is the state's doing.
    other = policy(data, envs, actions, seed=999)
    assert play(other, 30, 60) != expected


def test_state_of_a_different_spec_is_rejected() -> None:
    saved = policy(SWITCH, envs=4).state_dict()
    with pytest.raises(ValueError, match="policy state"):
        policy({"kind": "greedy"}, envs=4).load_state_dict(saved)
