"""An exception as one line for a log, a status field or a CLI error: its type, then its whitespace-collapsed
message, cut at ``limit`` characters (a server's error can span pages)."""

from __future__ import annotations


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    text = f"{err.__class__.__name__}: {text}" if text else err.__class__.__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
