"""Connecting to the memory's Redis: the password from the environment, one-line failures, what an outage is."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

REDIS_PASSWORD_ENV = "BORG_REDIS_PASSWORD"  # where every client (agents, monitor) reads the memory's password


def safe_address(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path}"


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` in it, for redis-py only: never log or print the result."""
    parts = urlsplit(url)
    if not password:
        return url
    return urlunsplit(parts._replace(netloc=f":{quote(password, safe='')}@{parts.netloc}"))


class RefusedPassword(ConnectionError):
    """The server is there and refused the password: no retry will change that."""


def refused_password(err: BaseException) -> bool:
    """The server refused the password (or no longer accepts it)."""
    import redis

    return isinstance(err, redis.AuthenticationError | RefusedPassword)


def is_outage(err: BaseException) -> bool:
    """A server that is away (down, restarting, unreachable), as opposed to one that refused a command or the
    password (redis-py's AuthenticationError is a ConnectionError, but waiting never cures a wrong password)."""
    import redis

    if refused_password(err):
        return False
    # BusyLoadingError (a restarted server reading its AOF) is a ConnectionError too.
    return isinstance(err, (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError))


def connect(url: str, *, timeout_s: float = 30.0) -> Any:
    """A ``redis.Redis`` for ``url`` (``redis://:PASSWORD@HOST:PORT/DB``) that answered PING, retrying for up to
    ``timeout_s``; ConnectionError with one line (the address without the password, and why) after that."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    where = safe_address(url)
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        try:
            client.ping()
            return client
        except redis.AuthenticationError as exc:
            raise RefusedPassword(f"redis at {where} refused the password: {exc}") from None
        except redis.RedisError as exc:
            if time.monotonic() + delay > deadline:
                raise ConnectionError(
                    f"redis at {where} unreachable after {timeout_s:.0f}s: {' '.join(str(exc).split())}"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
