"""The one error every harness part raises: its message is the reason a test that needs the part fails."""

from __future__ import annotations


class HarnessError(RuntimeError):
    """A part could not be installed, built or started. The message says why and ends with a log tail."""
