"""The wheels a GPU machine without a package index needs to run borgdqn: ours and every dependency but torch.

    python benchmarks/gpu_wheels.py --out wheels            # CPython 3.12 on x86-64 Linux (the lent GPU machines)
    python benchmarks/gpu_wheels.py --out w --python-version 3.11   # another interpreter (the CPU test uses its own)

The GPU machine has Python and PyTorch but reaches no index: ``benchmarks/gpu_run.sh`` installs these with
``pip install --no-index --no-deps``. torch is left out (it is there, and a CUDA torch is gigabytes); so are the
dev and operator dependencies and the clients a local hive does not import (Redis, Kafka, Elasticsearch). The set
is the closure of the rest of borgdqn's core and ``rl`` dependencies for the target interpreter (binary wheels
only); the script fails when it exceeds ``--max-mib``, since a device call carries 64 MiB with the working tree.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Already on the GPU machine; a CUDA build is far over any carry limit.
PROVIDED = {"torch"}
# Not imported by a local hive run (the Redis log, Kafka telemetry and the indexer stay off there): leaving them
# and their own dependencies out keeps the set, with the working tree, under what a device call carries (64 MiB).
UNUSED_BY_A_LOCAL_RUN = {"redis", "hiredis", "aiokafka", "elasticsearch"}
# manylinux tags a CPython 3.12 on a current x86-64 Linux accepts, newest first.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")


def requirements() -> list[str]:
    """borgdqn's core and ``rl`` requirements, without what the GPU machine provides or a local run leaves unused."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["rl"]]
    return [r for r in wanted if _name(r) not in PROVIDED | UNUSED_BY_A_LOCAL_RUN]


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(0).lower().replace("_", "-")


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the wheels (created)")
    parser.add_argument("--python-version", default="3.12", help="target CPython version (default 3.12)")
    parser.add_argument("--max-mib", type=float, default=60.0, help="fail above this total size (default 60)")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    abi = "cp" + args.python_version.replace(".", "")
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(args.out), str(ROOT))
    _pip(
        "download", "--quiet", "--only-binary=:all:", "--dest", str(args.out),
        "--python-version", args.python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
        "--abi", "none", *platforms, *requirements(),
    )  # fmt: skip
    wheels = sorted(args.out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for wheel in sorted(wheels, key=lambda w: -w.stat().st_size):
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:8.2f} MiB  in {len(wheels)} wheels for CPython {args.python_version} -> {args.out}")
    if total > args.max_mib * 2**20:
        print(f"gpu_wheels: {total / 2**20:.1f} MiB is over --max-mib {args.max_mib:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
