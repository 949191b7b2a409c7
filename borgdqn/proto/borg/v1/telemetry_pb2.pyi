from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventHeader(_message.Message):
    __slots__ = ("schema_version", "collective", "source_id", "seq", "time_unix")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    collective: str
    source_id: str
    seq: int
    time_unix: float
    def __init__(self, schema_version: _Optional[int] = ..., collective: _Optional[str] = ..., source_id: _Optional[str] = ..., seq: _Optional[int] = ..., time_unix: _Optional[float] = ...) -> None: ...

class EpisodeEvent(_message.Message):
    __slots__ = ("agent", "policy", "episode_return", "length", "env_steps", "episode", "epsilon", "wall_seconds")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    EPISODE_RETURN_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    ENV_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    agent: int
    policy: str
    episode_return: float
    length: int
    env_steps: int
    episode: int
    epsilon: float
    wall_seconds: float
    def __init__(self, agent: _Optional[int] = ..., policy: _Optional[str] = ..., episode_return: _Optional[float] = ..., length: _Optional[int] = ..., env_steps: _Optional[int] = ..., episode: _Optional[int] = ..., epsilon: _Optional[float] = ..., wall_seconds: _Optional[float] = ...) -> None: ...

class TrainingReport(_message.Message):
    __slots__ = ("agent", "env_steps", "updates", "loss", "mean_q", "learning_rate", "updates_per_s", "env_steps_per_s", "replay_sample_age", "epsilon", "mean_return", "best_mean_return", "wall_seconds")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    ENV_STEPS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    MEAN_Q_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    UPDATES_PER_S_FIELD_NUMBER: _ClassVar[int]
    ENV_STEPS_PER_S_FIELD_NUMBER: _ClassVar[int]
    REPLAY_SAMPLE_AGE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    MEAN_RETURN_FIELD_NUMBER: _ClassVar[int]
    BEST_MEAN_RETURN_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    agent: int
    env_steps: int
    updates: int
    loss: float
    mean_q: float
    learning_rate: float
    updates_per_s: float
    env_steps_per_s: float
    replay_sample_age: float
    epsilon: float
    mean_return: float
    best_mean_return: float
    wall_seconds: float
    def __init__(self, agent: _Optional[int] = ..., env_steps: _Optional[int] = ..., updates: _Optional[int] = ..., loss: _Optional[float] = ..., mean_q: _Optional[float] = ..., learning_rate: _Optional[float] = ..., updates_per_s: _Optional[float] = ..., env_steps_per_s: _Optional[float] = ..., replay_sample_age: _Optional[float] = ..., epsilon: _Optional[float] = ..., mean_return: _Optional[float] = ..., best_mean_return: _Optional[float] = ..., wall_seconds: _Optional[float] = ...) -> None: ...

class MemoryReport(_message.Message):
    __slots__ = ("size", "capacity", "inserted", "sampled", "rejected", "insert_rate", "sample_rate", "bytes_used", "per_agent_steps", "wall_seconds", "dropped_chunks", "skipped_chunks", "outage_seconds", "replication_lag_p99_ms", "write_errors")
    class PerAgentStepsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    INSERTED_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    INSERT_RATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    PER_AGENT_STEPS_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    OUTAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_LAG_P99_MS_FIELD_NUMBER: _ClassVar[int]
    WRITE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    size: int
    capacity: int
    inserted: int
    sampled: int
    rejected: int
    insert_rate: float
    sample_rate: float
    bytes_used: int
    per_agent_steps: _containers.ScalarMap[int, int]
    wall_seconds: float
    dropped_chunks: int
    skipped_chunks: int
    outage_seconds: float
    replication_lag_p99_ms: float
    write_errors: int
    def __init__(self, size: _Optional[int] = ..., capacity: _Optional[int] = ..., inserted: _Optional[int] = ..., sampled: _Optional[int] = ..., rejected: _Optional[int] = ..., insert_rate: _Optional[float] = ..., sample_rate: _Optional[float] = ..., bytes_used: _Optional[int] = ..., per_agent_steps: _Optional[_Mapping[int, int]] = ..., wall_seconds: _Optional[float] = ..., dropped_chunks: _Optional[int] = ..., skipped_chunks: _Optional[int] = ..., outage_seconds: _Optional[float] = ..., replication_lag_p99_ms: _Optional[float] = ..., write_errors: _Optional[int] = ...) -> None: ...

class DropReport(_message.Message):
    __slots__ = ("dropped_events", "first_dropped_seq", "last_dropped_seq")
    DROPPED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    FIRST_DROPPED_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_DROPPED_SEQ_FIELD_NUMBER: _ClassVar[int]
    dropped_events: int
    first_dropped_seq: int
    last_dropped_seq: int
    def __init__(self, dropped_events: _Optional[int] = ..., first_dropped_seq: _Optional[int] = ..., last_dropped_seq: _Optional[int] = ...) -> None: ...

class AssimilationEvent(_message.Message):
    __slots__ = ("agent", "donor", "env_steps", "mean_return", "donor_mean_return", "donor_env_steps", "learning_rate", "epsilon_floor", "wall_seconds")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    DONOR_FIELD_NUMBER: _ClassVar[int]
    ENV_STEPS_FIELD_NUMBER: _ClassVar[int]
    MEAN_RETURN_FIELD_NUMBER: _ClassVar[int]
    DONOR_MEAN_RETURN_FIELD_NUMBER: _ClassVar[int]
    DONOR_ENV_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FLOOR_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    agent: int
    donor: int
    env_steps: int
    mean_return: float
    donor_mean_return: float
    donor_env_steps: int
    learning_rate: float
    epsilon_floor: float
    wall_seconds: float
    def __init__(self, agent: _Optional[int] = ..., donor: _Optional[int] = ..., env_steps: _Optional[int] = ..., mean_return: _Optional[float] = ..., donor_mean_return: _Optional[float] = ..., donor_env_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., epsilon_floor: _Optional[float] = ..., wall_seconds: _Optional[float] = ...) -> None: ...

class TelemetryEvent(_message.Message):
    __slots__ = ("header", "episode", "training", "memory", "drops", "assimilation")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    DROPS_FIELD_NUMBER: _ClassVar[int]
    ASSIMILATION_FIELD_NUMBER: _ClassVar[int]
    header: EventHeader
    episode: EpisodeEvent
    training: TrainingReport
    memory: MemoryReport
    drops: DropReport
    assimilation: AssimilationEvent
    def __init__(self, header: _Optional[_Union[EventHeader, _Mapping]] = ..., episode: _Optional[_Union[EpisodeEvent, _Mapping]] = ..., training: _Optional[_Union[TrainingReport, _Mapping]] = ..., memory: _Optional[_Union[MemoryReport, _Mapping]] = ..., drops: _Optional[_Union[DropReport, _Mapping]] = ..., assimilation: _Optional[_Union[AssimilationEvent, _Mapping]] = ...) -> None: ...
