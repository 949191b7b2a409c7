"""Connecting to the memory's Redis: the user and password from the environment, one-line failures, what an
outage is."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

REDIS_PASSWORD_ENV = "BORG_REDIS_PASSWORD"  # where every client (agents, monitor) reads the memory's password
# The Redis user (acl.py: borg-agent, borg-monitor); unset: Redis' default user, as a plain `requirepass` has.
REDIS_USERNAME_ENV = "BORG_REDIS_USERNAME"


def safe_address(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path}"


def with_credentials(url: str, environ: Mapping[str, str] | None = None) -> str:
    """``url`` with the user and password of BORG_REDIS_USERNAME and BORG_REDIS_PASSWORD in it, for redis-py
    only: never log or print the result."""
    environ = os.environ if environ is None else environ
    password, username = environ.get(REDIS_PASSWORD_ENV, ""), environ.get(REDIS_USERNAME_ENV, "")
    if not password:
        return url
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{quote(username, safe='')}:{quote(password, safe='')}@{parts.netloc}"))


class RefusedAccess(ConnectionError):
    """The server is there and refused the user, its password or a command (the memory's ACL): no retry will
    change that."""


# What Redis 7 answers when a script of ours runs a command or touches a key its caller's ACL does not allow (a
# plain error reply, where a direct command gets NOPERM).
_SCRIPT_REFUSED = "user executing the script can't"


def refused_access(err: BaseException) -> bool:
    """The server refused the password (or no longer accepts it), or the user may not run a command."""
    import redis

    if isinstance(err, redis.ResponseError) and _SCRIPT_REFUSED in str(err):
        return True
    return isinstance(err, redis.AuthenticationError | redis.exceptions.NoPermissionError | RefusedAccess)


class UntrustedServer(ConnectionError):
    """The server's TLS certificate did not verify (another CA, another name): no retry will change that."""


def untrusted_server(err: BaseException) -> bool:
    return isinstance(err, UntrustedServer) or "certificate verify failed" in str(err).lower()


def is_outage(err: BaseException) -> bool:
    """A server that is away (down, restarting, unreachable), as opposed to one that refused the password or a
    command (redis-py's AuthenticationError is a ConnectionError, but waiting never cures a wrong password)."""
    import redis

    if refused_access(err) or untrusted_server(err):
        return False
    # BusyLoadingError (a restarted server reading its AOF) is a ConnectionError too.
    return isinstance(err, (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError))


def connect(url: str, *, ca_file: Path | None = None, timeout_s: float = 30.0) -> Any:
    """A ``redis.Redis`` for ``url`` (``redis://[USER]:PASSWORD@HOST:PORT/DB``; ``rediss://`` over TLS, the server's
    certificate and name verified against ``ca_file``, else the system's CAs) that answered PING, retrying for up
    to ``timeout_s``; ConnectionError with one line (the address without the password, and why) after that."""
    import redis

    tls: dict[str, Any] = {}
    if urlsplit(url).scheme == "rediss":
        tls = {"ssl_cert_reqs": "required", "ssl_check_hostname": True,
               "ssl_ca_certs": None if ca_file is None else str(ca_file)}
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, **tls)
    where = safe_address(url)
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        try:
            client.ping()
            return client
        except redis.AuthenticationError as exc:
            raise RefusedAccess(f"redis at {where} refused the user or password: {exc}") from None
        except redis.exceptions.NoPermissionError as exc:
            raise RefusedAccess(f"redis at {where} refused a command to this user: {exc}") from None
        except redis.RedisError as exc:
            if untrusted_server(exc):
                raise UntrustedServer(f"redis at {where}: its TLS certificate did not verify "
                                      f"({' '.join(str(exc).split())})") from None
            if time.monotonic() + delay > deadline:
                raise ConnectionError(
                    f"redis at {where} unreachable after {timeout_s:.0f}s: {' '.join(str(exc).split())}"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
