"""Telemetry's cost to a local hive: env steps/s with ``--kafka`` on against off, in the same run.

A CartPole hive (``examples/cartpole.yaml``: 2 agents, 4 envs each, learning from the start of each round) runs
``--rounds`` times with telemetry off and as many times with it on, alternating (off/on, on/off, ...) so that a
change of load hits both alike. Each round's rate is the hive's env steps/s between its agents' first and last
train records (process start-up and the env probe are not counted). The Kafka broker (the test harness's, or
``--kafka``) runs through every round, so the off rounds pay for the idle JVM too. A short warm-up round with
telemetry on comes first and is not counted: it creates the topics and warms the fresh broker's JIT, one-time
costs of the broker, not of the producer.

With telemetry on, every agent emits an EpisodeEvent per finished game (CartPole's short early games make that
dozens per second), a TrainingReport per report and agent 0 a MemoryReport; ``--report-every`` sets the pace
(the default 0.2 s is ten times the hive's default rate, to make the cost visible).

    python benchmarks/telemetry_overhead.py [--rounds 3] [--steps 20000] [--kafka HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from tests.harness.cache import Progress  # noqa: E402
from tests.harness.kafka import ensure_kafka, start_kafka  # noqa: E402

CLOSED = re.compile(r"telemetry closed source=\S+ emitted=(\d+) sent=(\d+) dropped=(\d+) unsent=(\d+)")


def hive_rate(out: Path) -> tuple[float, float]:
    """(env steps/s of the hive, seconds measured) from the agents' train records."""
    total, spans = 0.0, []
    for path in sorted((out / "metrics").glob("agent-*.jsonl")):
        train = [json.loads(line) for line in path.read_text().splitlines() if '"kind":"train"' in line]
        first, last = train[0], train[-1]
        span = last["wall"] - first["wall"]
        total += (last["env_steps"] - first["env_steps"]) / span
        spans.append(span)
    return total, min(spans)


def run_round(work: Path, index: int, telemetry: str, args: argparse.Namespace) -> dict[str, float]:
    out = work / f"round-{index}-{'on' if telemetry else 'off'}"
    cmd = [sys.executable, "-m", "borgdqn", "train", "--config", str(ROOT / "examples" / "cartpole.yaml"),
           "--out", str(out), "--steps", str(args.steps), "--seed", str(index), "--no-live",
           f"--set=hive.report_every_s={args.report_every}", "--set=hive.checkpoint_every=10000000"]
    if telemetry:
        cmd += ["--kafka", telemetry]
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            check=False)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"round {index} failed:\n{result.stderr[-3000:]}")
    rate, span = hive_rate(out)
    row = {"rate": rate, "span": span, "wall": time.monotonic() - started, "events": 0.0, "dropped": 0.0}
    for log in (out / "logs").glob("agent-*.log"):
        for emitted, _sent, dropped, _unsent in CLOSED.findall(log.read_text()):
            row["events"] += int(emitted)
            row["dropped"] += int(dropped)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds with telemetry off, and as many on")
    parser.add_argument("--steps", type=int, default=20_000, help="hive env steps per round")
    parser.add_argument("--report-every", type=float, default=0.2, help="hive.report_every_s (seconds)")
    parser.add_argument("--warmup-steps", type=int, default=5_000, help="steps of the uncounted warm-up (0: none)")
    parser.add_argument("--kafka", help="HOST:PORT of a running Kafka (default: start the test harness's)")
    args = parser.parse_args()

    broker = None
    bootstrap = args.kafka
    if not bootstrap:
        broker = start_kafka(ensure_kafka(Progress()))
        bootstrap = broker.bootstrap
    rows: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    try:
        with tempfile.TemporaryDirectory(prefix="borgdqn-telemetry-bench-") as tmp:
            if args.warmup_steps:
                warm = run_round(Path(tmp), 99, bootstrap, argparse.Namespace(**{**vars(args),
                                                                                  "steps": args.warmup_steps}))
                print(f"warm-up telemetry=on: {warm['rate']:,.0f} env steps/s (not counted)", flush=True)
            index = 0
            for r in range(args.rounds):
                order = ("off", "on") if r % 2 == 0 else ("on", "off")
                for mode in order:
                    row = run_round(Path(tmp), index, bootstrap if mode == "on" else "", args)
                    rows[mode].append(row)
                    print(f"round {index} telemetry={mode}: {row['rate']:,.0f} env steps/s over {row['span']:.1f}s"
                          f" (wall {row['wall']:.0f}s, events {row['events']:.0f})", flush=True)
                    index += 1
    finally:
        if broker is not None:
            broker.stop()

    def mean(mode: str, key: str) -> float:
        return sum(row[key] for row in rows[mode]) / len(rows[mode])

    off, on = mean("off", "rate"), mean("on", "rate")
    # Rounds 2k and 2k+1 ran back to back: their ratio is the least disturbed by a change of load.
    pairs = [rows["on"][i]["rate"] / rows["off"][i]["rate"] for i in range(args.rounds)]
    events_per_s = sum(r["events"] / r["span"] for r in rows["on"]) / len(rows["on"])
    load = os.getloadavg()[0]
    print()
    print(f"CartPole-v1 hive  agents=2  envs=4 each  steps/round={args.steps:,}  rounds={args.rounds} each  "
          f"report_every={args.report_every}s  cores={os.cpu_count()}  load(1m)={load:.1f}")
    print(f"{'telemetry':<10} {'env steps/s':>12} {'per round':>40}")
    for mode, rate in (("off", off), ("on", on)):
        per_round = " ".join(f"{row['rate']:,.0f}" for row in rows[mode])
        print(f"{mode:<10} {rate:>12,.0f} {per_round:>40}")
    print(f"ratio on/off of back-to-back pairs: {' '.join(f'{r:.3f}' for r in pairs)}  "
          f"median {sorted(pairs)[len(pairs) // 2]:.3f}")
    print(f"ratio on/off: {on / off:.3f} (target >= 0.97)   events/s with telemetry on: ~{events_per_s:,.0f}   "
          f"dropped: {sum(r['dropped'] for r in rows['on']):.0f}")


if __name__ == "__main__":
    main()
