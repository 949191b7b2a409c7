"""Regenerate every generated file of the repository, in the order they depend on each other:

    python tools/regenerate.py

protobuf modules (protos/ -> borgdqn/proto/), the configuration reference in docs/configuration.md, the CRD
(crds/), the charts' CRD copy, RBAC rules and values schema, the Kibana saved objects (kibana/) and the
architecture picture (docs/architecture.svg). Each staleness test names this command; commit what it changes.
The operator's golden manifests are test fixtures, not generated files: `BORG_UPDATE_GOLDEN=1 pytest
tests/operator/test_builders.py` rewrites them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS: tuple[tuple[str, list[str]], ...] = (
    ("protobuf modules", ["-m", "borgdqn.proto.generate"]),
    ("configuration reference", ["-m", "borgdqn.config_reference", "--write"]),
    ("CRD", ["-m", "borg_operator.crd", "--write"]),
    ("chart files", ["-m", "borg_operator.chart_files", "--write"]),
    ("Kibana saved objects", ["-m", "borgdqn.telemetry.kibana_objects"]),
    ("architecture picture", ["docs/architecture.py"]),
)


def main() -> int:
    for what, args in STEPS:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"regenerate: the {what} failed ({' '.join(args)}):\n{done.stderr.strip()}", file=sys.stderr)
            return 1
        print(f"regenerate: {what}: {(done.stdout.strip().splitlines() or ['done'])[-1]}")
    changed = subprocess.run(["git", "status", "--short"], cwd=ROOT, capture_output=True, text=True, check=False)
    print(changed.stdout.strip() or "regenerate: nothing changed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
