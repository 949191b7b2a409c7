"""How full the collective's replay memory is, read from its Redis in one short round trip.

The memory is the hive's log, laid out by `borgdqn.memory.redis.keys` (`borg:{name}:config|log|stats|...`): the
fill is the steps the log holds over its capacity, the figure the memory monitor reports, read with the same
`read_state` in one MULTI; the agents' finished marks (`borg:{name}:finished`, the model store's) come with it and
tell when the collective is complete. The operator never writes a key.

Reaching Redis must never hold up a reconcile: each reading runs on a worker thread and is given up after a
short deadline (it covers DNS too, which a socket timeout does not), and a memory that could not be read is not
tried again for a while. An unknown fill is simply left out of the status.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from borgdqn.memory.redis.client import refused_access, untrusted_server
from borgdqn.memory.redis.keys import LinkTotals, LogNotCreated, read_state
from borgdqn.memory.redis.model_store import read_finished
from borgdqn.one_line import one_line


class FillError(Exception):
    """The memory's keys are not what the log's writers write (or not there yet)."""


@dataclass(frozen=True)
class MemoryFill:
    fill: float  # steps the log holds / its capacity
    links: LinkTotals  # what the agents' links report: drops, skips, outages
    finished: Mapping[int, int] = field(default_factory=dict)  # agent id -> env steps when it finished its budget


def read_fill(client: object, name: str) -> MemoryFill:
    """How full memory `name` is, what its agents' links report and which agents finished their budget, through a
    `redis.Redis` client; FillError if the memory is not created."""
    try:
        state = read_state(client, name)
    except (LogNotCreated, ValueError) as err:
        raise FillError(str(err)) from None
    return MemoryFill(state.fill, state.link_totals(), read_finished(client, name))


def fetch_fill(host: str, port: int, username: str | None, password: str | None, name: str,
               timeout_s: float, ca: str | None = None) -> MemoryFill:
    """Connects as ``username`` (the memory's read-only borg-monitor; None: Redis' default user), over TLS verified
    against the CA certificate ``ca`` (PEM) when given, reads the fill, disconnects (raises on any failure)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    tls: dict[str, Any] = {} if ca is None else {"ssl": True, "ssl_ca_data": ca, "ssl_check_hostname": True}
    client = redis.Redis(host=host, port=port, username=username, password=password or None, socket_timeout=timeout_s,
                         socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0), **tls)
    try:
        return read_fill(client, name)
    finally:
        client.close()


@dataclass
class _Failure:
    until: float
    reason: str
    refused: bool  # the memory refused the user, its password, a command or the certificate: no wait cures it


class FillReader:
    """Reads fills with a deadline; after a failure, the same memory is left alone for `quiet_s`."""

    def __init__(self, timeout_s: float = 1.0, quiet_s: float = 60.0,
                 fetch: Callable[[str, int, str | None, str | None, str, float, str | None], MemoryFill] = fetch_fill,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.quiet_s = quiet_s
        self._fetch = fetch
        self._clock = clock
        # Two workers: one stuck in a slow DNS lookup does not stop the readings of other collectives.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="memory-fill")
        self._failures: dict[tuple[str, int, str], _Failure] = {}
        self._lock = threading.Lock()

    def read(self, host: str, port: int, username: str | None, password: str | None, name: str,
             ca: str | None = None) -> tuple[MemoryFill | None, str | None]:
        """(fill, None), or (None, why not) when unknown (failed now, or recently)."""
        where = (host, port, name)
        now = self._clock()
        with self._lock:
            failure = self._failures.get(where)
            if failure is not None and failure.until > now:
                return None, f"not retried yet: {failure.reason}"
        future = self._pool.submit(self._fetch, host, port, username, password, name, self.timeout_s, ca)
        try:
            fill = future.result(timeout=self.timeout_s * 2)
        except concurrent.futures.TimeoutError:
            reason, refused = f"no answer from {host}:{port} within {self.timeout_s * 2:g}s", False
        except Exception as err:  # any failure only means: the fill is unknown
            reason = one_line(err)
            refused = refused_access(err) or untrusted_server(err)
        else:
            with self._lock:
                self._failures.pop(where, None)
            return fill, None
        with self._lock:
            self._failures[where] = _Failure(until=now + self.quiet_s, reason=reason, refused=refused)
        return None, reason

    def refusal(self, host: str, port: int, name: str) -> str | None:
        """Why the memory refused the last read (user, password, command or certificate), while that stands."""
        with self._lock:
            failure = self._failures.get((host, port, name))
        return failure.reason if failure is not None and failure.refused else None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
