from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class IndexConfig(_message.Message):
    __slots__ = ("dim", "num_codewords", "quantizer", "last_stage", "metric", "unigram_alpha")
    DIM_FIELD_NUMBER: _ClassVar[int]
    NUM_CODEWORDS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZER_FIELD_NUMBER: _ClassVar[int]
    LAST_STAGE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    UNIGRAM_ALPHA_FIELD_NUMBER: _ClassVar[int]
    dim: int
    num_codewords: int
    quantizer: str
    last_stage: str
    metric: str
    unigram_alpha: float
    def __init__(self, dim: _Optional[int] = ..., num_codewords: _Optional[int] = ..., quantizer: _Optional[str] = ..., last_stage: _Optional[str] = ..., metric: _Optional[str] = ..., unigram_alpha: _Optional[float] = ...) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("name", "config", "num_classes", "version", "status", "quantization_error", "fit_quantization_error", "device", "error", "codebook_fit", "quality", "last_refit")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_ERROR_FIELD_NUMBER: _ClassVar[int]
    FIT_QUANTIZATION_ERROR_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CODEBOOK_FIT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    LAST_REFIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    config: IndexConfig
    num_classes: int
    version: int
    status: str
    quantization_error: float
    fit_quantization_error: float
    device: str
    error: str
    codebook_fit: str
    quality: ProposalQuality
    last_refit: RefitReport
    def __init__(self, name: _Optional[str] = ..., config: _Optional[_Union[IndexConfig, _Mapping]] = ..., num_classes: _Optional[int] = ..., version: _Optional[int] = ..., status: _Optional[str] = ..., quantization_error: _Optional[float] = ..., fit_quantization_error: _Optional[float] = ..., device: _Optional[str] = ..., error: _Optional[str] = ..., codebook_fit: _Optional[str] = ..., quality: _Optional[_Union[ProposalQuality, _Mapping]] = ..., last_refit: _Optional[_Union[RefitReport, _Mapping]] = ...) -> None: ...

class ProposalQuality(_message.Message):
    __slots__ = ("version", "measured_at", "num_queries", "kl", "kl_at_fit", "effective_sample_fraction", "empty_cell_fraction", "largest_cell_fraction", "quantization_error_ratio", "codeword_drift")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MEASURED_AT_FIELD_NUMBER: _ClassVar[int]
    NUM_QUERIES_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    KL_AT_FIT_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_SAMPLE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    EMPTY_CELL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    LARGEST_CELL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_ERROR_RATIO_FIELD_NUMBER: _ClassVar[int]
    CODEWORD_DRIFT_FIELD_NUMBER: _ClassVar[int]
    version: int
    measured_at: float
    num_queries: int
    kl: float
    kl_at_fit: float
    effective_sample_fraction: float
    empty_cell_fraction: float
    largest_cell_fraction: float
    quantization_error_ratio: float
    codeword_drift: float
    def __init__(self, version: _Optional[int] = ..., measured_at: _Optional[float] = ..., num_queries: _Optional[int] = ..., kl: _Optional[float] = ..., kl_at_fit: _Optional[float] = ..., effective_sample_fraction: _Optional[float] = ..., empty_cell_fraction: _Optional[float] = ..., largest_cell_fraction: _Optional[float] = ..., quantization_error_ratio: _Optional[float] = ..., codeword_drift: _Optional[float] = ...) -> None: ...

class RefitReport(_message.Message):
    __slots__ = ("mode", "trigger", "accepted", "version", "seconds", "heldout_kl_before", "heldout_kl_after", "num_queries", "finished_at")
    MODE_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_KL_BEFORE_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_KL_AFTER_FIELD_NUMBER: _ClassVar[int]
    NUM_QUERIES_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    mode: str
    trigger: str
    accepted: bool
    version: int
    seconds: float
    heldout_kl_before: float
    heldout_kl_after: float
    num_queries: int
    finished_at: float
    def __init__(self, mode: _Optional[str] = ..., trigger: _Optional[str] = ..., accepted: _Optional[bool] = ..., version: _Optional[int] = ..., seconds: _Optional[float] = ..., heldout_kl_before: _Optional[float] = ..., heldout_kl_after: _Optional[float] = ..., num_queries: _Optional[int] = ..., finished_at: _Optional[float] = ...) -> None: ...

class CreateIndexRequest(_message.Message):
    __slots__ = ("name", "config")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    name: str
    config: IndexConfig
    def __init__(self, name: _Optional[str] = ..., config: _Optional[_Union[IndexConfig, _Mapping]] = ...) -> None: ...

class GetIndexRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListIndexesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListIndexesResponse(_message.Message):
    __slots__ = ("indexes",)
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    indexes: _containers.RepeatedCompositeFieldContainer[IndexInfo]
    def __init__(self, indexes: _Optional[_Iterable[_Union[IndexInfo, _Mapping]]] = ...) -> None: ...

class DeleteIndexRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteIndexResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UploadEmbeddingsRequest(_message.Message):
    __slots__ = ("name", "num_rows", "embeddings", "weights", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_rows: int
    embeddings: Tensor
    weights: Tensor
    sha256: bytes
    def __init__(self, name: _Optional[str] = ..., num_rows: _Optional[int] = ..., embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class UploadEmbeddingsResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class UpdateEmbeddingsRequest(_message.Message):
    __slots__ = ("name", "ids", "embeddings", "weights")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    ids: Tensor
    embeddings: Tensor
    weights: Tensor
    def __init__(self, name: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class UpdateEmbeddingsResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("name", "queries", "num_samples", "positives", "exclude_positives", "sampler", "seed", "min_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    POSITIVES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_POSITIVES_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    queries: Tensor
    num_samples: int
    positives: Tensor
    exclude_positives: bool
    sampler: str
    seed: int
    min_version: int
    def __init__(self, name: _Optional[str] = ..., queries: _Optional[_Union[Tensor, _Mapping]] = ..., num_samples: _Optional[int] = ..., positives: _Optional[_Union[Tensor, _Mapping]] = ..., exclude_positives: _Optional[bool] = ..., sampler: _Optional[str] = ..., seed: _Optional[int] = ..., min_version: _Optional[int] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("ids", "log_q", "positive_log_q", "version")
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOG_Q_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_LOG_Q_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    log_q: Tensor
    positive_log_q: Tensor
    version: int
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ..., log_q: _Optional[_Union[Tensor, _Mapping]] = ..., positive_log_q: _Optional[_Union[Tensor, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class LogProbRequest(_message.Message):
    __slots__ = ("name", "queries", "ids", "sampler", "min_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    queries: Tensor
    ids: Tensor
    sampler: str
    min_version: int
    def __init__(self, name: _Optional[str] = ..., queries: _Optional[_Union[Tensor, _Mapping]] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., sampler: _Optional[str] = ..., min_version: _Optional[int] = ...) -> None: ...

class LogProbResponse(_message.Message):
    __slots__ = ("log_q", "version")
    LOG_Q_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    log_q: Tensor
    version: int
    def __init__(self, log_q: _Optional[_Union[Tensor, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class RebuildRequest(_message.Message):
    __slots__ = ("name", "mode", "queries")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    mode: str
    queries: Tensor
    def __init__(self, name: _Optional[str] = ..., mode: _Optional[str] = ..., queries: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class RebuildResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...
