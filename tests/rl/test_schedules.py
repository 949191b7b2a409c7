"""Schedules give exact values at known steps, and the Ape-X epsilon ladder follows its formula."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from borgdqn.config import ConstantSchedule, ExponentialSchedule, LinearSchedule, PiecewiseSchedule
from borgdqn.rl.schedules import anneal_to, epsilon_ladder, make_schedule, schedule_bounds


def test_constant() -> None:
    f = make_schedule(ConstantSchedule(value=0.25))
    assert [f(s) for s in (-5, 0, 10**9)] == [0.25, 0.25, 0.25]


def test_linear_holds_start_until_begin_then_interpolates_then_holds_end() -> None:
    f = make_schedule(LinearSchedule(start=1.0, end=0.1, steps=100, begin=50))
    assert f(0) == 1.0
    assert f(50) == 1.0
    assert f(75) == pytest.approx(0.775)
    assert f(100) == pytest.approx(0.55)
    assert f(150) == 0.1
    assert f(10**9) == 0.1


def test_linear_without_begin_reaches_end_exactly() -> None:
    f = make_schedule(LinearSchedule(start=1.0, end=0.01, steps=250_000))
    assert f(0) == 1.0
    assert f(125_000) == pytest.approx(0.505)
    assert f(250_000) == 0.01  # exact, not up to rounding: the ladder tests compare with ==


def test_exponential_decays_by_decay_every_steps_and_is_floored_at_end() -> None:
    f = make_schedule(ExponentialSchedule(start=1.0, end=0.005, decay=0.1, steps=100))
    assert f(0) == 1.0
    assert f(50) == pytest.approx(0.1**0.5)
    assert f(100) == pytest.approx(0.1)
    assert f(200) == pytest.approx(0.01)
    assert f(300) == 0.005  # 0.001 would undershoot the floor
    assert f(10**6) == 0.005


def test_exponential_is_capped_when_it_travels_upwards() -> None:
    # A negative start decays towards 0, i.e. upwards: end is then a cap.
    f = make_schedule(ExponentialSchedule(start=-1.0, end=-0.05, decay=0.1, steps=10))
    assert f(10) == pytest.approx(-0.1)
    assert f(20) == -0.05
    assert f(1000) == -0.05


def test_piecewise_interpolates_jumps_and_holds_outside() -> None:
    f = make_schedule(PiecewiseSchedule(points=[(0, 0.0), (10, 1.0), (20, 1.0), (20, 5.0), (30, 0.0)]))
    assert f(-5) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(15) == 1.0
    assert f(19) == 1.0
    assert f(20) == 5.0  # a jump: the later point holds at its step
    assert f(25) == pytest.approx(2.5)
    assert f(30) == 0.0
    assert f(1000) == 0.0


def test_piecewise_single_point_is_constant() -> None:
    f = make_schedule(PiecewiseSchedule(points=[(100, 0.3)]))
    assert f(0) == f(100) == f(10**6) == 0.3


@settings(max_examples=60, deadline=None)
@given(
    xs=st.lists(st.integers(0, 10_000), min_size=2, max_size=8, unique=True).map(sorted),
    data=st.data(),
)
def test_piecewise_matches_numpy_interp(xs: list[int], data: st.DataObject) -> None:
    ys = data.draw(st.lists(st.floats(-10, 10), min_size=len(xs), max_size=len(xs)))
    f = make_schedule(PiecewiseSchedule(points=list(zip(xs, ys, strict=True))))
    for step in data.draw(st.lists(st.integers(-100, 11_000), min_size=1, max_size=20)):
        assert f(step) == pytest.approx(float(np.interp(step, xs, ys)), abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    start=st.floats(-5, 5),
    end=st.floats(-5, 5),
    steps=st.integers(1, 1000),
    begin=st.integers(0, 100),
    step=st.integers(-10, 2000),
)
def test_linear_stays_between_start_and_end(start: float, end: float, steps: int, begin: int, step: int) -> None:
    v = make_schedule(LinearSchedule(start=start, end=end, steps=steps, begin=begin))(step)
    lo, hi = schedule_bounds(LinearSchedule(start=start, end=end, steps=steps, begin=begin))
    assert lo - 1e-12 <= v <= hi + 1e-12


@settings(max_examples=80, deadline=None)
@given(start=st.floats(-5, 5), end=st.floats(-5, 5), step=st.integers(0, 10_000))
def test_exponential_bounds_contain_every_value(start: float, end: float, step: int) -> None:
    spec = ExponentialSchedule(start=start, end=end, decay=0.3, steps=100)
    lo, hi = schedule_bounds(spec)
    assert lo - 1e-12 <= make_schedule(spec)(step) <= hi + 1e-12


def test_anneal_to_replaces_the_end_and_keeps_the_start() -> None:
    lin = anneal_to(LinearSchedule(start=1.0, end=0.01, steps=100, begin=7), 0.2)
    assert lin == LinearSchedule(start=1.0, end=0.2, steps=100, begin=7)
    exp = anneal_to(ExponentialSchedule(start=1.0, end=0.01, decay=0.5, steps=10), 0.3)
    assert exp == ExponentialSchedule(start=1.0, end=0.3, decay=0.5, steps=10)
    assert anneal_to(ConstantSchedule(value=0.05), 0.4) == ConstantSchedule(value=0.4)


def test_anneal_to_rescales_piecewise_keeping_its_shape() -> None:
    spec = PiecewiseSchedule(points=[(0, 1.0), (100, 0.1), (1000, 0.01)])
    f = make_schedule(anneal_to(spec, 0.4))
    assert f(0) == 1.0
    assert f(1000) == 0.4
    # Affine in value: (0.1 - 1) * (0.4 - 1) / (0.01 - 1) + 1; still monotone (replacing only the last point
    # would climb from 0.1 back up to 0.4).
    assert f(100) == pytest.approx(1.0 + (0.1 - 1.0) * (0.4 - 1.0) / (0.01 - 1.0))
    assert f(0) >= f(100) >= f(1000)
    flat = anneal_to(PiecewiseSchedule(points=[(10, 0.3)]), 0.2)
    assert make_schedule(flat)(0) == make_schedule(flat)(10**6) == 0.2


def test_epsilon_ladder_matches_ape_x() -> None:
    eps = [epsilon_ladder(i, 8, 0.4, 7.0) for i in range(8)]
    assert eps[0] == pytest.approx(0.4)
    assert eps[7] == pytest.approx(0.4**8)
    assert eps[3] == pytest.approx(0.4**4)  # 1 + 7 * 3 / 7
    assert all(a > b for a, b in itertools.pairwise(eps))
    assert epsilon_ladder(0, 1, 0.4, 7.0) == 0.4
    assert math.isclose(epsilon_ladder(1, 2, 0.5, 1.0), 0.25)


@pytest.mark.parametrize(("agent", "agents"), [(-1, 4), (4, 4), (0, 0)])
def test_epsilon_ladder_rejects_agents_outside_the_hive(agent: int, agents: int) -> None:
    with pytest.raises(ValueError, match="agent"):
        epsilon_ladder(agent, agents, 0.4, 7.0)
