"""One agent of the hive: acts in its vector env, writes what it saw to the shared memory, learns from the pool.

Read top to bottom this is the whole DQN loop of one agent process:

    actor: observe -> Q-values -> policy picks actions -> env steps -> adder writes steps to the memory
    learning: every `update_every` env steps, sample the pooled memory -> learner update -> new priorities
    reporter: finished games and progress to the metrics file, Kafka and the hive's view

The updates run here, in turn with acting, or in a learner thread alongside it at the same ratio
(`learner.concurrent`, borgdqn.rl.learning).

Every agent has its own online/target networks and optimizer; what the agents share is the experience.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.synchronize
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from borgdqn.config import BorgConfig
from borgdqn.memory.protocol import ReplayMemory, SamplingSpec
from borgdqn.memory.redis.model_store import ModelEntry
from borgdqn.metrics import MEAN_WINDOW, EpisodeTally, MetricsWriter, agent_metrics_path
from borgdqn.one_line import one_line
from borgdqn.proto.borg.v1 import telemetry_pb2 as pb
from borgdqn.rl.actor import Actor
from borgdqn.rl.adder import ChunkAdder
from borgdqn.rl.assimilation import adopt, choose_donor, epsilon_floor, perturbed
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
from borgdqn.rl.identity import AgentIdentity
from borgdqn.rl.learner import Learner
from borgdqn.rl.learning import make_learning
from borgdqn.rl.model_store import ModelStore, RunDirModelStore
from borgdqn.rl.policies import ActorPolicy, build_policy
from borgdqn.rl.reporting import Progress, Reporter
from borgdqn.rl.schedules import make_schedule
from borgdqn.telemetry.producer import producer_for

log = logging.getLogger(__name__)


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
    ``hive.stop_at_mean_return`` (with ``hive.stop_when`` first it then sets ``stop``: the hive ends with it) or
    ``stop`` is set; returns its final state.

    ``reports`` is anything with ``put_nowait`` (a multiprocessing queue): AgentReport objects go there.
    ``store``: the hive's model store when it is not the run dir (a collective's memory), which gets each
    checkpoint besides the run dir; assimilation ranks and adopts from it.
    """
    env_cfg, learn_cfg, hive = config.env, config.learner, config.hive
    agent, seed, budget = identity.agent_id, identity.seed, identity.steps

    env = make_vector_env(env_cfg, seed=seed)
    num_envs = env.num_envs
    learner = Learner(config.network, learn_cfg, env.spec, env_cfg.frame_stack, seed=seed,
                      threads=hive.threads_per_agent)  # fmt: skip

    def make_policy(floor: float | None) -> ActorPolicy:
        return build_policy(config.policy, num_envs=num_envs, num_actions=env.spec.num_actions, seed=seed,
                            ladder_epsilon=floor)

    state, policy = AgentCheckpoint(agent=agent), make_policy(identity.ladder_epsilon)
    if resume:
        state, policy = _resume(run_dir, config, learner, state, policy, make_policy)
    recurrent = learner.online.recurrent
    adder = ChunkAdder(memory, agent=agent, stream_base=identity.stream_base, num_envs=num_envs,
                       chunk_length=config.replay.chunk_length, frame_shape=env.spec.frame_shape,
                       frame_dtype=env.spec.frame_dtype,
                       recurrent_hidden=learner.online.hidden_size if recurrent else None)  # fmt: skip
    beta = make_schedule(config.replay.beta)
    learning = make_learning(learner, memory, config, lambda env_steps: beta(env_steps * hive.agents))
    actor = Actor(env, env_cfg.frame_stack, policy, learning.act, adder=adder, clip_rewards=env_cfg.clip_rewards,
                  initial_core=learner.online.initial_state(num_envs, learner.device) if recurrent else None)
    started = time.monotonic() - clock_offset
    # Live telemetry (telemetry.kafka): emit only queues an event; a background thread talks to Kafka.
    reporter = Reporter(agent, memory, MetricsWriter(agent_metrics_path(run_dir, agent)),
                        producer_for(config, "agent", agent, name=identity.label), reports,
                        memory_reports=identity.reports_memory, started=started, env_steps=state.env_steps)
    tally = EpisodeTally(episodes=state.episodes, recent=list(state.recent_returns), best_mean=state.best_mean)
    local_store = RunDirModelStore(run_dir)
    hive_store: ModelStore = store if store is not None else local_store
    assimilation = hive.assimilation
    # Its own stream: assimilation's draws change nothing else the seed decides.
    assimilation_rng = np.random.default_rng([seed, 0xA551])
    next_assimilation = state.env_steps + assimilation.every
    next_checkpoint = state.env_steps + hive.checkpoint_every
    target = hive.stop_at_mean_return

    def report(done: bool = False) -> None:
        reporter.progress(Progress(state.env_steps, learner.updates, tally, actor.policy.epsilon(state.env_steps),
                                   float(learner.optimizer.param_groups[0]["lr"])),
                          learning.stats.take(), done=done)  # fmt: skip

    def checkpoint(best: bool = False) -> None:
        with learning.paused():
            _checkpoint(best)

    def _checkpoint(best: bool) -> None:
        state.recent_returns, state.best_mean, state.episodes = list(tally.recent), tally.best_mean, tally.episodes
        state.wall = time.monotonic() - started
        state.learner, state.policy = learner.state_dict(), actor.policy.state_dict()
        if best:
            save_agent_checkpoint(run_dir, state, config, best=True)
            return
        data = checkpoint_bytes(state, config)
        entry = ModelEntry(agent=agent, env_steps=state.env_steps, best_mean=state.best_mean, size_bytes=len(data),
                           saved_unix=time.time(), mean_return=tally.mean if len(tally.recent) >= MEAN_WINDOW else None)
        local_store.put(entry, data)
        if hive_store is not local_store:
            _put_in_store(hive_store, entry, data, reporter)

    def assimilate() -> None:
        """Exploit and explore (borgdqn.rl.assimilation): in the hive's bottom, adopt a top agent's state."""
        with learning.paused():
            _checkpoint(best=False)  # the entry the others (and this agent) rank now
            event = _assimilate(learner, actor, hive_store, config, identity, state, tally, assimilation_rng,
                                make_policy)
            if event is not None:
                reporter.assimilation(event)

    new_best = reached = finished = False
    actor.reset(seed + state.env_steps, state.env_steps)
    try:
        while state.env_steps < budget and not reached and not (stop is not None and stop.is_set()):
            games = actor.step(state.env_steps)
            for game in games:
                best_before = tally.best_mean
                tally.add(game.episode_return)
                new_best = new_best or tally.best_mean != best_before
                reporter.game(game, state.env_steps + num_envs, tally.episodes, actor.policy.epsilon(state.env_steps))
            if games and target is not None and tally.best_mean is not None and tally.best_mean >= target:
                reached = True
                whole_hive = hive.stop_when == "first"
                log.info("agent=%d reached a mean return of %.1f over %d episodes at env_steps=%d "
                         "(hive.stop_at_mean_return %g): stopping %s", agent, tally.best_mean, MEAN_WINDOW,
                         state.env_steps + num_envs, target, "the hive" if whole_hive else "this agent")  # fmt: skip
                if whole_hive and stop is not None:
                    stop.set()  # the whole hive ends with this agent, each agent saving as at a Ctrl-C
            state.env_steps += num_envs

            # Learn from the pool: one update per `update_every` env steps once the memory holds enough, here
            # (inline) or in the learner thread (concurrent), which this may wait for (borgdqn.rl.learning).
            learning.stepped(num_envs, state.env_steps)

            if time.monotonic() - reporter.last_report >= hive.report_every_s:
                report()
                # Saved at report pace, not per episode: early on nearly every episode sets a new best.
                if new_best:
                    checkpoint(best=True)
                    new_best = False
            if state.env_steps >= next_checkpoint:
                checkpoint()
                next_checkpoint += hive.checkpoint_every
            if assimilation.enabled and state.env_steps >= next_assimilation:
                assimilate()
                next_assimilation += assimilation.every
        learning.finish(drain=not (reached or (stop is not None and stop.is_set())))
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
        reporter.close()
        env.close()


def _resume(run_dir: Path, config: BorgConfig, learner: Learner, state: AgentCheckpoint, policy: ActorPolicy,
            make_policy: Callable[[float | None], ActorPolicy]) -> tuple[AgentCheckpoint, ActorPolicy]:  # fmt: skip
    """The agent's saved state, its learner loaded; its policy (with the saved exploration floor where the policy
    did not change since). Nothing saved: ``state`` and ``policy`` as they are."""
    found = load_agent_checkpoint(run_dir, state.agent)
    if found is None:
        return state, policy
    saved_config, loaded = found
    check_learner_state(loaded.learner, learner.online, agent_checkpoint_path(run_dir, state.agent))
    learner.load_state_dict(loaded.learner)
    # Assimilation's rate and floor go on, unless the config changed them since (the user's word wins).
    if loaded.learning_rate is not None and saved_config.learner.lr == config.learner.lr:
        learner.set_learning_rate(loaded.learning_rate)
    else:
        loaded.learning_rate = None
    same_policy = (saved_config.policy, saved_config.epsilon_ladder) == (config.policy, config.epsilon_ladder)
    if loaded.epsilon_floor is not None and same_policy:
        policy = make_policy(loaded.epsilon_floor)
    else:
        loaded.epsilon_floor = None
    policy.load_state_dict(loaded.policy)
    log.info("agent=%d resumed env_steps=%d updates=%d", state.agent, loaded.env_steps, learner.updates)
    return loaded, policy


def _assimilate(learner: Learner, actor: Actor, hive_store: ModelStore, config: BorgConfig, identity: AgentIdentity,
                state: AgentCheckpoint, tally: EpisodeTally, rng: np.random.Generator,
                make_policy: Callable[[float | None], ActorPolicy]) -> pb.AssimilationEvent | None:  # fmt: skip
    """In the hive's bottom: adopt a top agent's networks and rate, perturbed, and a perturbed exploration floor."""
    settings = config.hive.assimilation
    try:
        donor = choose_donor(hive_store.entries(), state.agent, settings, rng)
        data = hive_store.get(donor.agent) if donor is not None else None
    except Exception as err:  # the store away: try at the next check
        log.warning("assimilation skipped: the model store cannot be read: %s", one_line(err))
        return None
    if donor is None or data is None or donor.mean_return is None:
        return None
    mean_before = tally.mean or 0.0
    try:
        adopted, rate = adopt(learner, data, f"agent {donor.agent}'s checkpoint in the model store")
    except CheckpointError as err:
        log.warning("assimilation of agent %d skipped: %s", donor.agent, err)
        return None
    floor = epsilon_floor(identity.ladder_epsilon, state, actor.policy.epsilon(2**62))
    if settings.perturb:
        rate = perturbed(rate, settings, settings.lr_bounds, rng)
        learner.set_learning_rate(rate)
        if floor is not None:
            floor = perturbed(floor, settings, settings.epsilon_floor_bounds, rng)
            state.epsilon_floor = floor
            policy_state = actor.policy.state_dict()
            actor.policy = make_policy(floor)
            actor.policy.load_state_dict(policy_state)
    state.learning_rate = rate
    tally.recent.clear()  # ranked again on the adopted network's games only
    log.info("assimilated by agent %d (mean return %.1f vs %.1f at env_steps=%d): learning rate %.3g, "
             "epsilon floor %s", donor.agent, donor.mean_return, mean_before, state.env_steps, rate,
             "-" if floor is None else f"{floor:.3g}")  # fmt: skip
    return pb.AssimilationEvent(agent=state.agent, donor=donor.agent, env_steps=state.env_steps,
                                mean_return=mean_before, donor_mean_return=donor.mean_return,
                                donor_env_steps=adopted.env_steps, learning_rate=rate, epsilon_floor=floor)


def _put_in_store(store: ModelStore, entry: ModelEntry, data: bytes, reporter: Reporter) -> None:
    """Put a checkpoint in the hive's model store; trouble there never stops the agent (its run dir has it)."""
    started = time.perf_counter()
    try:
        total = store.put(entry, data)
    except Exception as err:
        log.warning("model store: checkpoint at env_steps=%d kept in the run dir only: %s", entry.env_steps,
                    one_line(err))
        reporter.stored(entry.env_steps, len(data), error=one_line(err))
        return
    seconds = time.perf_counter() - started
    log.info("model store: checkpoint at env_steps=%d stored (%.1f MB in %.2fs; the store holds %.1f MB)",
             entry.env_steps, len(data) / 1e6, seconds, total / 1e6)
    reporter.stored(entry.env_steps, len(data), seconds=seconds, store_bytes=total)


def sampling_spec(config: BorgConfig) -> SamplingSpec:
    """How an agent's learner samples its memory: given to the memory once, when the agent opens it."""
    learner = config.learner
    return SamplingSpec(n_step=learner.n_step, gamma=learner.gamma, stack=config.env.frame_stack,
                        sequence_length=learner.sampled_length if config.network.lstm else 0)
