"""What an agent reports, written once to every sink: its metrics file (JSONL, read by `borgdqn plot`, the
summary and the dashboard), Kafka (the protobuf telemetry the indexer puts in Elasticsearch) and the hive's live
view (AgentReport objects on a queue).

One method per record kind (a finished game, training progress with the memory and the Redis link, an adoption,
a checkpoint put in the model store); each writes the same numbers to each sink that takes its kind. A new kind of
record is a method here, a proto message and, for Kafka, a row in borgdqn/telemetry/events.py.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from borgdqn.memory.protocol import ReplayMemory
from borgdqn.memory.redis.link import RedisLink
from borgdqn.metrics import EpisodeTally, MetricsWriter
from borgdqn.proto.borg.v1 import telemetry_pb2 as pb
from borgdqn.rl.actor import Game
from borgdqn.rl.learning import LearnStats
from borgdqn.telemetry.producer import TelemetryProducer


@dataclass
class AgentReport:
    """What an agent tells the hive runner now and then (and when an episode ends)."""

    agent: int
    env_steps: int
    episodes: int
    updates: int
    mean_return: float | None
    best_mean_return: float | None
    epsilon: float
    loss: float | None
    env_steps_per_s: float
    updates_per_s: float
    memory_size: int
    memory_capacity: int
    done: bool = False
    loading: float | None = None  # a Redis replica loading the hive's log: the part loaded so far


@dataclass(frozen=True)
class Progress:
    """Where the agent stands at a report: its counts, its games' tally and its exploration and learning rate."""

    env_steps: int
    updates: int
    tally: EpisodeTally
    epsilon: float
    learning_rate: float


class Reporter:
    """The sinks of agent ``agent``: ``metrics`` always, ``telemetry`` (Kafka) and ``reports`` (anything with
    ``put_nowait``: the live view's queue) where given; ``memory_reports``: this agent also reports the memory (one
    agent per hive does). Times are seconds since ``started`` (monotonic)."""

    def __init__(self, agent: int, memory: ReplayMemory, metrics: MetricsWriter, telemetry: TelemetryProducer | None,
                 reports: Any, *, memory_reports: bool, started: float, env_steps: int) -> None:  # fmt: skip
        self.agent = agent
        self.metrics = metrics
        self._memory = memory
        self._telemetry = telemetry
        self._reports = reports
        self._memory_reports = memory_reports
        self._started = started
        self._window = (time.monotonic(), env_steps)  # (when, env steps) at the previous report
        self._memory_before: tuple[float, int, int] | None = None  # (when, inserted, sampled) at the previous one
        self._last_loss: float | None = None
        self.last_report = 0.0

    def wall(self) -> float:
        return time.monotonic() - self._started

    def game(self, game: Game, env_steps: int, episode: int, epsilon: float) -> None:
        """A full game ended; ``env_steps``: the agent's count after the step that ended it."""
        wall = self.wall()
        self.metrics.write("episode", agent=self.agent, env_steps=env_steps, episode=episode,
                           **{"return": game.episode_return}, length=game.length, policy=game.label, epsilon=epsilon,
                           wall=wall)  # fmt: skip
        if self._telemetry is not None:
            self._telemetry.emit(pb.EpisodeEvent(
                agent=self.agent, policy=game.label, episode_return=game.episode_return, length=game.length,
                env_steps=env_steps, episode=episode, epsilon=epsilon, wall_seconds=wall,
            ))  # fmt: skip

    def progress(self, now: Progress, learned: LearnStats, *, done: bool = False) -> None:
        """A train record (and the memory's and the link's), and a report for the hive's view."""
        when = time.monotonic()
        wall = when - self._started
        span = max(when - self._window[0], 1e-9)
        self._last_loss = learned.last_loss if learned.last_loss is not None else self._last_loss
        stats = self._memory.stats()
        redis_link = self._memory if isinstance(self._memory, RedisLink) else None
        link = redis_link.snapshot() if redis_link is not None else None
        tally = now.tally
        rep = AgentReport(
            agent=self.agent, env_steps=now.env_steps, episodes=tally.episodes, updates=now.updates,
            mean_return=tally.mean, best_mean_return=tally.best_mean, epsilon=now.epsilon, loss=self._last_loss,
            env_steps_per_s=(now.env_steps - self._window[1]) / span, updates_per_s=learned.updates / span,
            memory_size=stats.size, memory_capacity=stats.capacity, done=done,
            loading=redis_link.loading if redis_link is not None else None,
        )  # fmt: skip
        loss = float(np.mean(learned.losses)) if learned.losses else None
        mean_q = float(np.mean(learned.mean_qs)) if learned.mean_qs else None
        sample_age = float(np.mean(learned.sample_ages)) if learned.sample_ages else None
        self.metrics.write(
            "train", agent=self.agent, env_steps=now.env_steps, updates=now.updates, loss=loss, mean_q=mean_q,
            replay_sample_age=sample_age, sampled_by_agent={str(a): n for a, n in sorted(learned.sources.items())},
            env_steps_per_s=rep.env_steps_per_s, updates_per_s=rep.updates_per_s, epsilon=rep.epsilon, wall=wall,
        )  # fmt: skip
        if self._telemetry is not None:
            self._telemetry.emit(pb.TrainingReport(
                agent=self.agent, env_steps=now.env_steps, updates=now.updates, loss=loss, mean_q=mean_q,
                learning_rate=now.learning_rate, updates_per_s=rep.updates_per_s,
                env_steps_per_s=rep.env_steps_per_s, replay_sample_age=sample_age, epsilon=rep.epsilon,
                mean_return=tally.mean, best_mean_return=tally.best_mean, wall_seconds=wall,
            ))  # fmt: skip
        if self._memory_reports:
            self._memory_record(stats, link, when, wall)
        if link is not None:
            # What the agent's link to the Redis log did: drops, skips, bad chunks, outages, lag, catch-up.
            self.metrics.write("link", **asdict(link), wall=wall)
        self._window = (when, now.env_steps)
        self.last_report = when
        if self._reports is not None:
            # A full queue only costs the view one refresh.
            with contextlib.suppress(Exception):
                self._reports.put_nowait(rep)

    def _memory_record(self, stats: Any, link: Any, when: float, wall: float) -> None:
        memory_bytes = int(getattr(self._memory, "nbytes", 0))
        self.metrics.write("memory", size=stats.size, capacity=stats.capacity, inserted=stats.inserted,
                           sampled=stats.sampled, bytes=memory_bytes,
                           per_agent={str(a): n for a, n in stats.per_agent.items()}, wall=wall)  # fmt: skip
        if self._telemetry is None:
            return
        mem = pb.MemoryReport(
            size=stats.size, capacity=stats.capacity, inserted=stats.inserted, sampled=stats.sampled,
            rejected=stats.rejected, bytes_used=memory_bytes, per_agent_steps=stats.per_agent, wall_seconds=wall,
        )  # fmt: skip
        before = self._memory_before
        if before is not None and when > before[0]:
            mem.insert_rate = (stats.inserted - before[1]) / (when - before[0])
            mem.sample_rate = (stats.sampled - before[2]) / (when - before[0])
        self._memory_before = (when, stats.inserted, stats.sampled)
        if link is not None:
            mem.dropped_chunks, mem.skipped_chunks = link.dropped_chunks, link.skipped_chunks
            mem.outage_seconds, mem.write_errors = link.away_s, link.write_errors
            if link.lag_p99_ms is not None:
                mem.replication_lag_p99_ms = link.lag_p99_ms
        self._telemetry.emit(mem)

    def assimilation(self, event: pb.AssimilationEvent) -> None:
        """One adoption (the message's fields, and its wall time, are the metrics row's too)."""
        event.wall_seconds = wall = self.wall()
        row = {field.name: getattr(event, field.name) if not field.has_presence or event.HasField(field.name) else None
               for field in event.DESCRIPTOR.fields if field.name != "wall_seconds"}
        self.metrics.write("assimilation", **row, wall=wall)
        if self._telemetry is not None:
            self._telemetry.emit(event)

    def stored(self, env_steps: int, size_bytes: int, *, seconds: float | None = None, store_bytes: int | None = None,
               error: str | None = None) -> None:  # fmt: skip
        """A checkpoint put in the hive's model store (or not: ``error``)."""
        if error is not None:
            self.metrics.write("store", env_steps=env_steps, stored=False, size_bytes=size_bytes, error=error)
        else:
            self.metrics.write("store", env_steps=env_steps, stored=True, size_bytes=size_bytes, seconds=seconds,
                               store_bytes=store_bytes)  # fmt: skip

    def close(self) -> None:
        if self._telemetry is not None:
            self._telemetry.close(timeout_s=5.0)
        self.metrics.close()
