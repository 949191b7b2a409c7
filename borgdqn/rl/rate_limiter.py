"""The replay ratio held between an agent's actor and its learner thread (Reverb's sample-to-insert ratio).

The actor inserts env steps, the learner takes updates. Each env step pays for ``updates_per_step`` updates (one
per ``learner.update_every``), so that after S steps the learner has done at most ``floor(S * updates_per_step)``
updates (it waits for steps when it is ahead) and at least that many less ``slack`` (the actor waits for the
learner when it falls further behind). The algorithm is the interleaved loop's whatever the two speeds; the slack
only lets each side go on through the other's hiccups.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class RateLimiter:
    """Updates <= steps * updates_per_step <= updates + slack, for one actor thread and one learner thread."""

    def __init__(self, updates_per_step: float, slack: int) -> None:
        if not updates_per_step > 0.0:
            raise ValueError(f"updates_per_step {updates_per_step!r} must be > 0")
        if slack < 1:
            raise ValueError(f"slack {slack!r} must be >= 1 update")
        self.updates_per_step = updates_per_step
        self.slack = slack
        self._cond = threading.Condition()
        self._steps = 0
        self._updates = 0  # done, or forgone when the memory could not serve a batch
        self._closed = False
        self.forgone = 0
        self.actor_wait_s = 0.0
        self.learner_wait_s = 0.0

    def _paid(self) -> int:
        """Updates the steps so far pay for (the interleaved loop's count after the same steps)."""
        return math.floor(self._steps * self.updates_per_step + 1e-9)

    @property
    def updates(self) -> int:
        with self._cond:
            return self._updates

    @property
    def owed(self) -> int:
        """Updates paid for and not yet taken: 0..slack while both sides run."""
        with self._cond:
            return self._paid() - self._updates

    def insert(self, steps: int, *, timeout_s: float | None = None) -> None:
        """Actor: ``steps`` more env steps; returns once the learner owes at most ``slack`` updates (or on close)."""
        with self._cond:
            self._steps += steps
            self._cond.notify_all()
            started = time.monotonic()
            deadline = None if timeout_s is None else started + timeout_s
            while not self._closed and self._paid() - self._updates > self.slack:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            self.actor_wait_s += time.monotonic() - started

    def acquire(self) -> bool:
        """Learner: wait until an update is paid for; False once closed (nothing more to take)."""
        with self._cond:
            started = time.monotonic()
            while not self._closed and self._paid() <= self._updates:
                self._cond.wait()
            self.learner_wait_s += time.monotonic() - started
            return not self._closed

    def done(self) -> None:
        """Learner: one update taken."""
        with self._cond:
            self._updates += 1
            self._cond.notify_all()

    def forgo(self) -> None:
        """Learner: the memory cannot serve a batch now; what is owed is dropped, as the interleaved loop drops it."""
        with self._cond:
            owed = self._paid() - self._updates
            self.forgone += owed
            self._updates += owed
            self._cond.notify_all()

    def wait_drained(self, alive: Callable[[], bool], timeout_s: float = 1.0) -> bool:
        """Actor, at the end of its budget: wait until every paid update is taken; False if ``alive`` turns false."""
        with self._cond:
            while self._paid() > self._updates and not self._closed:
                if not alive():
                    return False
                self._cond.wait(timeout_s)
            return True

    def close(self) -> None:
        """Wake both sides for good: the learner takes no more, the actor waits no more."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
