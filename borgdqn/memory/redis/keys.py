"""The Redis key layout of one hive's experience log: the only module that knows key names and field names.

Every key shares the hash tag ``{name}`` (``replay.redis_name``), so that several hives can share one Redis and one
script may touch all of a log's keys:

    borg:{name}:config  JSON of the log's shape (capacity, chunk length, frame shape and dtype, recurrent size);
                        the first client writes it, later ones must match it
    borg:{name}:log     a Redis stream: one entry per trajectory chunk, id ``<g>-1`` where g counts chunks from 1;
                        fields ``d`` (a ``borg.v1.TrajectoryChunk``), ``a`` (agent), ``t`` (steps), ``w`` (the
                        unix time in ms its agent added it, for the replication lag)
    borg:{name}:stats   hash: ``chunks`` (g of the newest entry), ``inserted`` (steps ever), ``size`` (steps held),
                        ``bytes`` (chunk bytes held), ``trimmed`` (chunks trimmed)
    borg:{name}:agents  hash: agent id -> steps held
    borg:{name}:links   hash: agent label -> JSON of its link's counters (drops, skips, outages, lag), refreshed
                        every few seconds by each agent, read by the memory monitor and the operator

The hive's model store (``model_store``) shares the tag: what an agent must keep when its pod goes.

    borg:{name}:model:<k>  agent k's latest checkpoint (the bytes of its ``.pt`` file)
    borg:{name}:models     hash: agent id -> JSON of that checkpoint's entry (env steps, best mean, size, time)
    borg:{name}:best       JSON: the agent with the best mean return over 20 episodes, and that mean
    borg:{name}:finished   hash: agent id -> the env steps it had when it finished its budget (the operator's
                           sign that a collective is complete)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

# Fields of a log entry.
F_DATA, F_AGENT, F_STEPS, F_WRITTEN = b"d", b"a", b"t", b"w"


def _tagged(name: str) -> str:
    """The prefix of every key of hive ``name``: one hash tag, so that one script may touch all of them."""
    return f"borg:{{{name}}}"


@dataclass(frozen=True)
class LogKeys:
    config: str
    log: str
    stats: str
    agents: str
    links: str

    @classmethod
    def of(cls, name: str) -> LogKeys:
        base = _tagged(name)
        return cls(*(f"{base}:{part}" for part in ("config", "log", "stats", "agents", "links")))

    def all(self) -> list[str]:
        return [self.config, self.log, self.stats, self.agents, self.links]


@dataclass(frozen=True)
class StoreKeys:
    models: str
    best: str
    finished: str
    model_prefix: str

    @classmethod
    def of(cls, name: str) -> StoreKeys:
        base = _tagged(name)
        return cls(models=f"{base}:models", best=f"{base}:best", finished=f"{base}:finished",
                   model_prefix=f"{base}:model:")

    def model(self, agent: int) -> str:
        return f"{self.model_prefix}{agent}"


@dataclass(frozen=True)
class LogShape:
    """What every client of one log must agree on: it is stored in ``borg:{name}:config``."""

    capacity: int  # steps the log holds; the oldest whole chunks are trimmed beyond it
    chunk_length: int
    frame_shape: tuple[int, ...]
    frame_dtype: str  # numpy dtype string, e.g. "|u1"
    recurrent_hidden: int = 0  # LSTM: the size of a chunk's stored state (0: none)

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.chunk_length < 1 or not self.frame_shape or min(self.frame_shape) < 1:
            raise ValueError(f"a log needs capacity, chunk_length and frame dimensions >= 1: {self}")
        if self.recurrent_hidden < 0:
            raise ValueError(f"recurrent_hidden must be >= 0, not {self.recurrent_hidden}")

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "frame_shape": list(self.frame_shape)}, sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str, where: str = "config") -> LogShape:
        """The shape stored at ``where``; ValueError (one line) for anything else."""
        try:
            data: Any = json.loads(raw)
            return cls(capacity=int(data["capacity"]), chunk_length=int(data["chunk_length"]),
                       frame_shape=tuple(int(d) for d in data["frame_shape"]), frame_dtype=str(data["frame_dtype"]),
                       recurrent_hidden=int(data.get("recurrent_hidden", 0)))
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{where} is not a borgdqn log shape ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class LogState:
    """One consistent reading of the log's counters (``read_state``)."""

    shape: LogShape
    chunks: int  # g of the newest entry (chunks ever appended)
    held_chunks: int  # entries in the stream now
    inserted: int
    size: int
    bytes: int
    trimmed: int
    per_agent: dict[int, int]
    links: dict[str, dict[str, Any]]  # each agent's link counters, as it last wrote them

    @property
    def fill(self) -> float:
        return self.size / self.shape.capacity

    def link_totals(self) -> LinkTotals:
        return LinkTotals.of(self.links)


LIVE_S = 60.0  # a link that has not reported for this long belongs to an agent that is gone (links report every 5 s)


@dataclass(frozen=True)
class LinkTotals:
    """What the agents' links last reported, over the hive (hostile or malformed values count as nothing)."""

    links: int = 0  # agents whose link reported within the last ``LIVE_S`` (live agents)
    catching_up: int = 0  # of them, replicas still loading the log
    sampled: int = 0  # transitions or sequences sampled from the replicas (sum)
    bad_chunks: int = 0  # log entries that did not decode (the most any tail counted: each tail sees them all)
    dropped_chunks: int = 0  # own chunks dropped while Redis was away (sum)
    write_errors: int = 0  # appends Redis refused (e.g. OOM under maxmemory): their chunks are lost (sum)
    skipped_chunks: int = 0  # entries trimmed before a tail read them (sum over tails)
    outage_s: float = 0.0  # the longest time any agent spent without Redis
    lag_p99_ms: float | None = None  # the worst agent's write-to-replica lag, 99th percentile

    @classmethod
    def of(cls, links: dict[str, dict[str, Any]], now: float | None = None) -> LinkTotals:
        """Totals over every report (counters are cumulative: a pod that is gone still lost what it lost), while
        ``links``, ``catching_up`` and the lag count only live agents (a report younger than ``LIVE_S``)."""
        reports = list(links.values())
        now = time.time() if now is None else now
        live = [r for r in reports if now - _amount(r.get("time")) < LIVE_S]

        def total(name: str) -> int:
            return sum(int(_amount(r.get(name))) for r in reports)

        def most(name: str) -> float:
            return max((_amount(r.get(name)) for r in reports), default=0.0)

        lags = [_amount(r.get("lag_p99_ms")) for r in live if r.get("lag_p99_ms") is not None]
        return cls(links=len(live), catching_up=sum(1 for r in live if r.get("caught_up") is False),
                   sampled=total("sampled"), bad_chunks=int(most("bad_chunks")), dropped_chunks=total("dropped_chunks"),
                   write_errors=total("write_errors"),
                   skipped_chunks=total("skipped_chunks"), outage_s=most("away_s"),
                   lag_p99_ms=max(lags) if lags else None)


def _amount(value: Any) -> float:
    """A counter from an agent's link report (JSON written by each agent): anything else counts as 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return 0.0
    return float(value)


class LogNotCreated(LookupError):
    """No client has created the log yet (``borg:{name}:config`` is absent)."""


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def read_state(client: Any, name: str) -> LogState:
    """Read log ``name``'s counters in one MULTI; never writes. LogNotCreated, ValueError (a config that is
    not ours) or redis' errors."""
    k = LogKeys.of(name)
    pipe = client.pipeline(transaction=True)
    pipe.get(k.config)
    pipe.hgetall(k.stats)
    pipe.hgetall(k.agents)
    pipe.hgetall(k.links)
    pipe.xlen(k.log)
    config_b, stats, agents, links, held = pipe.execute()
    if config_b is None:
        raise LogNotCreated(f"memory {name!r} not created yet (no {k.config})")
    shape = LogShape.from_json(config_b, k.config)
    counters = {key.decode(): _int(value) for key, value in stats.items()}
    per_agent = {_int(a): _int(n) for a, n in agents.items() if _int(n) > 0}
    parsed: dict[str, dict[str, Any]] = {}
    for label, raw in links.items():
        try:
            value = json.loads(raw)
        except ValueError:
            continue  # a hostile or half-written entry says nothing
        if isinstance(value, dict):
            parsed[label.decode(errors="replace")] = value
    return LogState(shape=shape, chunks=counters.get("chunks", 0), held_chunks=int(held),
                    inserted=counters.get("inserted", 0), size=counters.get("size", 0),
                    bytes=counters.get("bytes", 0), trimmed=counters.get("trimmed", 0), per_agent=per_agent,
                    links=parsed)
