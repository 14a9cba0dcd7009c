from services.proto.tandem.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CalibrateRequest(_message.Message):
    __slots__ = ("worker_address", "repeats")
    WORKER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    worker_address: str
    repeats: int
    def __init__(self, worker_address: _Optional[str] = ..., repeats: _Optional[int] = ...) -> None: ...

class CalibrateResponse(_message.Message):
    __slots__ = ("profile", "probes", "prefill_median_error", "decode_median_error")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    PROBES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MEDIAN_ERROR_FIELD_NUMBER: _ClassVar[int]
    DECODE_MEDIAN_ERROR_FIELD_NUMBER: _ClassVar[int]
    profile: LatencyProfile
    probes: int
    prefill_median_error: float
    decode_median_error: float
    def __init__(self, profile: _Optional[_Union[LatencyProfile, _Mapping]] = ..., probes: _Optional[int] = ..., prefill_median_error: _Optional[float] = ..., decode_median_error: _Optional[float] = ...) -> None: ...

class GetProfileRequest(_message.Message):
    __slots__ = ("model", "gpu_type", "executor")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GPU_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    model: str
    gpu_type: str
    executor: str
    def __init__(self, model: _Optional[str] = ..., gpu_type: _Optional[str] = ..., executor: _Optional[str] = ...) -> None: ...

class LatencyProfile(_message.Message):
    __slots__ = ("model", "gpu_type", "executor", "source", "peak_tflops", "mem_bw_tbs", "mem_gb", "mfu", "mbu", "overhead_ms", "prefill_a0", "prefill_a1", "decode_c0", "decode_c1", "decode_c2", "fitted", "kv_capacity_tokens", "prefill_a2")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GPU_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PEAK_TFLOPS_FIELD_NUMBER: _ClassVar[int]
    MEM_BW_TBS_FIELD_NUMBER: _ClassVar[int]
    MEM_GB_FIELD_NUMBER: _ClassVar[int]
    MFU_FIELD_NUMBER: _ClassVar[int]
    MBU_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_A0_FIELD_NUMBER: _ClassVar[int]
    PREFILL_A1_FIELD_NUMBER: _ClassVar[int]
    DECODE_C0_FIELD_NUMBER: _ClassVar[int]
    DECODE_C1_FIELD_NUMBER: _ClassVar[int]
    DECODE_C2_FIELD_NUMBER: _ClassVar[int]
    FITTED_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_A2_FIELD_NUMBER: _ClassVar[int]
    model: str
    gpu_type: str
    executor: str
    source: str
    peak_tflops: float
    mem_bw_tbs: float
    mem_gb: float
    mfu: float
    mbu: float
    overhead_ms: float
    prefill_a0: float
    prefill_a1: float
    decode_c0: float
    decode_c1: float
    decode_c2: float
    fitted: bool
    kv_capacity_tokens: int
    prefill_a2: float
    def __init__(self, model: _Optional[str] = ..., gpu_type: _Optional[str] = ..., executor: _Optional[str] = ..., source: _Optional[str] = ..., peak_tflops: _Optional[float] = ..., mem_bw_tbs: _Optional[float] = ..., mem_gb: _Optional[float] = ..., mfu: _Optional[float] = ..., mbu: _Optional[float] = ..., overhead_ms: _Optional[float] = ..., prefill_a0: _Optional[float] = ..., prefill_a1: _Optional[float] = ..., decode_c0: _Optional[float] = ..., decode_c1: _Optional[float] = ..., decode_c2: _Optional[float] = ..., fitted: _Optional[bool] = ..., kv_capacity_tokens: _Optional[int] = ..., prefill_a2: _Optional[float] = ...) -> None: ...

class ListProfilesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListProfilesResponse(_message.Message):
    __slots__ = ("profiles",)
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    profiles: _containers.RepeatedCompositeFieldContainer[LatencyProfile]
    def __init__(self, profiles: _Optional[_Iterable[_Union[LatencyProfile, _Mapping]]] = ...) -> None: ...

class PredictLengthRequest(_message.Message):
    __slots__ = ("slo_class", "prompt_tokens", "max_tokens", "prompt_feature")
    SLO_CLASS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FEATURE_FIELD_NUMBER: _ClassVar[int]
    slo_class: str
    prompt_tokens: int
    max_tokens: int
    prompt_feature: str
    def __init__(self, slo_class: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., prompt_feature: _Optional[str] = ...) -> None: ...

class CompletionRecord(_message.Message):
    __slots__ = ("request_id", "slo_class", "worker_id", "gpu_type", "model", "metrics", "prompt_feature", "finish_reason", "prompt_tokens_estimate")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SLO_CLASS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FEATURE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    slo_class: str
    worker_id: str
    gpu_type: str
    model: str
    metrics: _common_pb2.RequestMetrics
    prompt_feature: str
    finish_reason: str
    prompt_tokens_estimate: int
    def __init__(self, request_id: _Optional[str] = ..., slo_class: _Optional[str] = ..., worker_id: _Optional[str] = ..., gpu_type: _Optional[str] = ..., model: _Optional[str] = ..., metrics: _Optional[_Union[_common_pb2.RequestMetrics, _Mapping]] = ..., prompt_feature: _Optional[str] = ..., finish_reason: _Optional[str] = ..., prompt_tokens_estimate: _Optional[int] = ...) -> None: ...

class RecordCompletionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
