"""docs/architecture.svg is exactly what docs/architecture.py draws, is valid XML, and names the children the
operator really renders (checked against its golden manifests, not against the script's own list)."""

from __future__ import annotations

import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from borg_operator import names

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docs" / "architecture.py"
SVG = ROOT / "docs" / "architecture.svg"
GOLDEN = ROOT / "tests" / "golden" / "operator"
SVG_NS = "{http://www.w3.org/2000/svg}"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_architecture", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


architecture = _load_script()


def _texts(svg: str) -> list[str]:
    return [element.text or "" for element in ET.fromstring(svg).iter(f"{SVG_NS}text")]


def _golden_children(cr: str) -> set[tuple[str, str]]:
    """(kind, name) of every child in the golden renders of the two examples, renamed to the collective `cr`."""
    found: set[tuple[str, str]] = set()
    for path, golden_cr in [(GOLDEN / "full.yaml", "pong"), (GOLDEN / "minimal.yaml", "pong-minimal")]:
        for manifest in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            name = manifest["metadata"]["name"]
            assert name.startswith(golden_cr), name
            found.add((manifest["kind"], cr + name.removeprefix(golden_cr)))
    return found


def test_committed_svg_is_up_to_date() -> None:
    assert SVG.read_text(encoding="utf-8") == architecture.draw(), (
        "docs/architecture.svg is stale: run `python tools/regenerate.py` and commit it"
    )


def test_drawing_is_deterministic() -> None:
    first = architecture.draw()
    assert architecture.draw() == first
    assert not re.search(r"\d\.\d\d", first), "coordinates are written with at most one decimal"


def test_check_fails_on_a_stale_or_missing_svg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "architecture.svg"
    monkeypatch.setattr(architecture, "SVG_PATH", target)
    assert architecture.main(["--check"]) == 1  # missing
    capsys.readouterr()
    assert architecture.main([]) == 0
    assert target.read_text(encoding="utf-8") == SVG.read_text(encoding="utf-8")
    assert architecture.main(["--check"]) == 0
    target.write_text(target.read_text(encoding="utf-8").replace("pong-agents", "pong-agent"), encoding="utf-8")
    assert architecture.main(["--check"]) == 1
    message = capsys.readouterr().err.strip()
    assert "is stale" in message and len(message.splitlines()) == 1


def test_svg_parses_and_names_every_child() -> None:
    svg = SVG.read_text(encoding="utf-8")
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG_NS}svg"
    assert root.get("viewBox") == f"0 0 {architecture.WIDTH} {architecture.HEIGHT}"
    texts = _texts(svg)
    everything = "\n".join(texts).lower()
    shown = architecture.children()
    assert len(shown) >= 12
    for kind, name in shown:
        assert name in texts, f"{kind} {name} is not in the picture"
        assert kind.lower() in everything, f"the kind {kind} is not in the picture"


def test_children_drawn_are_the_ones_the_operator_renders() -> None:
    cr = architecture.CR
    missing = set(architecture.children(cr)) - _golden_children(cr)
    assert not missing, f"the picture shows children the operator does not render: {sorted(missing)}"
    # The names the script reads from names.py are the operator's own.
    parsed = architecture.child_names(cr)
    for function in (
        "agents",
        "config",
        "memory",
        "redis_secret",
        "kafka",
        "indexer",
        "elasticsearch",
        "kibana",
        "kibana_ingress",
        "kibana_setup",
    ):
        assert parsed[function] == getattr(names, function)(cr)
