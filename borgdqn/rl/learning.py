"""When an agent learns: in turn with acting (inline) or at the same time, in a thread of its own (concurrent).

Both keep the replay ratio of ``learner.update_every``: one update per that many env steps the agent adds, counted
from the moment its memory holds ``learning_starts`` steps, and each update's batch, target and priorities come
from `learn_once`. Inline, the updates an env step pays for run right after it, acting with the weights they
produced. Concurrent, a learner thread takes them behind a `RateLimiter` (never ahead of the steps, at most
``learner.rate_limit_slack`` behind) while the actor acts with its own copy of the online network, refreshed every
``learner.actor_sync_every`` updates. The agent's other work (checkpoints, assimilation) pauses the learner thread
between two updates.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from borgdqn.config import BorgConfig
from borgdqn.memory.protocol import MemoryNotReady, ReplayMemory
from borgdqn.rl.learner import Learner, UpdateResult
from borgdqn.rl.networks import LSTMState
from borgdqn.rl.rate_limiter import RateLimiter

log = logging.getLogger(__name__)


@dataclass
class LearnStats:
    """What the updates since the last report did; `take` hands it over and starts afresh (thread-safe)."""

    losses: list[float] = field(default_factory=list)
    mean_qs: list[float] = field(default_factory=list)
    sample_ages: list[float] = field(default_factory=list)  # each batch's mean age (equal batches: mean of means)
    sources: dict[int, int] = field(default_factory=dict)  # rows sampled, by the agent that wrote them
    updates: int = 0
    last_loss: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, result: UpdateResult, age: float, sources: dict[int, int]) -> None:
        with self._lock:
            self.losses.append(result.loss)
            self.mean_qs.append(result.mean_q)
            self.sample_ages.append(age)
            for agent, count in sources.items():
                self.sources[agent] = self.sources.get(agent, 0) + count
            self.updates += 1
            self.last_loss = result.loss

    def take(self) -> LearnStats:
        with self._lock:
            taken = LearnStats(self.losses, self.mean_qs, self.sample_ages, self.sources, self.updates, self.last_loss)
            self.losses, self.mean_qs, self.sample_ages, self.sources, self.updates = [], [], [], {}, 0
            return taken


def learn_once(
    learner: Learner, memory: ReplayMemory, config: BorgConfig, beta: float
) -> tuple[UpdateResult, float, dict[int, int]]:
    """One update from one batch; returns its result, the batch's mean sample age, and the rows it drew by the agent
    that wrote them (the hive mind, measured: whose experience this learner uses)."""
    cfg = config.learner
    if learner.online.recurrent:
        seq = memory.sample_sequences(cfg.batch_size, beta)
        out = learner.update_sequences(seq)
        keys, ages, agent_ids = seq.keys, seq.ages, seq.agent_ids
    else:
        batch = memory.sample(cfg.batch_size, beta)
        out = learner.update(batch)
        keys, ages, agent_ids = batch.keys, batch.ages, batch.agent_ids
    if config.replay.prioritized:
        memory.update_priorities(keys, out.priorities)
    sources = {int(a): int(n) for a, n in zip(*np.unique(agent_ids, return_counts=True), strict=True)}
    return out, float(ages.mean()), sources


class Learning(Protocol):
    """How the agent loop acts and learns; see the module docstring."""

    stats: LearnStats

    def act(self, obs: np.ndarray, core: LSTMState | None, first: np.ndarray | None
            ) -> tuple[np.ndarray, LSTMState | None]: ...

    def stepped(self, steps: int, env_steps: int) -> None:
        """The actor added ``steps`` env steps to the memory; the agent has now taken ``env_steps``."""

    def paused(self) -> contextlib.AbstractContextManager[None]:
        """The learner holds still inside (the agent reads or replaces its state)."""

    def finish(self, drain: bool) -> None:
        """The actor is done: ``drain`` takes the updates its steps paid for first (not when stopped)."""


class _Warmup:
    """Learning starts once the memory holds enough steps, and once started it stays on (the pool only grows)."""

    def __init__(self, memory: ReplayMemory, config: BorgConfig) -> None:
        self._memory = memory
        self._needed = max(config.learner.learning_starts, config.learner.batch_size)
        self.on = False

    def check(self) -> bool:
        self.on = self.on or self._memory.stats().size >= self._needed
        return self.on


class InlineLearning:
    """The updates an env step pays for run in the actor's loop, right after that step."""

    def __init__(self, learner: Learner, memory: ReplayMemory, config: BorgConfig, beta: Callable[[int], float]):
        self._learner, self._memory, self._config, self._beta = learner, memory, config, beta
        self._warmup = _Warmup(memory, config)
        self._due = 0.0
        self.stats = LearnStats()

    def act(self, obs: np.ndarray, core: LSTMState | None, first: np.ndarray | None
            ) -> tuple[np.ndarray, LSTMState | None]:
        return self._learner.act(obs, core, first)

    def stepped(self, steps: int, env_steps: int) -> None:
        self._due += steps / self._config.learner.update_every
        if self._due < 1.0:
            return
        if not self._warmup.check():
            self._due = 0.0
            return
        beta = self._beta(env_steps)
        while self._due >= 1.0:
            try:
                result, age, sources = learn_once(self._learner, self._memory, self._config, beta)
            except MemoryNotReady:
                self._due = 0.0  # nothing to learn from this moment: act on, try at the next step
                return
            self.stats.add(result, age, sources)
            self._due -= 1.0

    def paused(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def finish(self, drain: bool) -> None:
        return None


class ConcurrentLearning:
    """A learner thread behind a rate limiter; the actor acts with a copy of the online network."""

    def __init__(self, learner: Learner, memory: ReplayMemory, config: BorgConfig, beta: Callable[[int], float]):
        self._learner, self._memory, self._config, self._beta = learner, memory, config, beta
        cfg = config.learner
        self._warmup = _Warmup(memory, config)
        self.limiter = RateLimiter(1.0 / cfg.update_every, cfg.rate_limit_slack)
        self.stats = LearnStats()
        self._actor_net = copy.deepcopy(learner.online).requires_grad_(False)
        self._actor_lock = threading.Lock()  # acting vs refreshing the actor's weights
        self._update_lock = threading.Lock()  # one update vs the agent reading or replacing the learner
        self._env_steps = 0
        self._held = False  # the actor holds the learner still (paused)
        self.syncs = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="learner", daemon=True)
        self._thread.start()

    def act(self, obs: np.ndarray, core: LSTMState | None, first: np.ndarray | None
            ) -> tuple[np.ndarray, LSTMState | None]:
        with self._actor_lock:
            return self._learner.act(obs, core, first, network=self._actor_net)

    def stepped(self, steps: int, env_steps: int) -> None:
        self._raise_if_failed()
        self._env_steps = env_steps
        if self._warmup.on or self._warmup.check():
            # Inside a pause the learner cannot take what it owes: waiting for it would wait forever.
            self.limiter.insert(steps, timeout_s=0.0 if self._held else None)
            self._raise_if_failed()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        with self._update_lock:
            self._held = True
            try:
                yield
            finally:
                self._held = False
            self._sync()  # e.g. an adopted network acts from the next step on, as inline

    def finish(self, drain: bool) -> None:
        if drain:
            self.limiter.wait_drained(self._thread.is_alive)
        self.limiter.close()
        self._thread.join()
        self._raise_if_failed()
        log.info("concurrent learning: %d updates, %d forgone, actor waited %.1f s, learner waited %.1f s, "
                 "%d weight syncs", self.limiter.updates - self.limiter.forgone, self.limiter.forgone,
                 self.limiter.actor_wait_s, self.limiter.learner_wait_s, self.syncs)

    def _sync(self) -> None:
        with self._actor_lock, torch.no_grad():
            for mine, theirs in zip(_tensors(self._actor_net), _tensors(self._learner.online), strict=True):
                mine.copy_(theirs)
        self.syncs += 1

    def _run(self) -> None:
        every = self._config.learner.actor_sync_every
        taken = 0
        # OpenMP's thread count is each thread's own: without this the learner would take every core.
        torch.set_num_threads(self._config.hive.threads_per_agent)
        try:
            while self.limiter.acquire():
                with self._update_lock:
                    try:
                        result, age, sources = learn_once(self._learner, self._memory, self._config,
                                                          self._beta(self._env_steps))
                    except MemoryNotReady:
                        self.limiter.forgo()
                        continue
                    self.stats.add(result, age, sources)
                    self.limiter.done()
                    taken += 1
                    if taken % every == 0:
                        self._sync()
        except BaseException as err:  # the actor raises it at its next step
            self._error = err
            self.limiter.close()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the learner thread failed: {self._error}") from self._error


def _tensors(network: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from network.parameters()
    yield from network.buffers()


def make_learning(
    learner: Learner, memory: ReplayMemory, config: BorgConfig, beta: Callable[[int], float]
) -> Learning:
    """``learner.concurrent``: on, off, or auto (on where the learner runs on a GPU, which then need not wait for
    the envs; on a CPU the update costs many times the acting, and a hive's agents already keep the cores busy).
    ``beta``: the importance-weight exponent at the agent's env steps."""
    mode = config.learner.concurrent
    concurrent = mode == "on" or (mode == "auto" and learner.device.type == "cuda")
    if concurrent:
        return ConcurrentLearning(learner, memory, config, beta)
    return InlineLearning(learner, memory, config, beta)
