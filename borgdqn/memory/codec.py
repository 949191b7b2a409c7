"""Wire format of trajectory chunks: ``borg.v1.TrajectoryChunk`` (protos/borg/v1/experience.proto) <-> numpy.

Per-step arrays travel as little-endian ``bytes`` (one ``tobytes()`` / ``np.frombuffer()`` each, far faster than
protobuf's ``repeated`` fields in Python); the chunk's T frames are compressed as one buffer, so consecutive frames
that look alike cost little.

Codec choice, measured with ``benchmarks/codec_throughput.py`` on one core (64-step chunks of 84x84 uint8 frames):

    frames    codec   encode MB/s  decode MB/s  ratio  B/step
    pong-ale  zstd-1         3500         9800    166      43
    pong-ale  lz4            6700        14100     74      95
    noise     zstd-1         5000        33000      1    7056
    noise     lz4            7900        14900      1    7084

    whole encode_chunk (protobuf + numpy + codec), 64 Pong steps:  lz4 ~300-350k steps/s, zstd-1 ~210k steps/s

Writers use **LZ4** (block format): it encodes ~1.7x and decodes ~1.4x as fast as zstd level 1 (level 3 is no
smaller on these frames and slower on noise).
Both leave a stored step far below one compressed frame (Pong frames are mostly flat background, and a chunk
compresses across its frames), so zstd's better ratio saves tens of bytes per step, which is little beside Redis'
per-entry overhead, while CPU is what limits a 2-core memory that must take >= 60k steps/s. Readers accept NONE,
LZ4 and ZSTD, so the choice can change without a schema bump. Vector observations (float32) use the same path.

Decoding treats its input as hostile: any bad message raises :class:`BadChunk` (a ``ValueError``) with a one-line
reason, and nothing is inflated beyond the size that the caller's frame shape implies.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Literal

import lz4.block
import numpy as np
import zstandard

from borgdqn.memory.protocol import TrajectoryChunk
from borgdqn.proto.borg.v1 import experience_pb2 as pb

SCHEMA_VERSION = 1
# Bounds that keep a hostile message cheap to refuse; far above any real chunk (64 Atari steps are 450 KiB raw).
MAX_STEPS = 1 << 16
MAX_RAW_FRAMES_BYTES = 256 << 20
MAX_MESSAGE_BYTES = 2 * MAX_RAW_FRAMES_BYTES
MAX_RECURRENT_HIDDEN = 1 << 16

CodecName = Literal["lz4", "zstd", "none"]
DEFAULT_CODEC: CodecName = "lz4"
ZSTD_LEVEL = 1

_FLAG_FIRST, _FLAG_LAST, _FLAG_TERMINATED = 1, 2, 4
_CODECS: dict[str, pb.Codec] = {"none": pb.CODEC_NONE, "lz4": pb.CODEC_LZ4, "zstd": pb.CODEC_ZSTD}
_DTYPES: dict[pb.FrameDtype, np.dtype] = {
    pb.FRAME_DTYPE_UINT8: np.dtype(np.uint8),
    pb.FRAME_DTYPE_FLOAT32: np.dtype(np.float32),
}
_DTYPE_ENUMS = {dtype: enum for enum, dtype in _DTYPES.items()}
_INT32 = np.iinfo(np.int32)

# zstandard's (de)compressor objects must not be shared by threads running at once.
_local = threading.local()


class BadChunk(ValueError):
    """An encoded chunk that must not enter the memory; the message is a one-line reason."""


@dataclass
class DecodedChunk:
    """A decoded chunk and the message's metadata that ``TrajectoryChunk`` has no field for."""

    chunk: TrajectoryChunk
    episode_id: int
    chunk_seq: int
    policy_id: int
    epsilon: float
    schema_version: int
    context_steps: int = 0
    lookahead_steps: int = 0


def _zstd_compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "zc", None)
    if c is None:
        c = _local.zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return c


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def encode_chunk(
    chunk: TrajectoryChunk,
    *,
    episode_id: int = 0,
    chunk_seq: int = 0,
    policy_id: int = 0,
    epsilon: float = 0.0,
    codec: CodecName = DEFAULT_CODEC,
    context_steps: int = 0,
    lookahead_steps: int = 0,
) -> bytes:
    """Serialize ``chunk`` as a ``borg.v1.TrajectoryChunk``; raises ValueError for a chunk no reader would accept."""
    frames = chunk.frames
    dtype_enum = _DTYPE_ENUMS.get(frames.dtype)
    if dtype_enum is None:
        raise ValueError(f"frame dtype {frames.dtype} is not uint8 or float32")
    if codec not in _CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(_CODECS)}")
    # Fail at the writer, where the bug is, rather than as a rejected chunk in the memory.
    chunk.validate(tuple(frames.shape[1:]), frames.dtype)
    t = len(chunk)
    if t > MAX_STEPS:
        raise ValueError(f"chunk has {t} steps, more than {MAX_STEPS}")
    if context_steps < 0 or lookahead_steps < 0 or context_steps + lookahead_steps >= t:
        raise ValueError(f"context {context_steps} + lookahead {lookahead_steps} steps leave no own step of {t}")
    actions = np.asarray(chunk.actions)
    if actions.size and (actions.min() < _INT32.min or actions.max() > _INT32.max):
        raise ValueError("actions do not fit int32")
    raw = np.ascontiguousarray(frames, dtype=frames.dtype.newbyteorder("<")).tobytes()
    if len(raw) > MAX_RAW_FRAMES_BYTES:
        raise ValueError(f"frames are {len(raw)} bytes raw, more than {MAX_RAW_FRAMES_BYTES}")
    if codec == "lz4":
        packed = lz4.block.compress(raw, store_size=False)
    elif codec == "zstd":
        packed = _zstd_compressor().compress(raw)
    else:
        packed = raw
    flags = (
        chunk.first.astype(np.uint8) * _FLAG_FIRST
        | chunk.last.astype(np.uint8) * _FLAG_LAST
        | chunk.terminated.astype(np.uint8) * _FLAG_TERMINATED
    )
    policy_ids = b""
    if chunk.policy_ids is not None:
        ids = np.asarray(chunk.policy_ids)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError("policy_ids do not fit uint8")
        policy_ids = ids.astype(np.uint8).tobytes()
    state, hidden = b"", 0
    if chunk.recurrent_state is not None:
        rs = np.asarray(chunk.recurrent_state)
        if rs.ndim != 2 or rs.shape[0] != 2 or not 0 < rs.shape[1] <= MAX_RECURRENT_HIDDEN:
            raise ValueError(f"recurrent_state has shape {rs.shape}, expected (2, hidden)")
        state, hidden = rs.astype("<f4").tobytes(), int(rs.shape[1])
    msg = pb.TrajectoryChunk(
        schema_version=SCHEMA_VERSION,
        stream_id=chunk.stream_id,
        agent_id=chunk.agent_id,
        episode_id=episode_id,
        chunk_seq=chunk_seq,
        policy_id=policy_id,
        epsilon=epsilon,
        policy_ids=policy_ids,
        frame_shape=frames.shape[1:],
        frame_dtype=dtype_enum,
        steps=t,
        frames=packed,
        codec=_CODECS[codec],
        raw_frames_size=len(raw),
        actions=actions.astype("<i4").tobytes(),
        rewards=np.asarray(chunk.rewards).astype("<f4").tobytes(),
        flags=flags.tobytes(),
        recurrent_state=state,
        recurrent_hidden=hidden,
        context_steps=context_steps,
        lookahead_steps=lookahead_steps,
    )
    return msg.SerializeToString()


def decode_chunk(data: bytes, frame_shape: tuple[int, ...], dtype: np.dtype) -> DecodedChunk:
    """Parse and check an encoded chunk for a memory of ``frame_shape`` frames of ``dtype``.

    Raises :class:`BadChunk` for any bad input and nothing else (a caller's unsupported ``dtype`` is a BadChunk
    too: no message can match it). ``chunk.frames`` is a read-only view of the inflated buffer; the per-step
    arrays are fresh (actions int64 as the adder writes them).
    """
    try:
        return _decode(data, tuple(int(d) for d in frame_shape), np.dtype(dtype))
    except BadChunk:
        raise
    except Exception as exc:  # hostile bytes can trip any layer (protobuf, lz4, zstd, numpy): all mean "bad"
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise BadChunk(f"undecodable chunk ({reason[:200]})") from exc


def _decode(data: bytes, frame_shape: tuple[int, ...], dtype: np.dtype) -> DecodedChunk:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadChunk(f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise BadChunk(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    msg = pb.TrajectoryChunk()
    try:
        msg.ParseFromString(bytes(data))
    except Exception as exc:  # google.protobuf.message.DecodeError and friends, whatever the backend
        raise BadChunk(f"not a borg.v1.TrajectoryChunk: {' '.join(str(exc).split())[:200]}") from exc

    version = msg.schema_version
    if version == 0:
        raise BadChunk("schema_version missing")
    if version > SCHEMA_VERSION:
        raise BadChunk(f"schema {version} is newer than this reader's {SCHEMA_VERSION}")
    t = msg.steps
    if not 0 < t <= MAX_STEPS:
        raise BadChunk(f"steps {t} outside 1..{MAX_STEPS}")
    shape = tuple(msg.frame_shape)
    if shape != frame_shape:
        raise BadChunk(f"frame shape {shape} != memory's {frame_shape}")
    got_dtype = _DTYPES.get(msg.frame_dtype)
    if got_dtype is None:
        raise BadChunk(f"unknown frame dtype enum {msg.frame_dtype}")
    if got_dtype != dtype:
        raise BadChunk(f"frame dtype {got_dtype} != memory's {dtype}")
    raw_size = t * math.prod(shape) * dtype.itemsize
    if raw_size > MAX_RAW_FRAMES_BYTES:
        raise BadChunk(f"frames would inflate to {raw_size} bytes, more than {MAX_RAW_FRAMES_BYTES}")
    if msg.raw_frames_size != raw_size:
        raise BadChunk(f"raw_frames_size {msg.raw_frames_size} != steps x frame size {raw_size}")
    for name, per_step in (("actions", 4), ("rewards", 4), ("flags", 1)):
        n = len(getattr(msg, name))
        if n != t * per_step:
            raise BadChunk(f"{name} has {n} bytes, expected {t * per_step} for {t} steps")
    if len(msg.policy_ids) not in (0, t):
        raise BadChunk(f"policy_ids has {len(msg.policy_ids)} bytes, expected 0 or {t}")
    hidden = msg.recurrent_hidden
    if hidden > MAX_RECURRENT_HIDDEN:
        raise BadChunk(f"recurrent_hidden {hidden} exceeds {MAX_RECURRENT_HIDDEN}")
    if len(msg.recurrent_state) != 8 * hidden:
        raise BadChunk(f"recurrent_state has {len(msg.recurrent_state)} bytes, expected {8 * hidden}")
    if not 0.0 <= msg.epsilon <= 1.0:
        raise BadChunk(f"epsilon {msg.epsilon} outside [0, 1]")
    if msg.context_steps + msg.lookahead_steps >= t:
        raise BadChunk(f"context {msg.context_steps} + lookahead {msg.lookahead_steps} steps leave no own step of {t}")

    raw = _inflate(msg.codec, msg.frames, raw_size)
    frames = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(t, *shape)
    if dtype.kind == "f" and not np.all(np.isfinite(frames)):
        raise BadChunk("non-finite frame value")
    flags = np.frombuffer(msg.flags, dtype=np.uint8)
    if np.any(flags & ~np.uint8(_FLAG_FIRST | _FLAG_LAST | _FLAG_TERMINATED)):
        raise BadChunk("unknown flag bits set")
    state = None
    if hidden:
        state = np.frombuffer(msg.recurrent_state, dtype="<f4").astype(np.float32).reshape(2, hidden)
        if not np.all(np.isfinite(state)):
            raise BadChunk("non-finite recurrent state")
    chunk = TrajectoryChunk(
        stream_id=msg.stream_id,
        agent_id=msg.agent_id,
        frames=frames,
        actions=np.frombuffer(msg.actions, dtype="<i4").astype(np.int64),
        rewards=np.frombuffer(msg.rewards, dtype="<f4").astype(np.float32),
        first=(flags & _FLAG_FIRST) != 0,
        last=(flags & _FLAG_LAST) != 0,
        terminated=(flags & _FLAG_TERMINATED) != 0,
        policy_ids=np.frombuffer(msg.policy_ids, dtype=np.uint8).copy() if msg.policy_ids else None,
        recurrent_state=state,
    )
    try:
        chunk.validate(frame_shape, dtype)
    except ValueError as exc:
        raise BadChunk(str(exc)) from exc
    return DecodedChunk(
        chunk=chunk,
        episode_id=msg.episode_id,
        chunk_seq=msg.chunk_seq,
        policy_id=msg.policy_id,
        epsilon=float(msg.epsilon),
        schema_version=version,
        context_steps=msg.context_steps,
        lookahead_steps=msg.lookahead_steps,
    )


def _inflate(codec: pb.Codec, packed: bytes, raw_size: int) -> bytes:
    """Decompress to exactly ``raw_size`` bytes, never allocating more than that (a bomb fails, not inflates)."""
    if codec == pb.CODEC_NONE:
        raw = packed
    elif codec == pb.CODEC_LZ4:
        try:
            # The output buffer is raw_size bytes and LZ4's safe decoder stops (and fails) at its end.
            raw = lz4.block.decompress(packed, uncompressed_size=raw_size)
        except Exception as exc:
            raise BadChunk(f"lz4 frames do not inflate to {raw_size} bytes") from exc
    elif codec == pb.CODEC_ZSTD:
        try:
            # decompress() would allocate whatever the frame header claims, so check the claim first.
            declared = zstandard.frame_content_size(packed)
            if declared != raw_size:
                raise BadChunk(f"zstd frame declares {declared} bytes, expected {raw_size}")
            raw = _zstd_decompressor().decompress(packed, max_output_size=raw_size)
        except BadChunk:
            raise
        except Exception as exc:
            raise BadChunk(f"zstd frames do not inflate to {raw_size} bytes") from exc
    else:
        raise BadChunk(f"unknown codec enum {codec}")
    if len(raw) != raw_size:
        raise BadChunk(f"frames inflate to {len(raw)} bytes, expected {raw_size}")
    return raw
