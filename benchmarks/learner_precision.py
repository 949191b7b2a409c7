"""Learner updates/s for eager fp32, bf16 autocast and CUDA-graph updates, each checked against a CPU fp32 update.

    python benchmarks/learner_precision.py --device cuda --batches 32 256 --seconds 10 --json OUT/learner.json
    python benchmarks/learner_precision.py --device cpu --batches 32 --seconds 1     # eager only (the CPU check)

Every variant is borgdqn's Learner (Nature CNN, dueling, Double DQN, 84x84x4 uint8 frames, 6 actions) built from the
same seed, so all start from the same weights. Agreement: the first ``--check-updates`` updates of each variant on
the same batches against a CPU fp32 learner's: the relative error of each loss and of the new priorities
(|TD| per sample; ``||p - p_cpu|| / ||p_cpu||``). TF32 matmuls (on for CUDA) and bf16 round differently from the
CPU, hence the tolerances per variant. The table's ratio is to eager fp32 at the same batch size, measured in the
same run. Exits 1 when a variant disagrees, 2 when ``--device cuda`` finds no GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from borgdqn.config import LearnerConfig, NetworkConfig
from borgdqn.memory.protocol import TransitionBatch
from borgdqn.rl.learner import Learner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learner_updates import STACK, Spec, make_batches  # a sibling script, not a package

# name -> (mixed_precision, compile, relative tolerance of loss and priorities against the CPU fp32 update)
VARIANTS: dict[str, tuple[str, bool, float]] = {
    "eager fp32": ("off", False, 2e-2),
    "bf16": ("on", False, 1e-1),
    "CUDA graph (bf16)": ("on", True, 1e-1),
}
CUDA_ONLY = {"bf16", "CUDA graph (bf16)"}  # bf16 autocast is emulated (slow) on most CPUs; graphs are CUDA's


@dataclass
class Row:
    variant: str
    batch: int
    updates_per_s: float
    vs_eager: float
    loss_error: float  # worst relative error of the loss over the checked updates
    priority_error: float  # worst relative L2 error of the priorities
    tolerance: float
    agrees: bool
    error: str = ""  # why the variant could not run


def make_learner(device: str, mixed_precision: str, compile: bool) -> Learner:
    return Learner(
        NetworkConfig(torso="nature_cnn", dueling=True),
        LearnerConfig(device=device, mixed_precision=mixed_precision, compile=compile),  # type: ignore[arg-type]
        Spec(),
        STACK,
        seed=0,
    )


def agreement(
    learner: Learner, reference: list[tuple[float, np.ndarray]], batches: list[TransitionBatch]
) -> tuple[float, float]:
    """Worst relative errors of (loss, priorities) of ``learner``'s first updates against the CPU reference's."""
    loss_error = priority_error = 0.0
    for batch, (ref_loss, ref_priorities) in zip(batches, reference, strict=False):
        result = learner.update(batch)
        loss_error = max(loss_error, abs(result.loss - ref_loss) / max(abs(ref_loss), 1e-8))
        diff = np.linalg.norm(result.priorities - ref_priorities) / max(float(np.linalg.norm(ref_priorities)), 1e-8)
        priority_error = max(priority_error, float(diff))
    return loss_error, priority_error


def rate(learner: Learner, batches: list[TransitionBatch], seconds: float, device: torch.device) -> float:
    count = 0
    start = time.perf_counter()
    while True:
        learner.update(batches[count % len(batches)])  # returns host values: each update is complete
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256], help="batch sizes (default 32 256)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per variant and batch size")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured updates first (graph capture included)")
    parser.add_argument("--check-updates", type=int, default=3, help="updates compared with the CPU fp32 learner")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("learner_precision: --device cuda but torch sees no GPU here", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    variants = {k: v for k, v in VARIANTS.items() if device.type == "cuda" or k not in CUDA_ONLY}

    rows: list[Row] = []
    for batch_size in args.batches:
        batches = make_batches(8, batch_size)
        checked = batches[: args.check_updates]
        cpu = make_learner("cpu", "off", False)
        reference = [(r.loss, r.priorities) for r in (cpu.update(b) for b in checked)]
        eager_rate = None
        for name, (mixed_precision, compile, tolerance) in variants.items():
            try:
                learner = make_learner(args.device, mixed_precision, compile)
                loss_error, priority_error = agreement(learner, reference, checked)
                for i in range(args.warmup):
                    learner.update(batches[i % len(batches)])
                updates_per_s = rate(learner, batches, args.seconds, device)
            except Exception as err:  # one variant that cannot run here must not cost the others' figures
                print(f"learner_precision: {name} at batch {batch_size} failed: {err!r}", file=sys.stderr)
                rows.append(Row(name, batch_size, 0.0, 0.0, math.inf, math.inf, tolerance, False, repr(err)))
                continue
            eager_rate = eager_rate or updates_per_s or 1.0
            agrees = loss_error <= tolerance and priority_error <= tolerance
            rows.append(
                Row(name, batch_size, updates_per_s, updates_per_s / eager_rate, loss_error, priority_error,
                    tolerance, agrees)
            )  # fmt: skip
            del learner
            if device.type == "cuda":
                torch.cuda.empty_cache()

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"learner updates/s and agreement with a CPU fp32 update — Nature CNN (dueling), stack {STACK}, 84x84")
    print(f"device: {where}; torch {torch.__version__}; {args.seconds:g} s per row\n")
    print("| variant | batch | updates/s | vs eager fp32 | loss rel. error | priorities rel. error | agrees |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(
            f"| {r.variant} | {r.batch} | {r.updates_per_s:,.1f} | {r.vs_eager:.2f}x | {r.loss_error:.1e} "
            f"| {r.priority_error:.1e} | {'yes' if r.agrees else f'NO (tolerance {r.tolerance:g}) {r.error}'.strip()} |"
        )
    if args.json is not None:
        document = {"device": where, "torch": torch.__version__, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(document, indent=1))
    return 0 if all(r.agrees for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
