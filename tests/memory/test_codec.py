"""The chunk wire format: exact round trips, and hostile input is refused as BadChunk and nothing else."""

from __future__ import annotations

import contextlib
import tracemalloc

import lz4.block
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from borgdqn.memory.codec import SCHEMA_VERSION, BadChunk, decode_chunk, encode_chunk
from borgdqn.memory.protocol import TrajectoryChunk
from borgdqn.proto.borg.v1 import experience_pb2 as pb

Layout = tuple[tuple[int, ...], np.dtype]
IMAGE: Layout = ((84, 84), np.dtype(np.uint8))
VECTOR: Layout = ((4,), np.dtype(np.float32))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def image_chunk(t: int = 16, seed: int = 0, recurrent: bool = True) -> TrajectoryChunk:
    rng = np.random.default_rng(seed)
    frames = np.full((t, 84, 84), 87, dtype=np.uint8)
    for i in range(t):  # a moving paddle: frames alike but not equal
        frames[i, 20 + i % 50 : 28 + i % 50, 8:10] = 147
    last = np.zeros(t, dtype=bool)
    last[t // 2] = True
    first = np.zeros(t, dtype=bool)
    first[(t // 2 + 1) % t] = True
    terminated = last.copy()
    return TrajectoryChunk(
        stream_id=3 * 1024 + 7,
        agent_id=3,
        frames=frames,
        actions=rng.integers(0, 6, t),
        rewards=rng.choice([-1.0, 0.0, 1.0], t).astype(np.float32),
        first=first,
        last=last,
        terminated=terminated,
        policy_ids=rng.integers(0, 256, t).astype(np.uint8),
        recurrent_state=rng.standard_normal((2, 32)).astype(np.float32) if recurrent else None,
    )


def vector_chunk(t: int = 8) -> TrajectoryChunk:
    rng = np.random.default_rng(1)
    last = np.zeros(t, dtype=bool)
    last[-1] = True
    return TrajectoryChunk(
        stream_id=2**40 + 5,
        agent_id=0,
        frames=rng.standard_normal((t, 4)).astype(np.float32),
        actions=rng.integers(0, 2, t),
        rewards=np.ones(t, dtype=np.float32),
        first=np.eye(1, t, dtype=bool)[0],
        last=last,
        terminated=np.zeros(t, dtype=bool),
    )


def assert_same(a: TrajectoryChunk, b: TrajectoryChunk) -> None:
    assert (a.stream_id, a.agent_id) == (b.stream_id, b.agent_id)
    for name in ("frames", "actions", "rewards", "first", "last", "terminated", "policy_ids", "recurrent_state"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.frames.dtype == b.frames.dtype


@pytest.mark.parametrize("codec", ["lz4", "zstd", "none"])
def test_image_round_trip(codec: str) -> None:
    chunk = image_chunk()
    data = encode_chunk(chunk, episode_id=12, chunk_seq=2**40, policy_id=5, epsilon=0.25, codec=codec)  # type: ignore[arg-type]
    got = decode_chunk(data, *IMAGE)
    assert_same(got.chunk, chunk)
    assert (got.episode_id, got.chunk_seq, got.policy_id, got.epsilon) == (12, 2**40, 5, 0.25)
    assert got.schema_version == SCHEMA_VERSION
    assert got.chunk.actions.dtype == np.int64 and got.chunk.rewards.dtype == np.float32
    if codec != "none":
        assert len(data) < chunk.frames.nbytes / 10  # alike frames compress across the chunk


@pytest.mark.parametrize("codec", ["lz4", "zstd", "none"])
def test_vector_round_trip(codec: str) -> None:
    chunk = vector_chunk()
    got = decode_chunk(encode_chunk(chunk, codec=codec), *VECTOR)  # type: ignore[arg-type]
    assert_same(got.chunk, chunk)
    assert got.chunk.policy_ids is None and got.chunk.recurrent_state is None
    assert (got.episode_id, got.chunk_seq, got.policy_id, got.epsilon) == (0, 0, 0, 0.0)


def test_encode_refuses_what_no_reader_accepts() -> None:
    chunk = image_chunk()
    chunk.terminated[0] = True  # not last
    with pytest.raises(ValueError, match="terminated"):
        encode_chunk(chunk)
    chunk = image_chunk()
    chunk.actions[0] = 2**40
    with pytest.raises(ValueError, match="int32"):
        encode_chunk(chunk)
    with pytest.raises(ValueError, match="codec"):
        encode_chunk(image_chunk(), codec="brotli")  # type: ignore[arg-type]


def _message(fields: dict[str, object], chunk: TrajectoryChunk | None = None) -> bytes:
    msg = pb.TrajectoryChunk.FromString(encode_chunk(chunk or image_chunk()))
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg.SerializeToString()


def test_newer_schema_refused() -> None:
    with pytest.raises(BadChunk, match="schema 2 is newer than this reader's 1"):
        decode_chunk(_message({"schema_version": 2}), *IMAGE)


def test_wrong_frame_shape_or_dtype_refused() -> None:
    data = encode_chunk(image_chunk())
    with pytest.raises(BadChunk, match="frame shape"):
        decode_chunk(data, (84, 85), np.dtype(np.uint8))
    with pytest.raises(BadChunk, match="frame dtype"):
        decode_chunk(data, (84, 84), np.dtype(np.float32))
    with pytest.raises(BadChunk, match="frame shape"):
        decode_chunk(encode_chunk(vector_chunk()), *IMAGE)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"schema_version": 0}, "schema_version missing"),
        ({"steps": 17}, "raw_frames_size|bytes"),
        ({"steps": 0}, "steps"),
        ({"raw_frames_size": 7056}, "raw_frames_size"),
        ({"codec": 9}, "unknown codec"),
        ({"codec": pb.CODEC_UNSPECIFIED}, "unknown codec"),
        ({"frame_dtype": 7}, "dtype"),
        ({"actions": b"\0" * 60}, "actions"),
        ({"rewards": np.full(16, np.nan, dtype="<f4").tobytes()}, "non-finite reward"),
        ({"flags": b"\x08" * 16}, "flag bits"),
        ({"flags": b"\x04" * 16}, "terminated"),
        ({"policy_ids": b"\0" * 3}, "policy_ids"),
        ({"recurrent_hidden": 31}, "recurrent_state"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"frames": b"\0" * 100}, "lz4"),
    ],
)
def test_inconsistent_fields_refused(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(BadChunk, match=reason):
        decode_chunk(_message(fields), *IMAGE)


def test_non_finite_vector_frame_refused() -> None:
    chunk = vector_chunk()
    chunk.frames[2, 1] = np.inf
    msg = pb.TrajectoryChunk.FromString(encode_chunk(vector_chunk(), codec="none"))
    msg.frames = chunk.frames.astype("<f4").tobytes()
    with pytest.raises(BadChunk, match="non-finite frame"):
        decode_chunk(msg.SerializeToString(), *VECTOR)


@pytest.mark.parametrize("codec", ["zstd", "zstd-no-size", "lz4"])
def test_decompression_bomb_refused_without_inflating(codec: str) -> None:
    """One step claims one 84x84 frame (7056 bytes) but carries 64 MiB of zeros, compressed to a few KiB."""
    bomb = bytes(64 << 20)
    if codec == "lz4":
        packed, enum = lz4.block.compress(bomb, store_size=False), pb.CODEC_LZ4
    else:
        packed = zstandard.ZstdCompressor(level=1, write_content_size=codec == "zstd").compress(bomb)
        enum = pb.CODEC_ZSTD
    del bomb
    assert len(packed) < 1 << 20
    data = _message({"frames": packed, "codec": enum}, image_chunk(t=1, recurrent=False))
    tracemalloc.start()
    try:
        with pytest.raises(BadChunk):
            decode_chunk(data, *IMAGE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"decoding a bomb allocated {peak} bytes"


def test_non_bytes_refused() -> None:
    with pytest.raises(BadChunk):
        decode_chunk("not bytes", *IMAGE)  # type: ignore[arg-type]


@FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(BadChunk):
        decode_chunk(data, *IMAGE)


_VALID: dict[str, tuple[bytes, Layout]] = {
    "image-lz4": (encode_chunk(image_chunk(t=4), codec="lz4"), IMAGE),
    "image-zstd": (encode_chunk(image_chunk(t=4), codec="zstd"), IMAGE),
    "vector-none": (encode_chunk(vector_chunk(t=4), codec="none"), VECTOR),
}

_OPS = st.sampled_from(["flip", "set", "cut", "insert", "delete"])
_EDIT = st.tuples(_OPS, st.integers(0, 10**6), st.binary(min_size=1, max_size=8))


@FUZZ
@given(st.sampled_from(sorted(_VALID)), st.lists(_EDIT, min_size=1, max_size=4))
def test_fuzz_mutated_chunks(which: str, edits: list[tuple[str, int, bytes]]) -> None:
    data, (shape, dtype) = _VALID[which]
    buf = bytearray(data)
    for op, pos, blob in edits:
        i = pos % (len(buf) + 1)
        if op == "flip" and i < len(buf):
            buf[i] ^= 1 << (blob[0] % 8)
        elif op == "set" and i < len(buf):
            buf[i] = blob[0]
        elif op == "cut":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = blob
        elif op == "delete":
            del buf[i : i + len(blob)]
    try:
        got = decode_chunk(bytes(buf), shape, dtype)
    except BadChunk as exc:
        assert "\n" not in str(exc)
        return
    got.chunk.validate(shape, dtype)
