"""The rate limiter between an agent's actor and its learner thread: real threads, the invariant checked live."""

from __future__ import annotations

import threading
import time

import pytest

from borgdqn.rl.rate_limiter import RateLimiter


def _learner(limiter: RateLimiter, seconds_per_update: float, seen_ahead: list[int]) -> threading.Thread:
    def run() -> None:
        while limiter.acquire():
            seen_ahead.append(-limiter.owed)  # > 0 would be an update the steps have not paid for
            time.sleep(seconds_per_update)
            limiter.done()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("seconds_per_update", [0.0, 0.002])
def test_the_learner_never_runs_ahead_nor_falls_more_than_the_slack_behind(seconds_per_update: float) -> None:
    """A fast learner waits for steps; a slow one holds the actor back. Either way the count is the inline loop's."""
    limiter = RateLimiter(updates_per_step=1 / 4, slack=5)
    ahead: list[int] = []
    thread = _learner(limiter, seconds_per_update, ahead)
    owed_after_insert = []
    for _ in range(400):
        limiter.insert(8)  # a vector step of 8 envs pays for 2 updates
        owed_after_insert.append(limiter.owed)
    assert limiter.wait_drained(thread.is_alive)
    limiter.close()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert limiter.updates == 400 * 8 // 4  # exactly what the steps paid for
    assert max(ahead) <= -1 and min(ahead) >= -(5 + 2)  # it took an update only when one was owed
    assert max(owed_after_insert) <= 5
    if seconds_per_update:
        assert limiter.actor_wait_s > 0.1  # the slow learner held the actor back
        assert max(owed_after_insert) == 5
    else:
        assert limiter.learner_wait_s > 0.0


def test_a_fractional_ratio_pays_whole_updates_only() -> None:
    limiter = RateLimiter(updates_per_step=1 / 3, slack=100)
    limiter.insert(2)
    assert limiter.owed == 0
    limiter.insert(1)
    assert limiter.owed == 1
    limiter.insert(5)  # 8 steps: 2 updates
    assert limiter.owed == 2


def test_forgone_updates_are_dropped_as_inline_drops_them() -> None:
    limiter = RateLimiter(updates_per_step=1.0, slack=10)
    limiter.insert(6)
    limiter.forgo()
    assert (limiter.owed, limiter.forgone, limiter.updates) == (0, 6, 6)
    limiter.insert(1)
    assert limiter.owed == 1


def test_close_wakes_a_waiting_actor_and_learner() -> None:
    limiter = RateLimiter(updates_per_step=1.0, slack=1)
    learner_result: list[bool] = []
    learner = threading.Thread(target=lambda: learner_result.append(limiter.acquire()), daemon=True)
    learner.start()  # nothing paid for: it waits (or finds the limiter closed: False either way)
    limiter.close()
    learner.join(timeout=5)
    assert learner_result == [False] and not learner.is_alive()

    limiter = RateLimiter(updates_per_step=1.0, slack=1)
    actor = threading.Thread(target=limiter.insert, args=(3,), daemon=True)
    actor.start()  # owes 3 > slack 1 with no learner: waits
    deadline = time.monotonic() + 10
    while limiter.owed != 3 and time.monotonic() < deadline:  # the lock is free again only inside its wait
        time.sleep(0.01)
    assert limiter.owed == 3 and actor.is_alive()
    limiter.close()
    actor.join(timeout=5)
    assert not actor.is_alive()


def test_an_actor_stops_waiting_for_a_dead_learner() -> None:
    limiter = RateLimiter(updates_per_step=1.0, slack=1)
    limiter.insert(1)
    assert limiter.wait_drained(lambda: False, timeout_s=0.01) is False
    limiter.insert(1, timeout_s=0.05)  # owed 2 > slack 1: waits, then gives up at its deadline
    assert limiter.actor_wait_s >= 0.05


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="updates_per_step"):
        RateLimiter(updates_per_step=0.0, slack=1)
    with pytest.raises(ValueError, match="slack"):
        RateLimiter(updates_per_step=1.0, slack=0)
