"""The committed protobuf code is what protos/ generates (so a .proto edit cannot ship without its code)."""

from __future__ import annotations

from pathlib import Path

from borgdqn.proto import generate


def test_generated_code_is_current(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2.py*"))
    assert fresh, "protoc generated nothing"
    stale = [
        str(rel)
        for rel in fresh
        if not (generate.OUT / rel).is_file() or (generate.OUT / rel).read_bytes() != (tmp_path / rel).read_bytes()
    ]
    committed = sorted(p.relative_to(generate.OUT) for p in generate.OUT.rglob("*_pb2.py*"))
    orphans = [str(rel) for rel in committed if rel not in fresh]
    assert not stale and not orphans, (
        f"generated protobuf code is stale ({', '.join(stale + orphans)}): run python tools/regenerate.py"
    )


def test_generated_code_imports() -> None:
    from borgdqn.proto.borg.v1 import experience_pb2

    msg = experience_pb2.TrajectoryChunk(schema_version=1, steps=3)
    assert experience_pb2.TrajectoryChunk.FromString(msg.SerializeToString()).steps == 3
