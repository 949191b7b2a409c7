#!/usr/bin/env bash
# A GPU run in one command, for a lent machine with one NVIDIA GPU, Python 3.12 and PyTorch but no package index.
#
#   here:   python3 benchmarks/gpu_wheels.py --out .gpu-wheels       # ~56 MiB of cp312 wheels (ignored by git)
#   there:  OUT=/path bash benchmarks/gpu_run.sh                      # the device tool: carry [".gpu-wheels"]
#
# Under 9 minutes in all (BORG_BUDGET_S), it writes under $OUT:
#   env.txt              python, torch, CUDA, the GPU (nvidia-smi)
#   learner.md/.json     updates/s of eager fp32, bf16 and CUDA-graph updates at batch 32 and 256, each checked
#                        against a CPU fp32 update (benchmarks/learner_precision.py)
#   concurrent.md        one agent's wall for the same env steps and updates, acting and learning in turn vs at
#                        the same time (benchmarks/concurrent_learning.py)
#   pong/                a Pong hive run for the rest of the budget: config, summary, metrics, logs, plots/
#   gpu_run.log          what ran, when
# Checkpoints (tens of MB per agent) stay in a scratch directory: they are not worth carrying back.
#
# Knobs (environment): BORG_WHEELS (.gpu-wheels; "none" uses the Python environment as it is), BORG_BUDGET_S
# (510), BORG_DEVICE (cuda; cpu for the check on a CPU), BORG_BATCHES ("32 256"), BORG_BENCH_S (8 per row),
# BORG_ENV (ALE/Pong-v5), BORG_AGENTS (4), BORG_TRAIN_SET (extra --set KEY=VALUE words for the hive run),
# BORG_CONCURRENT_STEPS (4000 env steps per run of the concurrency comparison; 0 skips it).
# Exit status: 0 when everything ran and every learner variant agreed with the CPU, else 1.
set -euo pipefail

: "${OUT:?set OUT to the directory that receives the results}"
WHEELS=${BORG_WHEELS:-.gpu-wheels}
BUDGET_S=${BORG_BUDGET_S:-510}
DEVICE=${BORG_DEVICE:-cuda}
BATCHES=${BORG_BATCHES:-32 256}
BENCH_S=${BORG_BENCH_S:-8}
ENV_ID=${BORG_ENV:-ALE/Pong-v5}
AGENTS=${BORG_AGENTS:-4}
TRAIN_SET=${BORG_TRAIN_SET:-}
CONCURRENT_STEPS=${BORG_CONCURRENT_STEPS:-4000}
TAIL_S=45  # kept for the hive's clean stop, the plots and the summary

cd "$(dirname "$0")/.."
mkdir -p "$OUT"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
start=$SECONDS
status=0
log() { echo "gpu_run [$((SECONDS - start))s]: $*" | tee -a "$OUT/gpu_run.log"; }

if [[ "$WHEELS" != none ]]; then
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    log "no wheels under $WHEELS: make them with python3 benchmarks/gpu_wheels.py --out $WHEELS (or BORG_WHEELS=none)"
    exit 2
  fi
  # --target: a directory of its own on PYTHONPATH, so the machine's Python (and its torch) stays untouched.
  python3 -m pip install --quiet --no-index --no-deps --target "$SCRATCH/site" "$WHEELS"/*.whl
  export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
  log "installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS"
fi

if ! {
  python3 -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__,
    "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("gpu",
    torch.cuda.get_device_name() if torch.cuda.is_available() else "none")' &&
  python3 -c 'import gymnasium, ale_py, pydantic; print("gymnasium", gymnasium.__version__, gymnasium.__file__);
print("ale-py", ale_py.__version__, "pydantic", pydantic.__version__)' &&
  echo "cpus $(nproc)" &&
  if command -v nvidia-smi >/dev/null; then nvidia-smi; fi
} >"$OUT/env.txt" 2>&1; then
  log "the environment is not ready:"
  cat "$OUT/env.txt"
  exit 2
fi
log "environment: $(head -3 "$OUT/env.txt" | tr '\n' ' ')"

log "learner variants on $DEVICE, batches $BATCHES, ${BENCH_S}s per row"
# shellcheck disable=SC2086  # BATCHES is a list of words
if ! python3 benchmarks/learner_precision.py --device "$DEVICE" --batches $BATCHES --seconds "$BENCH_S" \
    --json "$OUT/learner.json" | tee "$OUT/learner.md"; then
  status=1
  log "a learner variant failed or disagreed with the CPU (see learner.md)"
fi

if ((CONCURRENT_STEPS > 0)); then
  log "one agent, $CONCURRENT_STEPS env steps: inline vs concurrent learning on $DEVICE"
  if ! python3 benchmarks/concurrent_learning.py --env "$ENV_ID" --steps "$CONCURRENT_STEPS" \
      --learning-starts $((CONCURRENT_STEPS / 6)) --threads 1 --device "$DEVICE" | tee "$OUT/concurrent.md"; then
    status=1
    log "the concurrency comparison failed (see concurrent.md)"
  fi
fi

left=$((BUDGET_S - (SECONDS - start) - TAIL_S))
if ((left < 20)); then
  log "only ${left}s left of ${BUDGET_S}s: no hive run"
  exit 1
fi
log "hive: $ENV_ID, $AGENTS agents on $DEVICE for ${left}s"
sets=(--set hive.live=off --set "learner.device=$DEVICE")
for word in $TRAIN_SET; do sets+=(--set "$word"); done
# SIGTERM stops the hive the clean way (every agent saves and the summary is written); KILL only if it hangs.
train_rc=0
timeout -s TERM -k 30 "$left" python3 -m borgdqn train --env "$ENV_ID" --agents "$AGENTS" --steps 1000000000 \
  --seed 0 --out "$SCRATCH/run" "${sets[@]}" >"$OUT/train.log" 2>&1 || train_rc=$?
# 124: the time was up and the hive stopped on SIGTERM, as planned.
if ((train_rc != 0 && train_rc != 124)); then
  status=1
  log "the hive exited with $train_rc (see train.log)"
fi
mkdir -p "$OUT/pong"
for part in config.yaml summary.json metrics logs; do
  if [[ -e "$SCRATCH/run/$part" ]]; then cp -r "$SCRATCH/run/$part" "$OUT/pong/"; fi
done
if [[ -f "$SCRATCH/run/summary.json" ]]; then
  python3 -m borgdqn plot "$SCRATCH/run" --out "$OUT/pong/plots" >>"$OUT/gpu_run.log" 2>&1 || status=1
  python3 - "$OUT/pong" <<'EOF' | tee "$OUT/pong/figures.md"
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
summary = json.loads((run / "summary.json").read_text())
hive = summary["hive"]
last = {}
for path in sorted((run / "metrics").glob("agent-*.jsonl")):
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written when the run stopped
        if record.get("kind") == "train":
            last[path.stem] = record
steps_per_s = sum(r.get("env_steps_per_s") or 0.0 for r in last.values())
updates_per_s = sum(r.get("updates_per_s") or 0.0 for r in last.values())
updates = sum(r.get("updates") or 0 for r in last.values())
print("| agents | env steps | episodes | updates | env steps/s (last) | updates/s (last) | mean return (last 20) | wall s |")
print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
print(f"| {len(last)} | {hive['env_steps']:,} | {hive['episodes']} | {updates:,} | {steps_per_s:,.0f} | "
      f"{updates_per_s:,.1f} | {hive['mean_return_last_20']} | {summary['wall_seconds']:.0f} |")
EOF
else
  status=1
  log "the hive wrote no summary.json (see train.log)"
fi
log "done in $((SECONDS - start))s, status $status"
exit "$status"
