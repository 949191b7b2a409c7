"""`python tools/regenerate.py` regenerates every generated file, and on an up-to-date tree changes none of them."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = [
    *sorted((ROOT / "borgdqn" / "proto").rglob("*_pb2.py*")),
    ROOT / "docs" / "configuration.md",
    ROOT / "crds" / "borg.dev_borgcollectives.yaml",
    ROOT / "charts" / "borg-operator" / "crds" / "borg.dev_borgcollectives.yaml",
    ROOT / "charts" / "borg-operator" / "files" / "rbac-rules.yaml",
    ROOT / "charts" / "borg-collective" / "values.schema.json",
    ROOT / "kibana" / "borg-collective.ndjson",
    ROOT / "docs" / "architecture.svg",
]
# The staleness tests, each of which names the command in its failure message.
STALENESS_TESTS = ["tests/repo/test_protos.py", "tests/config/test_config.py", "tests/operator/test_crd.py",
                   "tests/e2e/test_charts.py", "tests/telemetry/test_kibana_objects.py",
                   "tests/repo/test_architecture_picture.py"]


def _digests() -> dict[Path, str]:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in GENERATED}


def test_regenerating_an_up_to_date_tree_changes_nothing() -> None:
    assert len(GENERATED) >= 9 and all(path.exists() for path in GENERATED)
    before = {path: path.stat().st_mtime_ns for path in GENERATED}
    digests = _digests()
    done = subprocess.run([sys.executable, "tools/regenerate.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert _digests() == digests, "a generator wrote something else than the committed file"
    for what in ("protobuf modules", "configuration reference", "CRD", "chart files", "Kibana saved objects",
                 "architecture picture"):
        assert f"regenerate: {what}: " in done.stdout, (what, done.stdout)
    # Every generated file was in fact written or checked by a step (the ones that rewrite in place get a new
    # mtime; the configuration reference is only written when it differs, which it does not here).
    rewritten = [path for path in GENERATED if path.stat().st_mtime_ns != before[path]]
    assert ROOT / "kibana" / "borg-collective.ndjson" in rewritten and ROOT / "docs" / "architecture.svg" in rewritten


def test_every_staleness_test_names_the_command() -> None:
    for name in STALENESS_TESTS:
        assert "python tools/regenerate.py" in (ROOT / name).read_text(), name
