"""The local hive with the Redis memory (`borgdqn train --memory redis://...`): real agents, real redis-server."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from borgdqn.config import ConfigError, build_config
from borgdqn.hive import train
from borgdqn.memory.redis.keys import read_state
from borgdqn.metrics import read_records
from tests.harness.redis import RedisServer
from tests.support.conditions import eventually
from tests.support.hive import EXAMPLES, small_config, train_cli

pytestmark = pytest.mark.integration


LSTM = {"network.lstm": "true", "network.lstm_hidden": 32, "env.frame_stack": 1, "learner.burn_in": 4,
        "learner.sequence_length": 8, "replay.chunk_length": 16}


@pytest.mark.parametrize("extra", [{}, LSTM], ids=["stacked", "lstm-sequences"])
def test_a_hive_learns_through_the_redis_memory(tmp_path: Path, redis_server: RedisServer,
                                                extra: dict[str, object]) -> None:
    out = tmp_path / "run"
    name = f"hive-{uuid.uuid4().hex[:8]}"
    sets = [f"--set={key}={value}" for key, value in small_config(out, 3000, **extra).items() if key != "hive.live"]
    result = train_cli(["--config", str(EXAMPLES / "cartpole.yaml"), *sets, "--no-live",
                        f"--set=replay.redis_name={name}", "--memory", f"redis://127.0.0.1:{redis_server.port}/0"],
                       {"BORG_REDIS_PASSWORD": redis_server.password})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hive"]["env_steps"] >= 3000
    updates = [json.loads(line) for line in (out / "metrics" / "agent-0.jsonl").read_text().splitlines()
               if '"kind":"train"' in line]
    assert updates and updates[-1]["updates"] > 0, "the agents learned from what the Redis memory served"
    # A train record that follows updates says how old (in steps stored since) what those updates sampled was.
    ages = [now["replay_sample_age"] for before, now in itertools.pairwise(updates)
            if now["updates"] > before["updates"]]  # fmt: skip
    assert ages and all(age is not None and 0 < age < 5000 for age in ages)
    # The log is in Redis, with both agents' steps; each agent learned from its replica of it, whose link reported
    # what it did; the password is in no log line.
    client = redis.Redis.from_url(redis_server.url)
    state = read_state(client, name)
    assert state.inserted >= 3000 and set(state.per_agent) == {0, 1}
    links = [json.loads(line) for line in (out / "metrics" / "agent-1.jsonl").read_text().splitlines()
             if '"kind":"link"' in line]
    assert links and links[-1]["caught_up"] and links[-1]["sampled"] > 0 and links[-1]["replica_chunks"] > 0
    assert links[-1]["dropped_chunks"] == links[-1]["bad_chunks"] == 0
    logs = "".join(p.read_text() for p in (out / "logs").glob("*.log")) + result.stderr + result.stdout
    assert redis_server.password not in logs


def _updates(out: Path, agent: int) -> int:
    # read_records: the agent writes as this reads, and a line being written is skipped, not parsed.
    return max((r["updates"] for r in read_records(out, "train") if r["agent"] == agent), default=0)


KILLS = 5


def _endless_hive(tmp_path: Path, server: RedisServer, kind: str) -> tuple[subprocess.Popen[str], Path, str]:
    """A 2-agent CartPole hive on ``server``'s memory with a budget it will not reach (the test stops it), its
    output in ``tmp_path/train.log``: (process, run dir, memory name)."""
    out, name = tmp_path / "run", f"{kind}-{uuid.uuid4().hex[:8]}"
    sets = [f"--set={key}={value}" for key, value in small_config(out, 10_000_000).items() if key != "hive.live"]
    cmd = [sys.executable, "-m", "borgdqn", "train", "--config", str(EXAMPLES / "cartpole.yaml"), *sets, "--no-live",
           f"--set=replay.redis_name={name}", "--memory", f"redis://127.0.0.1:{server.port}/0"]
    with (tmp_path / "train.log").open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "BORG_REDIS_PASSWORD": server.password})
    return proc, out, name


def test_agents_survive_redis_killed_five_times_and_the_memory_keeps_every_acknowledged_chunk(
        tmp_path: Path, redis_server_aof: RedisServer) -> None:
    """Redis SIGKILLed (a crash) and restarted KILLS times in a row while two agents write and learn. With
    appendfsync always, every chunk an agent was told is stored survives every crash: the log's chunk counter is at
    least the sum of what the agents' links count as written (more only by appends whose reply a crash cut off)."""
    server = redis_server_aof
    proc, out, name = _endless_hive(tmp_path, server, "crash")
    client = redis.Redis.from_url(server.url)
    agent_logs = [out / "logs" / f"agent-{a}.log" for a in (0, 1)]

    def inserted() -> int:
        assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        return int(client.hget(f"borg:{{{name}}}:stats", "inserted") or 0)

    def every_log_says(text: str, times: int = 1) -> bool:
        assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        return all(p.exists() and p.read_text().count(text) >= times for p in agent_logs)

    try:
        eventually(lambda: inserted() > 2000 and min(_updates(out, 0), _updates(out, 1)) > 0,
                   "both agents writing and learning", 120)
        for kill in range(1, KILLS + 1):
            head_before = read_state(client, name).chunks
            server.kill()
            eventually(lambda kill=kill: every_log_says("redis away", kill), f"both agents noticing crash {kill}", 60)
            if kill == 1:
                learned = [_updates(out, a) for a in (0, 1)]
                eventually(lambda learned=learned: all(_updates(out, a) > learned[a] + 20 for a in (0, 1)),
                           "both agents learning on (from their replicas) while Redis is down", 60)
            server.launch()
            # appendfsync always: every chunk written before the crash is still there.
            assert read_state(client, name).chunks >= head_before
            eventually(lambda kill=kill: every_log_says("redis back", kill), f"both agents back after crash {kill}", 60)
            after = inserted()
            eventually(lambda after=after: inserted() > after + 300, f"writes into the memory after crash {kill}", 60)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        client.close()
    assert proc.returncode == 0, (tmp_path / "train.log").read_text()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["hive"]["env_steps"] > 0
    logs = [p.read_text() for p in agent_logs]
    assert server.password not in "".join(logs)
    # Acknowledged vs stored: each link's own count at close, against the memory's counter after KILLS crashes.
    acknowledged = [int(re.findall(r"redis link closed written_chunks=(\d+)", text)[-1]) for text in logs]
    outages = [int(re.findall(r"redis link closed .* outages=(\d+)", text)[-1]) for text in logs]
    check = redis.Redis.from_url(server.url)
    try:
        stored = read_state(check, name).chunks
    finally:
        check.close()
    assert min(outages) >= KILLS and 0 < sum(acknowledged) <= stored, (acknowledged, stored)
    print(f"\n{KILLS} crashes: {sum(acknowledged)} chunks acknowledged, {stored} stored "
          f"({stored - sum(acknowledged)} appended twice or unacknowledged: replies cut off by a crash)")


def test_agents_ride_out_a_hung_redis_and_its_log_stays_whole(tmp_path: Path, redis_server_aof: RedisServer) -> None:
    """Redis hangs (SIGSTOP: connections open, no answer) while two agents write and learn, until both take it for
    away (their 10 s socket timeout): they learn on from their replicas meanwhile, come back and write again once
    it answers, and the log's counters agree with its entries (no append half applied)."""
    server, log_path = redis_server_aof, tmp_path / "train.log"
    proc, out, name = _endless_hive(tmp_path, server, "hang")
    agent_logs = [out / "logs" / f"agent-{a}.log" for a in (0, 1)]
    client = redis.Redis.from_url(server.url)

    def inserted() -> int:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        return int(client.hget(f"borg:{{{name}}}:stats", "inserted") or 0)

    try:
        eventually(lambda: inserted() > 2000 and min(_updates(out, 0), _updates(out, 1)) > 0,
                   "both agents writing and learning", 120)
        learned = [_updates(out, a) for a in (0, 1)]
        server.hang()
        try:
            # A hung server is an outage once the clients' 10 s socket timeout runs out: it lasts at least that.
            eventually(lambda: all(p.exists() and "redis away" in p.read_text() for p in agent_logs),
                       "both agents taking the hung Redis for away", 30)
            assert all(_updates(out, a) > learned[a] + 20 for a in (0, 1)), "learning went on meanwhile"
        finally:
            server.hang(False)
        eventually(lambda: all("redis back" in p.read_text() for p in agent_logs), "both agents back", 60)
        after = inserted()
        eventually(lambda: inserted() > after + 1000, "the agents writing again once Redis answers", 60)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-3000:]
        state = read_state(client, name)
        held = client.xrange(f"borg:{{{name}}}:log")
        assert state.size == sum(state.per_agent.values()) == sum(int(fields[b"t"]) for _, fields in held)
        assert state.held_chunks == len(held) and state.chunks == int(held[-1][0].split(b"-")[0])
    finally:
        if proc.poll() is None:
            proc.kill()
        client.close()
    assert "Traceback" not in log_path.read_text()


def test_a_wrong_password_or_an_unreachable_memory_fails_in_one_line(tmp_path: Path,
                                                                     redis_server: RedisServer) -> None:
    args = ["--config", str(EXAMPLES / "cartpole.yaml"), "--out", str(tmp_path / "run"), "--no-live",
            "--memory", f"redis://127.0.0.1:{redis_server.port}/0"]
    refused = train_cli(args, {"BORG_REDIS_PASSWORD": "guess"})
    assert refused.returncode == 2, "a refused password is bad input, not an outage"
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("borgdqn: error: redis at ") and "refused the user or password" in last, last
    assert last.endswith("(check BORG_REDIS_USERNAME and BORG_REDIS_PASSWORD)") and "guess" not in refused.stderr
    assert not (tmp_path / "run").exists(), "nothing to --resume after a refused connection"


def test_a_password_refused_mid_run_is_fatal_not_an_outage_retried_forever(
        tmp_path: Path, redis_server_aof: RedisServer) -> None:
    """The memory's password changes under a running agent (a replaced Secret): its link's reconnect is refused,
    and the agent stops with that reason instead of waiting, as for an outage, for a server that is there."""
    server, log_path = redis_server_aof, tmp_path / "train.log"
    proc, out, _ = _endless_hive(tmp_path, server, "pw")
    admin = redis.Redis.from_url(server.url)
    try:
        eventually(lambda: proc.poll() is None and min(_updates(out, 0), _updates(out, 1)) > 0,
                   "both agents writing and learning", 120)
        admin.config_set("requirepass", "a-new-secret-the-agents-do-not-know")
        admin.client_kill_filter(_type="normal", skipme=True)  # every agent connection must log in again
        assert proc.wait(timeout=120) == 1, log_path.read_text()[-3000:]
    finally:
        proc.kill()
        admin.close()
    output = log_path.read_text()
    assert "redis refused this client (invalid username-password pair" in output and "HiveError" in output, \
        output[-3000:]
    assert "a-new-secret" not in output and server.password not in output and "Traceback" not in output


def test_a_command_the_memory_acl_refuses_stops_the_hive_in_one_line(tmp_path: Path,
                                                                     redis_server: RedisServer) -> None:
    """A memory whose ACL lacks a command the agents need (here XADD, which the append script runs): the first
    write is refused, and the hive stops with that reason instead of counting write errors forever."""
    user, password, name = f"no-xadd-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex, f"acl-{uuid.uuid4().hex[:8]}"
    admin = redis.Redis.from_url(redis_server.url)
    admin.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all", "-xadd"])
    try:
        out = tmp_path / "run"
        sets = [f"--set={key}={value}" for key, value in small_config(out, 20_000).items() if key != "hive.live"]
        refused = train_cli(["--config", str(EXAMPLES / "cartpole.yaml"), *sets, "--no-live",
                          f"--set=replay.redis_name={name}", "--memory", f"redis://127.0.0.1:{redis_server.port}/0"],
                         {"BORG_REDIS_USERNAME": user, "BORG_REDIS_PASSWORD": password})
    finally:
        admin.acl_deluser(user)
        admin.close()
    output = refused.stdout + refused.stderr
    assert refused.returncode == 1, output[-3000:]
    assert "redis refused this client (" in output and "can't run this command" in output, output[-3000:]
    assert password not in output


def test_the_redis_url_must_not_carry_the_password() -> None:
    with pytest.raises(ConfigError, match="give the password in BORG_REDIS_PASSWORD"):
        build_config(environ={}, overrides={"replay.backend": "redis", "replay.redis_url": "redis://:pw@host:6379/0"})
    with pytest.raises(ConfigError, match=r"replay\.redis_url must be redis://HOST:PORT/DB"):
        build_config(environ={}, overrides={"replay.backend": "redis"})
    # The Redis memory serves LSTM sequences too.
    lstm = build_config(environ={}, overrides={"replay.backend": "redis", "replay.redis_url": "redis://h:1/0",
                                               "network.lstm": True, "env.frame_stack": 1})
    assert lstm.network.lstm and lstm.replay.backend == "redis"


@pytest.mark.slow
def test_cartpole_hive_of_two_learns_through_redis(tmp_path: Path, redis_server: RedisServer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Learns through Redis, acting and learning at the same time: best mean return >= 450 over 20 episodes within
    100k env steps (the hive stops there).

    The embedded memory's test holds the algorithm to 475. Here two agents exchange their experience through
    Redis at whatever pace the machine gives them, so a run is not repeatable; one CI run ended at 474.7 (agent 1)
    and 450.5 (agent 0). 450 still tells learning (a random policy scores ~22) from not learning.
    """
    monkeypatch.setenv("BORG_REDIS_PASSWORD", redis_server.password)
    config = build_config(
        yaml_path=EXAMPLES / "cartpole.yaml",
        environ={},
        overrides={"hive.out": str(tmp_path / "run"), "hive.live": "off", "hive.seed": 1,
                   "replay.backend": "redis", "replay.redis_url": f"redis://127.0.0.1:{redis_server.port}/0",
                   "replay.redis_name": f"cartpole-{uuid.uuid4().hex[:8]}",
                   # Each agent learns in a thread of its own (on a CPU, off by default): the bar holds that way too.
                   "learner.concurrent": "on", "hive.stop_at_mean_return": 450},
    )
    assert config.hive.steps == 100_000 and config.hive.agents == 2
    summary = train(config)
    best = max(agent["best_mean_return_20"] or 0.0 for agent in summary["agents"].values())
    assert best >= 450 and summary["target_reached"] is True, summary
    # The hive mind, measured: after warm-up (the second half of the run) each learner's batches come from both
    # agents in proportion to what each wrote (each agent's share of the log), within 5 points.
    written = read_state(redis.Redis.from_url(redis_server.url), config.replay.redis_name).per_agent
    for agent in (0, 1):
        records = [json.loads(line) for line in (tmp_path / "run" / "metrics" / f"agent-{agent}.jsonl").read_text()
                   .splitlines() if '"kind":"train"' in line]
        drawn: dict[str, int] = {}
        for record in records[len(records) // 2:]:
            for source, count in record["sampled_by_agent"].items():
                drawn[source] = drawn.get(source, 0) + count
        total = sum(drawn.values())
        assert total > 10_000 and set(drawn) == {"0", "1"}, drawn
        for source in (0, 1):
            share_drawn, share_written = drawn[str(source)] / total, written[source] / sum(written.values())
            assert abs(share_drawn - share_written) < 0.05, (agent, drawn, written)
