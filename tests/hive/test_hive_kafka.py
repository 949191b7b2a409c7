"""Live telemetry from a local hive (`borgdqn train --kafka`) and from the memory monitor, into a real Kafka.

Every episode of the run is one EpisodeEvent in Kafka (compared with summary.json and the metrics files);
agents send TrainingReports, agent 0 MemoryReports; the memory monitor with `--kafka` sends MemoryReports.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from borgdqn.cli import main
from borgdqn.metrics import read_records
from borgdqn.telemetry.events import kind_of
from tests.harness.kafka import KafkaServer
from tests.harness.redis import RedisServer
from tests.support.conditions import eventually
from tests.support.hive import EXAMPLES, small_config, train_cli
from tests.support.kafka_events import read_events
from tests.support.redis_log import episode as add_episode
from tests.support.redis_log import open_log

pytestmark = pytest.mark.integration


def test_a_hive_streams_every_episode_its_training_and_its_memory(tmp_path: Path, kafka_server: KafkaServer) -> None:
    out = tmp_path / f"run-{uuid.uuid4().hex[:8]}"
    sets = [f"--set={key}={value}" for key, value in small_config(out, 3000).items() if key != "hive.live"]
    result = train_cli(["--config", str(EXAMPLES / "cartpole.yaml"), *sets, "--no-live", "--kafka",
                     kafka_server.bootstrap], {})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    expected = summary["hive"]["episodes"]
    assert expected > 0

    collective = out.name  # the default: the run directory's name
    events = read_events(
        kafka_server.bootstrap, ("episode", "training", "memory", "drops"),
        keep=lambda e: e.header.collective == collective,
        done=lambda got: sum(kind_of(e) == "episode" for _, e in got) >= expected,
    )  # fmt: skip
    ids = [(e.header.source_id, e.header.seq) for _, e in events]
    assert len(ids) == len(set(ids)), "no event twice"
    by_kind = Counter(kind_of(e) for _, e in events)
    assert by_kind["episode"] == expected
    assert by_kind["drops"] == 0
    for source in {e.header.source_id for _, e in events}:  # no gaps: nothing was dropped
        seqs = sorted(e.header.seq for _, e in events if e.header.source_id == source)
        assert seqs == list(range(len(seqs)))

    episodes = [e.episode for _, e in events if kind_of(e) == "episode"]
    for agent in (0, 1):
        mine = [ep for ep in episodes if ep.agent == agent]
        assert len(mine) == summary["agents"][str(agent)]["episodes"]
        records = [json.loads(line) for line in (out / "metrics" / f"agent-{agent}.jsonl").read_text().splitlines()]
        recorded = [(r["episode"], r["return"], r["length"], r["env_steps"]) for r in records if r["kind"] == "episode"]
        assert sorted((ep.episode, ep.episode_return, ep.length, ep.env_steps) for ep in mine) == recorded
        assert {ep.policy for ep in mine} == {r["policy"] for r in records if r["kind"] == "episode"}

    training = [e.training for _, e in events if kind_of(e) == "training"]
    assert {t.agent for t in training} == {0, 1}
    last = max(training, key=lambda t: t.updates)
    assert last.updates > 0 and last.HasField("loss") and last.learning_rate == pytest.approx(1e-3)
    assert any(t.env_steps_per_s > 0 for t in training)
    # The mean age of what was sampled, in steps stored since: within the memory of 5000 steps, and the same
    # value as the agent's train record of that report.
    ages = [t.replay_sample_age for t in training if t.HasField("replay_sample_age")]
    assert last.HasField("replay_sample_age") and all(0 < age < 5000 for age in ages)
    for agent in (0, 1):
        lines = (out / "metrics" / f"agent-{agent}.jsonl").read_text().splitlines()
        recorded = [r["replay_sample_age"] for r in map(json.loads, lines) if r["kind"] == "train"]
        sent = [t.replay_sample_age for t in training if t.agent == agent and t.HasField("replay_sample_age")]
        assert sent and sorted(sent) == sorted(age for age in recorded if age is not None)

    memory = [(e.header.source_id, e.memory) for _, e in events if kind_of(e) == "memory"]
    assert memory and {source.split("/")[1] for source, _ in memory} == {"agent-0"}
    final = max((m for _, m in memory), key=lambda m: m.inserted)
    assert final.capacity == 5000 and 0 < final.size <= final.inserted
    assert set(final.per_agent_steps) == {0, 1} and sum(final.per_agent_steps.values()) == final.size
    assert final.bytes_used > 0 and final.HasField("insert_rate")

    logs = "".join(p.read_text() for p in (out / "logs").glob("agent-*.log"))
    assert logs.count("telemetry closed") == 2 and "dropped=0 unsent=0" in logs


def test_the_memory_monitor_sends_memory_reports(redis_server: RedisServer, kafka_server: KafkaServer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    name = f"mon-{uuid.uuid4().hex[:12]}"
    replay = open_log(redis_server.url, name)
    try:
        add_episode(replay, stream=0, agent=0, steps=24)
        add_episode(replay, stream=1, agent=1, steps=8)
        monkeypatch.setenv("BORG_REDIS_PASSWORD", redis_server.password)
        url = f"redis://127.0.0.1:{redis_server.port}/0"
        for _ in range(2):
            assert main(["memory-monitor", "--memory", url, "--name", name, "--once", "--kafka",
                         kafka_server.bootstrap]) == 0  # fmt: skip
    finally:
        replay._r.close()
    events = read_events(kafka_server.bootstrap, ("memory",), keep=lambda e: e.header.collective == name,
                         done=lambda got: len(got) >= 2)  # fmt: skip
    assert len(events) == 2, "one report per reading"
    for topic, event in events:
        assert topic == "borg.telemetry.memory"
        assert event.header.source_id.startswith(f"{name}/memory-0/")
        report = event.memory
        assert (report.size, report.capacity, report.inserted) == (32, 64, 32)
        assert (report.dropped_chunks, report.skipped_chunks, report.outage_seconds) == (0, 0, 0.0)
        assert dict(report.per_agent_steps) == {0: 24, 1: 8}
        assert report.bytes_used > 0 and not report.HasField("insert_rate")  # --once: one reading, no rate
    # A bad address is bad input (exit 2).
    assert main(["memory-monitor", "--memory", "redis://127.0.0.1:1/0", "--name", name, "--once", "--kafka",
                 "no-port"]) == 2  # fmt: skip


CLOSED = re.compile(r"telemetry closed source=(\S+) emitted=(\d+) sent=(\d+) dropped=(\d+) unsent=(\d+)")


BOUNCES = 3


def test_kafka_bounced_three_times_during_a_run_training_goes_on_and_the_lost_events_are_the_dropped_count(
        tmp_path: Path, kafka_server_own: KafkaServer) -> None:  # fmt: skip
    """Kafka SIGKILLed and restarted BOUNCES times while two agents train: they train on, each outage overflows
    their buffers, and in the end every event is either in Kafka exactly once or counted as dropped."""
    server, out = kafka_server_own, tmp_path / f"outage-{uuid.uuid4().hex[:8]}"
    # Reports 20 times a second and a buffer of 100 events: an outage of a few seconds overflows it.
    overrides = small_config(out, 10_000_000, **{"hive.report_every_s": 0.05, "telemetry.buffer_events": 100})
    sets = [f"--set={key}={value}" for key, value in overrides.items() if key != "hive.live"]
    cmd = [sys.executable, "-m", "borgdqn", "train", "--config", str(EXAMPLES / "cartpole.yaml"), *sets, "--no-live",
           "--kafka", server.bootstrap]  # fmt: skip
    log_file = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    agent_logs = [out / "logs" / f"agent-{a}.log" for a in (0, 1)]

    def alive() -> None:
        assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]

    def every_log_says(text: str, times: int = 1) -> bool:
        alive()
        return all(p.exists() and p.read_text().count(text) >= times for p in agent_logs)

    def env_steps() -> list[int]:
        alive()
        # read_records: the agents write as this reads, and a line being written is skipped, not parsed.
        records = list(read_records(out, "train"))
        return [max((r["env_steps"] for r in records if r["agent"] == agent), default=0) for agent in (0, 1)]

    try:
        eventually(lambda: min(env_steps()) > 500, "both agents running", 120)
        for bounce in range(1, BOUNCES + 1):
            server.kill()
            eventually(lambda b=bounce: every_log_says("dropping the oldest", b),
                       f"both agents' buffers overflowing in outage {bounce}", 60)
            before = env_steps()
            eventually(lambda before=before: all(now > then + 500 for now, then in zip(env_steps(), before,
                                                                                       strict=True)),
                       f"both agents training on while Kafka is down ({bounce})", 60)
            server.launch()
            eventually(lambda b=bounce: every_log_says("takes events again after", b)
                       and every_log_says("(reported)", b),
                       f"both agents delivering again and reporting their drops ({bounce})", 60)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log_file.close()
    assert proc.returncode == 0, (tmp_path / "train.log").read_text()[-3000:]

    closed = {m[0]: tuple(int(x) for x in m[1:]) for p in agent_logs for m in CLOSED.findall(p.read_text())}
    assert len(closed) == 2
    events = read_events(server.bootstrap, ("episode", "training", "memory", "drops"),
                         keep=lambda e: e.header.collective == out.name,
                         done=lambda got: len(got) >= sum(sent for _, sent, _, _ in closed.values()))  # fmt: skip
    for source, (emitted, sent, dropped, unsent) in closed.items():
        seqs = [e.header.seq for _, e in events if e.header.source_id == source]
        assert unsent == 0 and dropped > 0 and sent + dropped == emitted
        assert len(seqs) == len(set(seqs)) == sent, "every acknowledged event in Kafka once"
        gaps = set(range(emitted)) - set(seqs)
        assert len(gaps) == dropped, "the events lost are exactly the ones counted as dropped"
        reports = sorted((e.drops for _, e in events if e.header.source_id == source and kind_of(e) == "drops"),
                         key=lambda r: r.dropped_events)  # fmt: skip
        assert reports and reports[-1].dropped_events == dropped
        assert all(gaps & set(range(r.first_dropped_seq, r.last_dropped_seq + 1)) for r in reports)
