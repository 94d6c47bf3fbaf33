from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "codec", "nbytes", "delta")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    codec: str
    nbytes: int
    delta: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., codec: _Optional[str] = ..., nbytes: _Optional[int] = ..., delta: _Optional[bool] = ...) -> None: ...

class StreamEnd(_message.Message):
    __slots__ = ("checksum", "payload_bytes", "num_tensors")
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    checksum: bytes
    payload_bytes: int
    num_tensors: int
    def __init__(self, checksum: _Optional[bytes] = ..., payload_bytes: _Optional[int] = ..., num_tensors: _Optional[int] = ...) -> None: ...

class DownloadHeader(_message.Message):
    __slots__ = ("run_id", "round", "base_round")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_ROUND_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    base_round: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., base_round: _Optional[int] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("loss", "accuracy", "num_samples")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    loss: float
    accuracy: float
    num_samples: int
    def __init__(self, loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., num_samples: _Optional[int] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("run_id", "round", "silo_id", "num_samples", "train_seconds", "metrics", "evaluation")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    silo_id: str
    num_samples: int
    train_seconds: float
    metrics: _containers.ScalarMap[str, float]
    evaluation: Evaluation
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., silo_id: _Optional[str] = ..., num_samples: _Optional[int] = ..., train_seconds: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("download", "upload", "tensor", "data", "end")
    DOWNLOAD_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    download: DownloadHeader
    upload: UploadHeader
    tensor: TensorSpec
    data: bytes
    end: StreamEnd
    def __init__(self, download: _Optional[_Union[DownloadHeader, _Mapping]] = ..., upload: _Optional[_Union[UploadHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorSpec, _Mapping]] = ..., data: _Optional[bytes] = ..., end: _Optional[_Union[StreamEnd, _Mapping]] = ...) -> None: ...
