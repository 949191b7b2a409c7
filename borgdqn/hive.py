"""The one-machine hive: N agent processes that share one replay memory (embedded, or Redis with --memory).

The parent owns the shared memory, starts the agents (``spawn``: no forked torch or ALE state), shows their
progress, turns Ctrl-C into a clean stop (every agent saves a checkpoint) and writes ``summary.json`` at the end.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import multiprocessing as mp
import multiprocessing.synchronize
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from borgdqn.config import BorgConfig, ConfigError, agent_config, dump_config
from borgdqn.live_view import HiveView, LogHiveView, RichHiveView
from borgdqn.memory.hive_limits import MAX_REPLICA_STREAMS
from borgdqn.memory.protocol import ReplayMemory
from borgdqn.memory.redis.client import (
    REDIS_PASSWORD_ENV,
    REDIS_USERNAME_ENV,
    RefusedAccess,
    UntrustedServer,
    connect,
    with_credentials,
)
from borgdqn.memory.redis.keys import LogShape
from borgdqn.memory.redis.link import LinkSettings, RedisLink
from borgdqn.memory.redis.model_store import RedisModelStore
from borgdqn.memory.redis.writer import LogShapeMismatch, LogWriter
from borgdqn.memory.shared import NoRoom, SharedReplay, SharedReplayHandle
from borgdqn.metrics import SUMMARY_FILE, summarize, write_summary
from borgdqn.one_line import one_line
from borgdqn.rl.adder import STREAMS_PER_AGENT
from borgdqn.rl.agent import sampling_spec
from borgdqn.rl.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    agent_checkpoint_path,
    check_learner_state,
    check_resumable,
    parse_checkpoint,
    write_checkpoint,
)
from borgdqn.rl.envs import EnvSpec, make_vector_env
from borgdqn.rl.identity import collective_member, hive_agent
from borgdqn.rl.networks import build_q_network
from borgdqn.rl.reporting import AgentReport
from borgdqn.telemetry.kafka_access import KafkaAccess, KafkaAccessError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LOG_DIR = "logs"
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15  # <linux/prctl.h>
JOIN_TIMEOUT_S = 120.0
# A second interrupt aborts only when it comes this long after the first: tools deliver one stop twice at once.
ABORT_AFTER_S = 1.0


class HiveError(RuntimeError):
    """An agent process failed; the message is the agent's one-line reason."""


@dataclass
class AgentFailure:
    agent: int
    message: str


def probe_env(config: BorgConfig) -> EnvSpec:
    """Build one env to learn frame shape and action count (and to reject a bad env id before any spawn)."""
    env = make_vector_env(config.env.model_copy(update={"num_envs": 1}), seed=config.hive.seed)
    try:
        return env.spec
    finally:
        env.close()


def holds_run(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT_DIR).exists() or (run_dir / "metrics").exists()


def prepare_run_dir(config: BorgConfig, resume: bool) -> Path:
    run_dir = config.hive.out
    has_run = holds_run(run_dir)
    if has_run and not resume:
        raise ConfigError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
    if resume and not has_run:
        raise ConfigError(f"--resume: {run_dir} holds no run to resume")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(dump_config(config))
    return run_dir


def _die_with_parent(parent: int, agent: int) -> None:
    """Linux: SIGTERM this agent process when the runner dies, so a SIGKILLed runner leaves no agent training on;
    and name it ``borg-agent-<k>`` for ps, top and the kernel's OOM report."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(f"borg-agent-{agent}".encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the runner's own cleanup is all there is
    if os.getppid() != parent:  # the runner died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _agent_main(
    agent: int,
    parent: int,
    member: str | None,
    config_json: str,
    handle: SharedReplayHandle | None,
    run_dir: Path,
    stop: multiprocessing.synchronize.Event,
    reports: Any,
    resume: bool,
    clock_offset: float,
    log_level: int,
) -> None:
    # The terminal sends Ctrl-C to the whole process group; the parent alone decides, and sets `stop`.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM (the runner died, or a kill): stop the hive the clean way, every agent saving its state. From a thread:
    # the handler may run while this thread holds the event's lock (inside `stop.is_set()`).
    signal.signal(signal.SIGTERM, lambda signum, frame: threading.Thread(target=stop.set, daemon=True).start())
    config = BorgConfig.model_validate_json(config_json)
    identity = collective_member(config, member) if member else hive_agent(config, agent)
    _die_with_parent(parent, identity.agent_id)
    # Named by the agent's id, as its metrics and checkpoints are (a collective's member k writes agent-<k>.log).
    _agent_logging(run_dir, identity.agent_id, log_level)
    from borgdqn.rl.agent import run_agent

    config = agent_config(config, identity.agent_id)
    memory: ReplayMemory
    if handle is None:
        memory = open_redis_link(config, probe_env(config), identity.seed, identity.label)
    else:
        memory = SharedReplay.attach(handle, seed=identity.seed, spec=sampling_spec(config))
    store = model_store(config) if member else None
    try:
        run_agent(identity, config, memory, run_dir, stop=stop, reports=reports, resume=resume,
                  clock_offset=clock_offset, store=store)
    except Exception as err:
        log.debug("agent %d failed:\n%s", identity.agent_id, traceback.format_exc())
        reports.put(AgentFailure(identity.agent_id, f"{err.__class__.__name__}: {err}"))
        sys.exit(1)
    finally:
        memory.close()
        if store is not None:
            store.close()
        if os.getppid() != parent:
            reports.cancel_join_thread()  # nobody reads the reports now: do not wait to flush them at exit


def log_shape(config: BorgConfig, spec: EnvSpec) -> LogShape:
    """The shape of the hive's Redis log that ``config`` writes and reads."""
    network = config.network
    return LogShape(capacity=config.replay.capacity, chunk_length=config.replay.chunk_length,
                    frame_shape=tuple(spec.frame_shape), frame_dtype=np.dtype(spec.frame_dtype).str,
                    recurrent_hidden=network.lstm_hidden if network.lstm else 0)


def connect_redis(config: BorgConfig) -> Any:
    """A client of ``replay.redis_url`` as BORG_REDIS_USERNAME with BORG_REDIS_PASSWORD (never from a URL)."""
    try:
        return connect(with_credentials(config.replay.redis_url), ca_file=config.replay.redis_ca_file)
    except RefusedAccess as err:  # bad input, not an outage: never retried
        raise ConfigError(f"{err} (check {REDIS_USERNAME_ENV} and {REDIS_PASSWORD_ENV})") from None
    except UntrustedServer as err:
        raise ConfigError(f"{err} (check replay.redis_ca_file)") from None


def check_redis_log(config: BorgConfig, spec: EnvSpec) -> None:
    """Reach the Redis memory and declare its log (or check that it has this config's shape): one line if not."""
    client = connect_redis(config)
    try:
        LogWriter(client, config.replay.redis_name, log_shape(config, spec)).declare()
    except LogShapeMismatch as err:
        raise ConfigError(str(err)) from None
    finally:
        client.close()


def open_redis_link(config: BorgConfig, spec: EnvSpec, seed: int, label: str) -> RedisLink:
    """An agent's link to the hive's Redis log: its writer and tail threads and its local replica of the log,
    which holds ``replay.capacity`` steps like the log itself."""
    replay = config.replay
    replica = SharedReplay.create(
        replay.capacity, spec.frame_shape, spec.frame_dtype, prioritized=replay.prioritized, alpha=replay.alpha,
        priority_eps=replay.priority_eps,
        recurrent_hidden=config.network.lstm_hidden if config.network.lstm else None,
        max_streams=MAX_REPLICA_STREAMS, seed=seed, private=True, spec=sampling_spec(config),
    )  # fmt: skip
    settings = LinkSettings(outbox_chunks=max(16, replay.outbox_steps // replay.chunk_length))
    try:
        return RedisLink(lambda: connect_redis(config), replay.redis_name, log_shape(config, spec), replica,
                         label=label, settings=settings)
    except BaseException:
        replica.close()
        raise


def _agent_logging(run_dir: Path, agent: int, level: int) -> None:
    """Agents log to DIR/logs/agent-<i>.log; only warnings reach the terminal, where the live view draws."""
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s agent={agent} %(name)s %(message)s")
    (run_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(run_dir / LOG_DIR / f"agent-{agent}.log")
    to_file.setFormatter(fmt)
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setFormatter(fmt)
    to_terminal.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.handlers[:] = [to_file, to_terminal]
    root.setLevel(level)


def _make_view(config: BorgConfig) -> HiveView:
    live = config.hive.live
    use_rich = live == "on" or (live == "auto" and sys.stderr.isatty())
    if use_rich:
        return RichHiveView(config.hive.agents, config.hive.steps)
    return LogHiveView(config.hive.agents, config.hive.steps, every_s=max(10.0, 5 * config.hive.report_every_s))


def _resume_offset(run_dir: Path) -> float:
    """Wall seconds the run has already spent: every session ends by writing summary.json (Ctrl-C included)."""
    try:
        return float(json.loads((run_dir / SUMMARY_FILE).read_text())["wall_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0  # a session that was killed wrote none: restart the clock rather than refuse to resume


def check_member(config: BorgConfig, member: str) -> None:
    """A collective's pod runs one agent that learns from the collective's Redis memory."""
    if config.hive.agents != 1:
        raise ConfigError(f"--member: a member runs one agent, but hive.agents is {config.hive.agents}")
    if config.replay.backend != "redis":
        raise ConfigError("--member: a member shares the collective's memory: set replay.backend to redis")
    try:
        collective_member(config, member)
    except ValueError as err:
        raise ConfigError(f"--member: {err}") from None


def model_store(config: BorgConfig) -> RedisModelStore:
    """The hive's model store in its Redis memory (a collective's agents keep their checkpoints there)."""
    return RedisModelStore(connect_redis(config), config.replay.redis_name, config.replay.model_store_bytes)


def restore_from_store(config: BorgConfig, member: str, spec: EnvSpec) -> bool:
    """A pod taking over agent k with an empty run dir: put k's checkpoint from the model store there, so that the
    agent resumes from it; True if it did. A stored checkpoint that does not fit this config (another network, or
    bytes that do not read as a checkpoint) is logged and left for the agent's next save to replace: the agent
    starts anew rather than crash-looping its pod."""
    agent = collective_member(config, member).agent_id
    store = model_store(config)
    try:
        data = store.get(agent)
    finally:
        store.close()
    if data is None:
        return False
    where = f"the model store's checkpoint of agent {agent}"
    try:
        check_learner_state(parse_checkpoint(data, where)[1].learner,
                            build_q_network(config.network, spec, config.env.frame_stack), where)
    except CheckpointError as err:
        log.warning("agent %d starts anew: %s", agent, err)
        return False
    write_checkpoint(agent_checkpoint_path(config.hive.out, agent), data)
    log.info("agent %d resumes from the model store (%.1f MB)", agent, len(data) / 1e6)
    return True


def train(config: BorgConfig, *, resume: bool = False, member: str | None = None,
          preset: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the hive to the end of ``hive.steps``, until an agent (``hive.stop_when`` first) or every agent (each)
    reaches ``hive.stop_at_mean_return``, or to a Ctrl-C; returns the summary written to summary.json.

    ``member`` (a pod's name): run as that one member of a collective (see :mod:`borgdqn.rl.identity`); a run
    directory that already holds its run (the container restarted in the same pod) is resumed. ``preset``: the
    name of the preset the config was built on (borgdqn/presets.py; "none"), for the hive's first line.
    """
    if member is not None:
        check_member(config, member)
    spec = probe_env(config)
    if member is not None:
        # The same pod after a container restart finds its run dir; a new pod of the same agent, the model store.
        resume = holds_run(config.hive.out) or restore_from_store(config, member, spec)
    if config.env.num_envs > STREAMS_PER_AGENT:
        raise ConfigError(f"env.num_envs: at most {STREAMS_PER_AGENT} per agent")
    if config.telemetry.kafka:  # the login and TLS settings must fit before any process starts
        try:
            KafkaAccess.of_telemetry(config.telemetry)
        except KafkaAccessError as err:
            raise ConfigError(f"telemetry: {err}") from None
    # Reach the Redis memory before the run dir exists: a wrong password must not leave a run to --resume.
    if config.replay.backend == "redis":
        check_redis_log(config, spec)
    # The embedded memory before the run dir: a memory /dev/shm cannot hold must not leave a run to --resume.
    shared = _create_shared_memory(config, spec) if config.replay.backend != "redis" else None
    try:
        run_dir = prepare_run_dir(config, resume)
        if resume:
            check_resumable(run_dir, config, spec)
    except BaseException:
        if shared is not None:
            shared.close()
            shared.unlink()
        raise
    offset = _resume_offset(run_dir) if resume else 0.0
    frame_bytes = int(np.prod(spec.frame_shape)) * np.dtype(spec.frame_dtype).itemsize
    log.info(
        "hive agents=%d env=%s%s frame=%s actions=%d memory_capacity=%d (~%.0f MB of frames) out=%s logs=%s",
        config.hive.agents, config.env.id, f" preset={preset}" if preset else "", spec.frame_shape,
        spec.num_actions, config.replay.capacity, config.replay.capacity * frame_bytes / 1e6, run_dir,
        run_dir / LOG_DIR,
    )  # fmt: skip
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    reports = ctx.Queue(maxsize=10_000)
    config_json = config.model_dump_json()
    started = time.monotonic()
    agent_ids = [collective_member(config, member).agent_id] if member else list(range(config.hive.agents))
    procs = [
        ctx.Process(
            target=_agent_main,
            name=f"borgdqn-agent-{agent_ids[i]}",
            args=(i, os.getpid(), member, config_json, shared.handle() if shared else None, run_dir, stop, reports,
                  resume, offset, logging.getLogger().level),
        )
        for i in range(config.hive.agents)
    ]
    failures: list[AgentFailure] = []
    interrupted = False
    previous = _stop_on_termination_signals()
    try:
        for p in procs:
            p.start()
        with _make_view(config) as view:
            interrupted = _watch(procs, reports, view, failures, stop)
        for p in procs:
            p.join(JOIN_TIMEOUT_S)
            if p.is_alive():
                log.warning("agent process %s did not stop in %.0fs; killing it", p.name, JOIN_TIMEOUT_S)
                p.kill()  # it ignored `stop` (and SIGTERM only sets it)
                p.join(5)
        _drain(reports, None, failures)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        if shared is not None:
            shared.close()
            shared.unlink()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    summary = summarize(run_dir, offset + time.monotonic() - started)
    summary["interrupted"] = interrupted
    target = config.hive.stop_at_mean_return
    if target is not None:
        reached = sum((agent["best_mean_return_20"] or -math.inf) >= target for agent in summary["agents"].values())
        summary.update(stop_at_mean_return=target, stop_when=config.hive.stop_when, target_reached=reached > 0,
                       agents_reached=reached)
    write_summary(run_dir, summary)
    # A killed agent first: the others may have failed because of it (a lock it died holding).
    crashed = [i for i, p in enumerate(procs) if (p.exitcode or 0) < 0]
    if failures and not crashed:
        first = failures[0]
        raise HiveError(f"agent {first.agent} failed: {first.message}")
    crashed = crashed or [i for i, p in enumerate(procs) if p.exitcode not in (0, None)]
    if crashed:
        agent = agent_ids[crashed[0]]
        log_file = run_dir / LOG_DIR / f"agent-{agent}.log"
        after = (f"then agent {failures[0].agent} failed: {failures[0].message}" if failures
                 else "the others stopped and saved")
        raise HiveError(f"agent {agent} died ({exit_cause(procs[crashed[0]].exitcode)}); {after}. The end of its "
                        f"log ({log_file}):\n{log_tail(log_file)}")
    log.info("summary written to %s", run_dir / SUMMARY_FILE)
    return summary


def _create_shared_memory(config: BorgConfig, spec: EnvSpec) -> SharedReplay:
    """The hive's shared-memory ring; ConfigError (one line) when /dev/shm has no room for it."""
    try:
        return SharedReplay.create(
            config.replay.capacity,
            spec.frame_shape,
            spec.frame_dtype,
            prioritized=config.replay.prioritized,
            alpha=config.replay.alpha,
            priority_eps=config.replay.priority_eps,
            recurrent_hidden=config.network.lstm_hidden if config.network.lstm else None,
            max_streams=config.hive.agents * STREAMS_PER_AGENT,
            seed=config.hive.seed,
        )
    except NoRoom as err:
        raise ConfigError(f"replay.capacity {config.replay.capacity:,}: {err}; lower replay.capacity or give "
                          "/dev/shm more room (a container's --shm-size)") from None


def member_finished(config: BorgConfig, summary: dict[str, Any]) -> int | None:
    """The env steps of a member's run that ended with its budget done (None: it was stopped before)."""
    steps = int(summary["hive"]["env_steps"])
    return steps if not summary.get("interrupted") and steps >= config.hive.steps else None


def mark_finished(config: BorgConfig, member: str, env_steps: int) -> None:
    """Tell the collective (through its Redis) that this member finished its budget: once every agent has, the
    operator marks the collective Succeeded and releases the agents' pods."""
    agent = collective_member(config, member).agent_id
    store = model_store(config)
    try:
        store.mark_finished(agent, env_steps)
    finally:
        store.close()
    log.info("agent %d finished its budget at %d env steps", agent, env_steps)


def wait_until_released(config: BorgConfig, member: str, env_steps: int, *, retry_s: float = 10.0) -> None:
    """A finished member keeps its pod up (a StatefulSet would restart a process that exits) until SIGTERM or
    SIGINT: the operator scales the agents to zero once all of them are done. While Redis does not take the
    finished mark, it is tried again every ``retry_s``."""
    released = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: released.set()) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        marked = False
        while not released.is_set():
            if not marked:
                try:
                    mark_finished(config, member, env_steps)
                    marked = True
                    log.info("waiting to be released (SIGTERM ends this process)")
                except Exception as err:
                    log.warning("the finished mark did not reach redis (%s); trying again in %.0fs", one_line(err),
                                retry_s)
            released.wait(None if marked else retry_s)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop_on_termination_signals() -> dict[int, Any]:
    """SIGTERM (kill, a pod's shutdown) and SIGHUP (a closed terminal) stop the hive like Ctrl-C: agents save,
    the shared memory is unlinked. Only possible from the main thread; elsewhere the defaults stay."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous[signum] = signal.signal(signum, _raise_interrupt)
    return previous


def exit_cause(code: int | None) -> str:
    """What ended a process, in words: ``killed by SIGKILL``, ``exit code 1``."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def log_tail(path: Path, lines: int = 10) -> str:
    """The last ``lines`` lines of a log file (or why there are none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"(no log: {err.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(the log is empty)"


def _drain(reports: Any, view: HiveView | None, failures: list[AgentFailure], timeout: float = 0.0) -> None:
    block = timeout > 0
    while True:
        try:
            item = reports.get(block, timeout) if block else reports.get_nowait()
        except queue.Empty:
            return
        block = False
        if isinstance(item, AgentFailure):
            failures.append(item)
        elif isinstance(item, AgentReport) and view is not None:
            view.update(item)


def _watch(
    procs: list[Any],
    reports: Any,
    view: HiveView,
    failures: list[AgentFailure],
    stop: multiprocessing.synchronize.Event,
) -> bool:
    """Show reports until every agent has exited; returns True when the user interrupted the run."""
    interrupted_at: float | None = None
    while any(p.is_alive() for p in procs):
        try:
            _drain(reports, view, failures, timeout=0.25)
            if failures and not stop.is_set():
                view.note(f"agent {failures[0].agent} failed ({failures[0].message}); stopping the hive")
                stop.set()
            dead = [p for p in procs if p.exitcode not in (0, None)]
            if dead and not stop.is_set():  # killed (SIGKILL, the OOM killer): it could not say so itself
                view.note(f"{dead[0].name} died ({exit_cause(dead[0].exitcode)}); stopping the hive")
                stop.set()
        except KeyboardInterrupt:
            if interrupted_at is None:
                interrupted_at = time.monotonic()
                stop.set()
                view.note("stopping: every agent saves a checkpoint (Ctrl-C again to abort)")
            elif time.monotonic() - interrupted_at > ABORT_AFTER_S:
                view.note("second Ctrl-C: killing the agents without saving")
                for p in procs:
                    p.kill()
                break
            # else: the same stop delivered twice (e.g. `timeout` signals the process and its group): one stop.
    _drain(reports, view, failures)
    return interrupted_at is not None
