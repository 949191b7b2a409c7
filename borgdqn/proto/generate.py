"""Regenerate the committed protobuf code from protos/: ``python -m borgdqn.proto.generate``.

Needs grpcio-tools (the ``dev`` extra), whose bundled protoc fixes the generated code's version: the runtime
``protobuf`` must be at least that version and of the same major (the generated module checks it on import).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
OUT = ROOT / "borgdqn" / "proto"


def proto_files() -> list[Path]:
    return sorted(PROTOS.rglob("*.proto"))


def generate(out: Path = OUT) -> None:
    """Write ``*_pb2.py`` and ``*_pb2.pyi`` for every file under protos/ into ``out`` (package layout kept)."""
    from grpc_tools import protoc  # dev-only dependency: imported here so the runtime never needs it

    out.mkdir(parents=True, exist_ok=True)
    files = [str(p.relative_to(PROTOS)) for p in proto_files()]
    args = ["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--pyi_out={out}", *files]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


if __name__ == "__main__":
    generate()
    sys.exit(0)
