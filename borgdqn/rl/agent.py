"""One agent of the hive: acts in its vector env, writes what it saw to the shared memory, learns from the pool.

Read top to bottom this is the whole DQN loop of one agent process:

    observe -> Q-values -> policy picks actions -> env steps -> adder writes steps to the memory
            -> every `update_every` env steps: sample the pooled memory -> learner update -> new priorities

The updates run here, in turn with acting, or in a learner thread alongside it at the same ratio
(`learner.concurrent`, borgdqn.rl.learning).

Every agent has its own online/target networks and optimizer; what the agents share is the experience.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.synchronize
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from borgdqn.config import BorgConfig
from borgdqn.memory.protocol import ReplayMemory, SamplingSpec
from borgdqn.memory.redis.link import RedisLink
from borgdqn.memory.redis.model_store import ModelEntry
from borgdqn.metrics import MEAN_WINDOW, EpisodeTally, MetricsWriter, agent_metrics_path
from borgdqn.one_line import one_line
from borgdqn.proto.borg.v1 import telemetry_pb2 as pb
from borgdqn.rl.adder import ChunkAdder
from borgdqn.rl.assimilation import Assimilation, adopt, choose_donor, epsilon_floor, perturbed
from borgdqn.rl.checkpoint import (
    AgentCheckpoint,
    CheckpointError,
    agent_checkpoint_path,
    check_learner_state,
    checkpoint_bytes,
    load_agent_checkpoint,
    save_agent_checkpoint,
)
from borgdqn.rl.envs import make_vector_env
from borgdqn.rl.frame_stack import FrameStacker
from borgdqn.rl.identity import AgentIdentity
from borgdqn.rl.learner import Learner
from borgdqn.rl.learning import make_learning
from borgdqn.rl.model_store import ModelStore, RunDirModelStore
from borgdqn.rl.policies import ActorPolicy, build_policy
from borgdqn.rl.schedules import make_schedule
from borgdqn.telemetry.producer import producer_for

log = logging.getLogger(__name__)


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


def _put_in_store(store: ModelStore, entry: ModelEntry, state: AgentCheckpoint, data: bytes,
                  metrics: MetricsWriter) -> None:
    """Put a checkpoint in the hive's model store; trouble there never stops the agent (its run dir has it)."""
    started = time.perf_counter()
    try:
        total = store.put(entry, data)
    except Exception as err:
        log.warning("model store: checkpoint at env_steps=%d kept in the run dir only: %s", state.env_steps,
                    one_line(err))
        metrics.write("store", env_steps=state.env_steps, stored=False, size_bytes=len(data), error=one_line(err))
        return
    seconds = time.perf_counter() - started
    log.info("model store: checkpoint at env_steps=%d stored (%.1f MB in %.2fs; the store holds %.1f MB)",
             state.env_steps, len(data) / 1e6, seconds, total / 1e6)
    metrics.write("store", env_steps=state.env_steps, stored=True, size_bytes=len(data), seconds=seconds,
                  store_bytes=total)


def run_agent(
    identity: AgentIdentity,
    config: BorgConfig,
    memory: ReplayMemory,
    run_dir: Path,
    *,
    stop: multiprocessing.synchronize.Event | None = None,
    reports: Any = None,
    resume: bool = False,
    clock_offset: float = 0.0,
    store: ModelStore | None = None,
) -> AgentCheckpoint:
    """Run the agent ``identity`` until its ``steps`` are done, its mean return reaches
    ``hive.stop_at_mean_return`` (it then sets ``stop``: the hive ends with it) or ``stop`` is set; returns its
    final state.

    ``reports`` is anything with ``put_nowait`` (a multiprocessing queue): AgentReport objects go there.
    ``store``: the hive's model store when it is not the run dir (a collective's memory), which gets each
    checkpoint besides the run dir; assimilation ranks and adopts from it.
    """
    env_cfg, learn_cfg = config.env, config.learner
    agent, seed, budget = identity.agent_id, identity.seed, identity.steps

    env = make_vector_env(env_cfg, seed=seed)
    spec = env.spec
    stack = env_cfg.frame_stack
    learner = Learner(config.network, learn_cfg, spec, stack, seed=seed, threads=config.hive.threads_per_agent)

    def make_policy(floor: float | None) -> ActorPolicy:
        return build_policy(config.policy, num_envs=env.num_envs, num_actions=spec.num_actions, seed=seed,
                            ladder_epsilon=floor)

    policy = make_policy(identity.ladder_epsilon)
    beta = make_schedule(config.replay.beta)
    recurrent = learner.online.recurrent
    adder = ChunkAdder(
        memory,
        agent=agent,
        stream_base=identity.stream_base,
        num_envs=env.num_envs,
        chunk_length=config.replay.chunk_length,
        frame_shape=spec.frame_shape,
        frame_dtype=spec.frame_dtype,
        recurrent_hidden=learner.online.hidden_size if recurrent else None,
    )
    state = AgentCheckpoint(agent=agent)
    if resume:
        found = load_agent_checkpoint(run_dir, agent)
        if found is not None:
            saved_config, loaded = found
            state = loaded
            check_learner_state(loaded.learner, learner.online, agent_checkpoint_path(run_dir, agent))
            learner.load_state_dict(loaded.learner)
            # Assimilation's rate and floor go on, unless the config changed them since (the user's word wins).
            if loaded.learning_rate is not None and saved_config.learner.lr == learn_cfg.lr:
                learner.set_learning_rate(loaded.learning_rate)
            else:
                state.learning_rate = None
            same_policy = (saved_config.policy, saved_config.epsilon_ladder) == (config.policy, config.epsilon_ladder)
            if loaded.epsilon_floor is not None and same_policy:
                policy = make_policy(loaded.epsilon_floor)
            else:
                state.epsilon_floor = None
            policy.load_state_dict(loaded.policy)
            log.info("agent=%d resumed env_steps=%d updates=%d", agent, state.env_steps, learner.updates)
    local_store = RunDirModelStore(run_dir)
    hive_store: ModelStore = store if store is not None else local_store
    assimilation = config.hive.assimilation
    # Its own stream: assimilation's draws change nothing else the seed decides.
    assimilation_rng = np.random.default_rng([seed, 0xA551])
    next_assimilation = state.env_steps + assimilation.every
    metrics = MetricsWriter(agent_metrics_path(run_dir, agent))
    tally = EpisodeTally(episodes=state.episodes, recent=list(state.recent_returns), best_mean=state.best_mean)
    started = time.monotonic() - clock_offset

    num_envs = env.num_envs
    frames = env.reset(seed=seed + state.env_steps)
    stacker = FrameStacker(num_envs, stack, spec.frame_shape, spec.frame_dtype)
    obs = stacker.reset(frames)
    first = np.ones(num_envs, dtype=bool)
    last = np.zeros(num_envs, dtype=bool)
    terminated = np.zeros(num_envs, dtype=bool)
    core_state = learner.online.initial_state(num_envs, learner.device) if recurrent else None
    policy.begin_episodes(np.ones(num_envs, dtype=bool), state.env_steps)
    episode_return = np.zeros(num_envs, dtype=np.float64)
    episode_length = np.zeros(num_envs, dtype=np.int64)
    game_starting = np.zeros(num_envs, dtype=bool)

    new_best = False
    window_start, window_steps = time.monotonic(), 0
    next_checkpoint = state.env_steps + config.hive.checkpoint_every
    last_report = 0.0
    last_loss: float | None = None
    # Live telemetry (telemetry.kafka): emit only queues an event; a background thread talks to Kafka.
    telemetry = producer_for(config, "agent", agent, name=identity.label)
    memory_before: tuple[float, int, int] | None = None  # (time, inserted, sampled) at the previous report

    def report(done: bool = False) -> None:
        """A train (and memory) record for the metrics, and a report for the hive's view, at report pace."""
        nonlocal last_report, window_start, window_steps, memory_before, last_loss
        now = time.monotonic()
        span = max(now - window_start, 1e-9)
        learned = learning.stats.take()
        last_loss = learned.last_loss if learned.last_loss is not None else last_loss
        stats = memory.stats()
        redis_link = memory if isinstance(memory, RedisLink) else None
        link = redis_link.snapshot() if redis_link is not None else None
        rep = AgentReport(
            agent=agent,
            env_steps=state.env_steps,
            episodes=tally.episodes,
            updates=learner.updates,
            mean_return=tally.mean,
            best_mean_return=tally.best_mean,
            epsilon=policy.epsilon(state.env_steps),
            loss=last_loss,
            env_steps_per_s=window_steps / span,
            updates_per_s=learned.updates / span,
            memory_size=stats.size,
            memory_capacity=stats.capacity,
            done=done,
            loading=redis_link.loading if redis_link is not None else None,
        )
        loss = float(np.mean(learned.losses)) if learned.losses else None
        mean_q = float(np.mean(learned.mean_qs)) if learned.mean_qs else None
        sample_age = float(np.mean(learned.sample_ages)) if learned.sample_ages else None
        metrics.write(
            "train",
            agent=agent,
            env_steps=state.env_steps,
            updates=learner.updates,
            loss=loss,
            mean_q=mean_q,
            replay_sample_age=sample_age,
            sampled_by_agent={str(a): n for a, n in sorted(learned.sources.items())},
            env_steps_per_s=rep.env_steps_per_s,
            updates_per_s=rep.updates_per_s,
            epsilon=rep.epsilon,
            wall=now - started,
        )
        if telemetry is not None:
            telemetry.emit(pb.TrainingReport(
                agent=agent, env_steps=state.env_steps, updates=learner.updates, loss=loss, mean_q=mean_q,
                learning_rate=float(learner.optimizer.param_groups[0]["lr"]), updates_per_s=rep.updates_per_s,
                env_steps_per_s=rep.env_steps_per_s, replay_sample_age=sample_age, epsilon=rep.epsilon,
                mean_return=tally.mean, best_mean_return=tally.best_mean, wall_seconds=now - started,
            ))  # fmt: skip
        if identity.reports_memory:
            memory_bytes = int(getattr(memory, "nbytes", 0))
            metrics.write(
                "memory",
                size=stats.size,
                capacity=stats.capacity,
                inserted=stats.inserted,
                sampled=stats.sampled,
                bytes=memory_bytes,
                per_agent={str(a): n for a, n in stats.per_agent.items()},
                wall=now - started,
            )
            if telemetry is not None:
                mem = pb.MemoryReport(
                    size=stats.size, capacity=stats.capacity, inserted=stats.inserted, sampled=stats.sampled,
                    rejected=stats.rejected, bytes_used=memory_bytes,
                    per_agent_steps=stats.per_agent, wall_seconds=now - started,
                )  # fmt: skip
                if memory_before is not None and now > memory_before[0]:
                    mem.insert_rate = (stats.inserted - memory_before[1]) / (now - memory_before[0])
                    mem.sample_rate = (stats.sampled - memory_before[2]) / (now - memory_before[0])
                memory_before = (now, stats.inserted, stats.sampled)
                if link is not None:
                    mem.dropped_chunks, mem.skipped_chunks = link.dropped_chunks, link.skipped_chunks
                    mem.outage_seconds, mem.write_errors = link.away_s, link.write_errors
                    if link.lag_p99_ms is not None:
                        mem.replication_lag_p99_ms = link.lag_p99_ms
                telemetry.emit(mem)
        if link is not None:
            # What the agent's link to the Redis log did: drops, skips, bad chunks, outages, lag, catch-up.
            metrics.write("link", **asdict(link), wall=now - started)
        window_start, window_steps = now, 0
        last_report = now
        if reports is not None:
            # A full queue only costs the view one refresh.
            with contextlib.suppress(Exception):
                reports.put_nowait(rep)

    def checkpoint(best: bool = False) -> None:
        with learning.paused():
            _checkpoint(best)

    def _checkpoint(best: bool) -> None:
        state.recent_returns = list(tally.recent)
        state.best_mean = tally.best_mean
        state.episodes = tally.episodes
        state.wall = time.monotonic() - started
        state.learner = learner.state_dict()
        state.policy = policy.state_dict()
        if best:
            save_agent_checkpoint(run_dir, state, config, best=True)
            return
        data = checkpoint_bytes(state, config)
        entry = ModelEntry(agent=agent, env_steps=state.env_steps, best_mean=state.best_mean, size_bytes=len(data),
                           saved_unix=time.time(), mean_return=tally.mean if len(tally.recent) >= MEAN_WINDOW else None)
        local_store.put(entry, data)
        if hive_store is not local_store:
            _put_in_store(hive_store, entry, state, data, metrics)

    def assimilate() -> None:
        """Exploit and explore (borgdqn.rl.assimilation): in the hive's bottom, adopt a top agent's state."""
        with learning.paused():
            _assimilate()

    def _assimilate() -> None:
        nonlocal policy
        _checkpoint(best=False)  # the entry the others (and this agent) rank now
        try:
            donor = choose_donor(hive_store.entries(), agent, assimilation, assimilation_rng)
            data = hive_store.get(donor.agent) if donor is not None else None
        except Exception as err:  # the store away: try at the next check
            log.warning("assimilation skipped: the model store cannot be read: %s", one_line(err))
            return
        if donor is None or data is None or donor.mean_return is None:
            return
        mean_before = tally.mean or 0.0
        try:
            adopted, rate = adopt(learner, data, f"agent {donor.agent}'s checkpoint in the model store")
        except CheckpointError as err:
            log.warning("assimilation of agent %d skipped: %s", donor.agent, err)
            return
        floor = epsilon_floor(identity.ladder_epsilon, state, policy.epsilon(2**62))
        if assimilation.perturb:
            rate = perturbed(rate, assimilation, assimilation.lr_bounds, assimilation_rng)
            learner.set_learning_rate(rate)
            if floor is not None:
                floor = perturbed(floor, assimilation, assimilation.epsilon_floor_bounds, assimilation_rng)
                state.epsilon_floor = floor
                policy_state = policy.state_dict()
                policy = make_policy(floor)
                policy.load_state_dict(policy_state)
        state.learning_rate = rate
        tally.recent.clear()  # ranked again on the adopted network's games only
        event = Assimilation(agent=agent, donor=donor.agent, env_steps=state.env_steps, mean_return=mean_before,
                             donor_mean_return=donor.mean_return, donor_env_steps=adopted.env_steps,
                             learning_rate=rate, epsilon_floor=floor)
        log.info("assimilated by agent %d (mean return %.1f vs %.1f at env_steps=%d): learning rate %.3g, "
                 "epsilon floor %s", donor.agent, donor.mean_return, mean_before, state.env_steps, rate,
                 "-" if floor is None else f"{floor:.3g}")
        metrics.write("assimilation", **asdict(event), wall=time.monotonic() - started)
        if telemetry is not None:
            telemetry.emit(pb.AssimilationEvent(**asdict(event), wall_seconds=time.monotonic() - started))

    learning = make_learning(learner, memory, config, lambda env_steps: beta(env_steps * config.hive.agents))
    target = config.hive.stop_at_mean_return
    reached = False
    finished = False
    try:
        while state.env_steps < budget and not reached and not (stop is not None and stop.is_set()):
            # Act on o_t. `first` resets the recurrent core where an episode starts.
            q, next_core = learning.act(obs, core_state, first if recurrent else None)
            actions = policy.select(q, state.env_steps)
            result = env.step(actions)

            # Record t = (frame of o_t, a_t, r_t, flags of o_t); rewards are clipped for learning only.
            rewards = result.rewards
            learn_rewards = np.clip(rewards, -1.0, 1.0) if env_cfg.clip_rewards else rewards
            adder.add_step(
                obs[:, -1],
                actions,
                learn_rewards,
                first,
                last,
                terminated,
                policy.acting_ids(),
                _core_to_numpy(core_state) if recurrent else None,
            )
            core_state = next_core

            # Bookkeeping of reported (full-game, raw-reward) episodes.
            episode_return += rewards
            episode_length += ~last
            ended = np.flatnonzero(result.game_over)
            labels = policy.episode_labels() if ended.size else []
            for e in ended:
                ret = float(episode_return[e])
                label = labels[e]
                best_before = tally.best_mean
                tally.add(ret)
                new_best = new_best or tally.best_mean != best_before
                epsilon, wall = policy.epsilon(state.env_steps), time.monotonic() - started
                metrics.write(
                    "episode",
                    agent=agent,
                    env_steps=state.env_steps + num_envs,
                    episode=tally.episodes,
                    **{"return": ret},
                    length=int(episode_length[e]),
                    policy=label,
                    epsilon=epsilon,
                    wall=wall,
                )
                if telemetry is not None:
                    telemetry.emit(pb.EpisodeEvent(
                        agent=agent, policy=label, episode_return=ret, length=int(episode_length[e]),
                        env_steps=state.env_steps + num_envs, episode=tally.episodes, epsilon=epsilon,
                        wall_seconds=wall,
                    ))  # fmt: skip
                episode_return[e] = 0.0
                episode_length[e] = 0
                game_starting[e] = True
            if ended.size and target is not None and tally.best_mean is not None and tally.best_mean >= target:
                reached = True
                log.info("agent=%d reached a mean return of %.1f over %d episodes at env_steps=%d "
                         "(hive.stop_at_mean_return %g): stopping the hive", agent, tally.best_mean, MEAN_WINDOW,
                         state.env_steps + num_envs, target)
                if stop is not None:
                    stop.set()  # the whole hive ends with this agent, each agent saving as at a Ctrl-C

            # o_{t+1} becomes the current observation.
            first, last, terminated = result.first, result.truncated | result.terminated, result.terminated
            obs = stacker.push(result.frames, first)
            new_games = first & game_starting
            if new_games.any():
                policy.begin_episodes(new_games, state.env_steps)
                game_starting &= ~new_games
            state.env_steps += num_envs
            window_steps += num_envs

            # Learn from the pool: one update per `update_every` env steps once the memory holds enough, here
            # (inline) or in the learner thread (concurrent), which this may wait for (borgdqn.rl.learning).
            learning.stepped(num_envs, state.env_steps)

            if time.monotonic() - last_report >= config.hive.report_every_s:
                report()
                # Saved at report pace, not per episode: early on nearly every episode sets a new best.
                if new_best:
                    checkpoint(best=True)
                    new_best = False
            if state.env_steps >= next_checkpoint:
                checkpoint()
                next_checkpoint += config.hive.checkpoint_every
            if assimilation.enabled and state.env_steps >= next_assimilation:
                assimilate()
                next_assimilation += assimilation.every
        stopped = reached or (stop is not None and stop.is_set())
        learning.finish(drain=not stopped)
        finished = True
        adder.flush()
        checkpoint()
        if new_best:
            checkpoint(best=True)
        report(done=True)
        return state
    finally:
        if not finished:
            with contextlib.suppress(Exception):  # the error on its way out says more
                learning.finish(drain=False)
        if telemetry is not None:
            telemetry.close(timeout_s=5.0)
        metrics.close()
        env.close()


def sampling_spec(config: BorgConfig) -> SamplingSpec:
    """How an agent's learner samples its memory: given to the memory once, when the agent opens it."""
    learner = config.learner
    return SamplingSpec(n_step=learner.n_step, gamma=learner.gamma, stack=config.env.frame_stack,
                        sequence_length=learner.sampled_length if config.network.lstm else 0)


def _core_to_numpy(core: Any) -> np.ndarray:
    h, c = core
    return np.stack([h.detach().float().cpu().numpy(), c.detach().float().cpu().numpy()], axis=1)
