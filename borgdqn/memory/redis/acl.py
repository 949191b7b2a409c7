"""The memory's Redis users: who may run which commands on which keys (the memory image renders them, the
operator hands out their passwords, the tests hold each user to them).

    borg-agent    an agent: the log, the model store and its link report, i.e. the commands of writer.py,
                  tail.py, model_store.py and link.py, on its own memory's keys (``borg:{name}:*``) only
    borg-monitor  the memory monitor sidecar and the operator's status: reads of those keys and INFO, nothing else
    borg-admin    the memory pod's own administrator (a person with ``kubectl exec``): every command
    default       off: a client that does not say who it is gets ``-NOAUTH`` for everything (its rights are
                  those of the server replaying its own append-only file, see DEFAULT_OFF)

Nothing but ``borg-admin`` may run an administrative or dangerous command (FLUSHALL, CONFIG, SHUTDOWN, DEBUG,
KEYS, CLIENT KILL, ...), touch another memory's keys, or use pub/sub. Each password is a key of the collective's
Secret of the same name as the file the memory pod mounts (``agent-password``, ...); redis.conf receives only
its SHA-256 (``#<hex>``), so the rendered config holds no password.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

# redis-py also sends CLIENT SETINFO on connect (Redis 7.2+) and ignores a refusal: not granted.
_CONNECTION = ("auth", "hello", "ping", "select", "multi", "exec", "discard")


@dataclass(frozen=True)
class RedisUser:
    name: str  # the ACL user name (BORG_REDIS_USERNAME of its clients)
    secret_key: str  # its password's key in the collective's Secret, and its file name where that is mounted
    commands: tuple[str, ...]  # what it may run; () with everything=True for the administrator
    read_only: bool = False  # its key pattern admits reads only (a second wall behind the command list)
    everything: bool = False  # every command on every key and channel

    def rules(self, memory: str, password: str) -> str:
        """The ``user`` line of redis.conf (and the arguments of ``ACL SETUSER``) for memory ``memory``."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", memory):
            raise ValueError(f"{memory!r} is not a memory name (letters, digits, '_', '.', '-'; 1-64)")
        if not password:
            raise ValueError(f"no password for the Redis user {self.name}")
        digest = hashlib.sha256(password.encode()).hexdigest()
        if self.everything:
            grants = "~* &* +@all"
        else:
            pattern = f"{'%R' if self.read_only else ''}~borg:{{{memory}}}:*"
            grants = f"{pattern} resetchannels -@all " + " ".join(f"+{c}" for c in self.commands)
        return f"user {self.name} reset on #{digest} {grants}"


AGENT = RedisUser(
    name="borg-agent",
    secret_key="agent-password",
    commands=(*_CONNECTION, "evalsha", "script|load", "script|exists",
              "get", "set", "exists",
              "hget", "hset", "hdel", "hincrby", "hgetall", "hmget", "hvals",
              "xadd", "xrange", "xread", "xlen", "xtrim"),
)  # fmt: skip
MONITOR = RedisUser(
    name="borg-monitor",
    secret_key="monitor-password",
    commands=(*_CONNECTION, "info", "get", "hget", "hgetall", "hmget", "hvals", "xlen"),
    read_only=True,
)
ADMIN = RedisUser(name="borg-admin", secret_key="admin-password", commands=(), everything=True)
USERS = (AGENT, MONITOR, ADMIN)
# Redis' built-in user: off, so that every client must name one of the users above (off: nobody can log in as
# it, with any password). Its rights stay whole because Redis 7.0 replays the append-only file as this user: with
# none, every MULTI/EXEC in the file (the effects of our scripts) is refused at load and the memory comes back
# without them (tests/images/test_memory_image.py restarts a memory the agents wrote to through their scripts).
DEFAULT_OFF = "user default reset off ~* &* +@all"


def acl_config(memory: str, passwords: Mapping[str, str]) -> str:
    """The redis.conf lines of every user for memory ``memory``; ``passwords`` maps each user's secret_key to its
    password. ValueError (one line) when one is missing or two users share one (which would blur who did what)."""
    missing = [user.secret_key for user in USERS if not passwords.get(user.secret_key)]
    if missing:
        raise ValueError(f"no password for {', '.join(missing)}")
    if len({passwords[user.secret_key] for user in USERS}) < len(USERS):
        raise ValueError(f"the users' passwords ({', '.join(u.secret_key for u in USERS)}) must differ")
    return "\n".join([DEFAULT_OFF, *(user.rules(memory, passwords[user.secret_key]) for user in USERS)]) + "\n"
