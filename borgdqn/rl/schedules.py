"""Schedules (a value as a function of an agent's env steps) and the Ape-X epsilon ladder.

The schedule specs live in :mod:`borgdqn.config`; this module turns them into plain ``step -> float``
callables that cost a few float operations per call, so the acting loop can evaluate them on every step.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from borgdqn.config import (
    ConstantSchedule,
    ExponentialSchedule,
    LinearSchedule,
    PiecewiseSchedule,
    Schedule,
)

__all__ = ["anneal_to", "epsilon_ladder", "make_schedule", "schedule_bounds"]


def make_schedule(spec: Schedule) -> Callable[[int], float]:
    """A callable ``step -> value`` for a schedule spec.

    - constant: ``value``.
    - linear: ``start`` until ``begin``, then straight to ``end`` over ``steps`` steps, then ``end``.
    - exponential: ``start * decay ** (step / steps)``, clamped at ``end`` on the side it travels towards
      (a floor when ``end < start``, a cap when ``end > start``, constant when equal); ``start`` before
      step 0. An ``end`` that lies beyond ``start`` away from 0 is never reached (the decay heads to 0).
    - piecewise: linear interpolation between the points, constant before the first and after the last. Two
      points at the same step make a jump; at exactly that step the later point's value holds.
    """
    if isinstance(spec, ConstantSchedule):
        value = float(spec.value)
        return lambda step: value
    if isinstance(spec, LinearSchedule):
        return _linear(float(spec.start), float(spec.end), int(spec.steps), int(spec.begin))
    if isinstance(spec, ExponentialSchedule):
        return _exponential(float(spec.start), float(spec.end), float(spec.decay), int(spec.steps))
    if isinstance(spec, PiecewiseSchedule):
        return _piecewise([(int(s), float(v)) for s, v in spec.points])
    raise TypeError(f"not a schedule spec: {type(spec).__name__}")


def _linear(start: float, end: float, steps: int, begin: int) -> Callable[[int], float]:
    def value(step: int) -> float:
        frac = min(max((step - begin) / steps, 0.0), 1.0)
        # Written so that frac == 1 gives exactly `end` (start + 1 * (end - start) may round off).
        return end if frac >= 1.0 else start + frac * (end - start)

    return value


def _exponential(start: float, end: float, decay: float, steps: int) -> Callable[[int], float]:
    if end == start:
        # No direction of travel to clamp in; the decay alone would leave `end` behind.
        return lambda step: end
    floor = end < start

    def value(step: int) -> float:
        v = start * decay ** (max(step, 0) / steps)
        return max(v, end) if floor else min(v, end)

    return value


def _piecewise(points: list[tuple[int, float]]) -> Callable[[int], float]:
    steps = [s for s, _ in points]
    values = [v for _, v in points]

    def value(step: int) -> float:
        # bisect_right: at a duplicated step it lands after the last duplicate, so the later value holds there
        # and the interval [s0, s1) below always has s0 < s1.
        i = bisect.bisect_right(steps, step)
        if i == 0:
            return values[0]
        if i == len(steps):
            return values[-1]
        s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
        return v0 + (step - s0) / (s1 - s0) * (v1 - v0)

    return value


def schedule_bounds(spec: Schedule) -> tuple[float, float]:
    """The smallest and largest value a schedule can take over all steps (used to validate specs up front)."""
    if isinstance(spec, ConstantSchedule):
        return spec.value, spec.value
    if isinstance(spec, ExponentialSchedule):
        # It moves from start towards 0 and stops at end if end lies on the way, else it only approaches 0.
        lo0, hi0 = min(spec.start, 0.0), max(spec.start, 0.0)
        stop = spec.end if lo0 <= spec.end <= hi0 else 0.0
        return min(spec.start, stop), max(spec.start, stop)
    if isinstance(spec, LinearSchedule):
        return min(spec.start, spec.end), max(spec.start, spec.end)
    if isinstance(spec, PiecewiseSchedule):
        values = [v for _, v in spec.points]
        return min(values), max(values)
    raise TypeError(f"not a schedule spec: {type(spec).__name__}")


def anneal_to(spec: Schedule, end: float) -> Schedule:
    """The same schedule, but ending at ``end`` (the epsilon ladder's per-agent value); its start is kept.

    - constant: becomes ``end`` (its value is both its start and its end; Ape-X's actors are constant).
    - linear / exponential: ``end`` replaced; same ``steps`` (and ``begin``, ``decay``).
    - piecewise: values rescaled affinely so that the first point keeps its value and the last becomes ``end``
      (keeps the shape, e.g. a monotone schedule stays monotone); when the first and last values are equal the
      last point alone is moved (a single point therefore becomes constant ``end``).
    """
    if isinstance(spec, ConstantSchedule):
        return ConstantSchedule(value=end)
    if isinstance(spec, LinearSchedule | ExponentialSchedule):
        return spec.model_copy(update={"end": end})
    if isinstance(spec, PiecewiseSchedule):
        first, last = spec.points[0][1], spec.points[-1][1]
        if first == last:
            points = [*spec.points[:-1], (spec.points[-1][0], end)]
        else:
            scale = (end - first) / (last - first)
            points = [(s, first + (v - first) * scale) for s, v in spec.points]
            points[-1] = (points[-1][0], end)  # exactly, not up to rounding
        return PiecewiseSchedule(points=points)
    raise TypeError(f"not a schedule spec: {type(spec).__name__}")


def epsilon_ladder(agent: int, agents: int, base: float, alpha: float) -> float:
    """Ape-X: agent ``i`` of ``N`` explores with ``base ** (1 + alpha * i / (N - 1))``; ``base`` if N == 1."""
    if agents < 1:
        raise ValueError(f"agents must be >= 1 (got {agents})")
    if not 0 <= agent < agents:
        raise ValueError(f"agent must be in [0, {agents}) (got {agent})")
    if agents == 1:
        return float(base)
    return ladder_epsilon_at(agent / (agents - 1), base, alpha)


def ladder_epsilon_at(position: float, base: float, alpha: float) -> float:
    """The ladder's epsilon at ``position`` in [0, 1]: ``base`` at 0, ``base ** (1 + alpha)`` at 1."""
    if not 0.0 <= position <= 1.0:
        raise ValueError(f"ladder position must be in [0, 1] (got {position})")
    return float(base ** (1.0 + alpha * position))
