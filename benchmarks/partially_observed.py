"""The LSTM learns what stacking cannot see: CartPole with its velocities hidden, LSTM vs no memory vs stacking.

    python benchmarks/partially_observed.py --seeds 0 1 2 --out runs/no-velocity --figure docs/cartpole-no-velocity.png
    # ~25 minutes on 2 cores

Three settings of ``borgdqn/CartPoleNoVelocity-v1``, each a 2-agent hive of 150k env steps from the id's preset
(``borgdqn train --env borgdqn/CartPoleNoVelocity-v1``), the same in everything else but the network:

* ``lstm``:  the preset (MLP [64] + LSTM 64, batches of 64 sequences of 16 after a burn-in of 8);
* ``none``:  ``--set network.lstm=false --set network.mlp_hidden=[256,256]`` (one observation, no memory; the
  CartPole preset's larger torso, in the MLP's favour);
* ``stack``: the same with ``--set env.frame_stack=4`` (the last four observations).

Per run: the hive's mean return over its last 20 episodes, the best mean of 20 consecutive episodes of one agent,
and the agent env steps at which an agent's mean of 20 first reached the bar (400). Then ``borgdqn plot`` draws the
seed-0 runs side by side. The baseline of the ratio column is ``none``, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENV_ID = "borgdqn/CartPoleNoVelocity-v1"
BAR = 400.0
WINDOW = 20
MLP = ["--set", "network.lstm=false", "--set", "network.mlp_hidden=[256,256]"]  # the CartPole preset's torso
SETTINGS: dict[str, list[str]] = {"lstm": [], "none": MLP, "stack": [*MLP, "--set", "env.frame_stack=4"]}


def steps_to_bar(run: Path) -> int | None:
    """The fewest agent env steps at which an agent's mean of its last 20 episodes reached BAR."""
    reached: list[int] = []
    for path in sorted((run / "metrics").glob("agent-*.jsonl")):
        returns: list[float] = []
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") != "episode":
                continue
            returns.append(float(record["return"]))
            if len(returns) >= WINDOW and statistics.fmean(returns[-WINDOW:]) >= BAR:
                reached.append(int(record["env_steps"]))
                break
    return min(reached) if reached else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, help="hive env steps per run (default: the preset's, 150k)")
    parser.add_argument("--out", type=Path, default=Path("runs/no-velocity"))
    parser.add_argument("--figure", type=Path, help="also copy the side-by-side plot (compare-returns.png) here")
    args = parser.parse_args(argv)

    rows: dict[str, list[tuple[float, float, int | None, float]]] = {name: [] for name in SETTINGS}
    budget = [] if args.steps is None else ["--steps", str(args.steps)]
    steps = 0
    for seed in args.seeds:
        for name, extra in SETTINGS.items():
            run = args.out / f"{name}-seed{seed}"
            started = time.monotonic()
            subprocess.run(
                [sys.executable, "-m", "borgdqn", "train", "--env", ENV_ID, "--agents", "2", "--seed", str(seed),
                 "--out", str(run), "--no-live", *budget, *extra],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            summary = json.loads((run / "summary.json").read_text())
            steps = summary["hive"]["env_steps"]
            last = summary["hive"]["mean_return_last_20"]
            best = max(a["best_mean_return_20"] or 0.0 for a in summary["agents"].values())
            rows[name].append((last, best, steps_to_bar(run), time.monotonic() - started))
            print(f"{name} seed {seed}: last 20 {last:.1f}, best agent mean of 20 {best:.1f}", flush=True)

    print(f"\n{ENV_ID}, 2 agents, {steps:,} hive env steps, seeds {' '.join(map(str, args.seeds))}")
    print(
        "| memory | mean of the last 20 (per seed) | best agent's best mean of 20 (per seed) "
        f"| agent steps to {BAR:.0f} (per seed) | mean of the last 20 vs none | wall s (mean) |"
    )
    print("| --- | --- | --- | --- | ---: | ---: |")
    baseline = statistics.fmean(r[0] for r in rows["none"])
    for name, runs in rows.items():
        lasts = " / ".join(f"{r[0]:.0f}" for r in runs)
        bests = " / ".join(f"{r[1]:.0f}" for r in runs)
        bars = " / ".join("-" if r[2] is None else f"{r[2]:,}" for r in runs)
        ratio = statistics.fmean(r[0] for r in runs) / baseline
        print(f"| {name} | {lasts} | {bests} | {bars} | {ratio:.1f}x | {statistics.fmean(r[3] for r in runs):.0f} |")

    seed = args.seeds[0]
    plot_dir = args.out / "plots"
    subprocess.run(
        [sys.executable, "-m", "borgdqn", "plot", *(str(args.out / f"{n}-seed{seed}") for n in SETTINGS),
         "--labels", *SETTINGS, "--out", str(plot_dir)],
        check=True,
    )  # fmt: skip
    if args.figure is not None:
        shutil.copyfile(plot_dir / "compare-returns.png", args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
