from lssfl.proto import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("silo_id", "num_samples", "device", "version")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    num_samples: int
    device: str
    version: str
    def __init__(self, silo_id: _Optional[str] = ..., num_samples: _Optional[int] = ..., device: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("run_id", "heartbeat_interval_s", "current_round")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    heartbeat_interval_s: float
    current_round: int
    def __init__(self, run_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., current_round: _Optional[int] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("silo_id", "run_id")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    run_id: str
    def __init__(self, silo_id: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("kind", "run_id", "round", "seed", "model_json", "trainer_json", "deadline_unix_s", "uplink_codec", "evaluation_json")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        WAIT: _ClassVar[Task.Kind]
        TRAIN: _ClassVar[Task.Kind]
        DONE: _ClassVar[Task.Kind]
        EVALUATE: _ClassVar[Task.Kind]
    WAIT: Task.Kind
    TRAIN: Task.Kind
    DONE: Task.Kind
    EVALUATE: Task.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_JSON_FIELD_NUMBER: _ClassVar[int]
    TRAINER_JSON_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    UPLINK_CODEC_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_JSON_FIELD_NUMBER: _ClassVar[int]
    kind: Task.Kind
    run_id: str
    round: int
    seed: int
    model_json: str
    trainer_json: str
    deadline_unix_s: float
    uplink_codec: str
    evaluation_json: str
    def __init__(self, kind: _Optional[_Union[Task.Kind, str]] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., seed: _Optional[int] = ..., model_json: _Optional[str] = ..., trainer_json: _Optional[str] = ..., deadline_unix_s: _Optional[float] = ..., uplink_codec: _Optional[str] = ..., evaluation_json: _Optional[str] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("silo_id", "run_id", "round", "have_round")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    HAVE_ROUND_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    run_id: str
    round: int
    have_round: int
    def __init__(self, silo_id: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., have_round: _Optional[int] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("silo_id", "run_id", "round", "state")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    run_id: str
    round: int
    state: str
    def __init__(self, silo_id: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("current_round",)
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    current_round: int
    def __init__(self, current_round: _Optional[int] = ...) -> None: ...

class EvaluationReport(_message.Message):
    __slots__ = ("silo_id", "run_id", "round", "evaluation")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    run_id: str
    round: int
    evaluation: _tensor_pb2.Evaluation
    def __init__(self, silo_id: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., evaluation: _Optional[_Union[_tensor_pb2.Evaluation, _Mapping]] = ...) -> None: ...

class EvaluationReply(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...
