"""An exception as one line for a log, a status field or a CLI error: its type, then its whitespace-collapsed
message, cut at ``limit`` characters (a server's error can span pages)."""

from __future__ import annotations


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return cut(f"{err.__class__.__name__}: {text}" if text else err.__class__.__name__, limit)


def one_line_text(message: object, limit: int = 300) -> str:
    """A message (a server's reason, an error without its type) whitespace-collapsed and cut; an empty one is
    named by its type."""
    return cut(" ".join(str(message).split()) or message.__class__.__name__, limit)


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
