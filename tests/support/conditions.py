"""Waiting for a condition that another thread or process makes true (never sleeping a fixed time to pass)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(check: Callable[[], T], what: str, timeout_s: float = 30.0, every_s: float = 0.05) -> T:
    """Polls ``check`` until it returns something truthy (and returns that); fails naming ``what`` after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout_s:.0f}s")
        time.sleep(every_s)
