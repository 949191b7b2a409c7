"""Acting and learning at the same time vs in turn: one agent, a fixed number of env steps and updates.

    python benchmarks/concurrent_learning.py [--env ALE/Pong-v5] [--steps 6000] [--threads 1 2] [--rounds 1]

Each row is a `borgdqn train` run of one agent at the default replay ratio (learner.update_every), learning from
step --learning-starts on; its wall is the agent's own clock (the final train record), so process start-up and
the env's first reset are left out. Per torch thread count: inline (learner.concurrent=off, the baseline),
concurrent (on), and acting alone (learning_starts past the budget) to split the inline wall into its acting and
learning parts, whose larger one bounds what running them side by side can gain: bound = inline / max(act, learn).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(env: str, steps: int, learning_starts: int, threads: int, concurrent: str, device: str, out: Path
        ) -> dict[str, float]:
    command = [sys.executable, "-m", "borgdqn", "train", "--env", env, "--agents", "1", "--steps", str(steps),
               "--seed", "0", "--no-live", "--out", str(out), f"--set=learner.concurrent={concurrent}",
               f"--set=learner.device={device}",
               f"--set=learner.learning_starts={learning_starts}", f"--set=hive.threads_per_agent={threads}",
               "--set=hive.checkpoint_every=100000000"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    lines = (out / "metrics" / "agent-0.jsonl").read_text().splitlines()
    final = [json.loads(line) for line in lines if '"kind":"train"' in line][-1]
    return {"env_steps": final["env_steps"], "updates": final["updates"], "wall": final["wall"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="ALE/Pong-v5")
    parser.add_argument("--steps", type=int, default=6000, help="env steps per run")
    parser.add_argument("--learning-starts", type=int, default=1000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads in the agent")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each row (the table shows the fastest)")
    parser.add_argument("--device", default="cpu", help="the learner's device (cpu, cuda, auto)")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    print(f"{args.env}  1 agent  {args.steps} env steps  learning from {args.learning_starts}  device={args.device}"
          f"  cores={os.cpu_count()}"
          f"  load(1m)={load:.1f}  {time.strftime('%Y-%m-%d')}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="borg-concurrent-") as tmp:
        for threads in args.threads:
            best: dict[str, dict[str, float]] = {}
            for round_ in range(args.rounds):
                for mode, concurrent, starts in (("inline", "off", args.learning_starts),
                                                 ("concurrent", "on", args.learning_starts),
                                                 ("acting only", "off", args.steps * 10)):
                    out = Path(tmp) / f"{threads}-{mode.replace(' ', '-')}-{round_}"
                    got = run(args.env, args.steps, starts, threads, concurrent, args.device, out)
                    if mode not in best or got["wall"] < best[mode]["wall"]:
                        best[mode] = got
            inline, concurrent_run, acting = best["inline"], best["concurrent"], best["acting only"]
            if concurrent_run["updates"] != inline["updates"]:
                raise SystemExit(f"the replay ratio was not held: {concurrent_run['updates']} updates concurrent "
                                 f"vs {inline['updates']} inline")
            learning = inline["wall"] - acting["wall"]
            bound = inline["wall"] / max(acting["wall"], learning)
            for mode, got in best.items():
                rows.append((threads, mode, got, inline["wall"] / got["wall"] if mode != "acting only" else None,
                             bound if mode == "concurrent" else None))
    print()
    print("| threads | mode | env steps | updates | wall s | env steps/s | speed vs inline | bound |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for threads, mode, got, ratio, bound in rows:
        print(f"| {threads} | {mode} | {got['env_steps']:.0f} | {got['updates']:.0f} | {got['wall']:.1f} | "
              f"{got['env_steps'] / got['wall']:.0f} | {'' if ratio is None else f'{ratio:.2f}x'} | "
              f"{'' if bound is None else f'{bound:.2f}x'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
