"""The memory package stands on its own: the agents, the monitor and the operator import it, never the reverse.
It may use the generated wire format (``borgdqn.proto``), which imports nothing of ours."""

from __future__ import annotations

import ast
from pathlib import Path

import borgdqn.memory

MEMORY = Path(borgdqn.memory.__file__).parent
BELOW = ("borgdqn.memory", "borgdqn.proto")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_memory_imports_nothing_of_borgdqn_outside_it() -> None:
    modules = sorted(MEMORY.rglob("*.py"))
    assert len(modules) > 10  # the walk found the package (shared/ and redis/ included)
    outside = {
        f"{path.relative_to(MEMORY)}: {name}"
        for path in modules
        for name in imported_modules(path)
        if name.split(".")[0] == "borgdqn" and not name.startswith(BELOW)
    }
    assert not outside, sorted(outside)
