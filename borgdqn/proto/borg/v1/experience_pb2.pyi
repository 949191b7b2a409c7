from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FrameDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRAME_DTYPE_UNSPECIFIED: _ClassVar[FrameDtype]
    FRAME_DTYPE_UINT8: _ClassVar[FrameDtype]
    FRAME_DTYPE_FLOAT32: _ClassVar[FrameDtype]

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    CODEC_NONE: _ClassVar[Codec]
    CODEC_ZSTD: _ClassVar[Codec]
    CODEC_LZ4: _ClassVar[Codec]
FRAME_DTYPE_UNSPECIFIED: FrameDtype
FRAME_DTYPE_UINT8: FrameDtype
FRAME_DTYPE_FLOAT32: FrameDtype
CODEC_UNSPECIFIED: Codec
CODEC_NONE: Codec
CODEC_ZSTD: Codec
CODEC_LZ4: Codec

class TrajectoryChunk(_message.Message):
    __slots__ = ("schema_version", "stream_id", "agent_id", "episode_id", "chunk_seq", "policy_id", "epsilon", "policy_ids", "frame_shape", "frame_dtype", "steps", "frames", "codec", "raw_frames_size", "actions", "rewards", "flags", "recurrent_state", "recurrent_hidden", "context_steps", "lookahead_steps")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SEQ_FIELD_NUMBER: _ClassVar[int]
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    POLICY_IDS_FIELD_NUMBER: _ClassVar[int]
    FRAME_SHAPE_FIELD_NUMBER: _ClassVar[int]
    FRAME_DTYPE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    RAW_FRAMES_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    RECURRENT_STATE_FIELD_NUMBER: _ClassVar[int]
    RECURRENT_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_STEPS_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    stream_id: int
    agent_id: int
    episode_id: int
    chunk_seq: int
    policy_id: int
    epsilon: float
    policy_ids: bytes
    frame_shape: _containers.RepeatedScalarFieldContainer[int]
    frame_dtype: FrameDtype
    steps: int
    frames: bytes
    codec: Codec
    raw_frames_size: int
    actions: bytes
    rewards: bytes
    flags: bytes
    recurrent_state: bytes
    recurrent_hidden: int
    context_steps: int
    lookahead_steps: int
    def __init__(self, schema_version: _Optional[int] = ..., stream_id: _Optional[int] = ..., agent_id: _Optional[int] = ..., episode_id: _Optional[int] = ..., chunk_seq: _Optional[int] = ..., policy_id: _Optional[int] = ..., epsilon: _Optional[float] = ..., policy_ids: _Optional[bytes] = ..., frame_shape: _Optional[_Iterable[int]] = ..., frame_dtype: _Optional[_Union[FrameDtype, str]] = ..., steps: _Optional[int] = ..., frames: _Optional[bytes] = ..., codec: _Optional[_Union[Codec, str]] = ..., raw_frames_size: _Optional[int] = ..., actions: _Optional[bytes] = ..., rewards: _Optional[bytes] = ..., flags: _Optional[bytes] = ..., recurrent_state: _Optional[bytes] = ..., recurrent_hidden: _Optional[int] = ..., context_steps: _Optional[int] = ..., lookahead_steps: _Optional[int] = ...) -> None: ...
