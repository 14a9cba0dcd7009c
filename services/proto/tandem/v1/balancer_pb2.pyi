from services.proto.tandem.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "address", "model", "gpu_type", "executor", "max_model_len", "kv_blocks_total", "block_size", "engine_policy", "max_num_seqs")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GPU_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    model: str
    gpu_type: str
    executor: str
    max_model_len: int
    kv_blocks_total: int
    block_size: int
    engine_policy: str
    max_num_seqs: int
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., model: _Optional[str] = ..., gpu_type: _Optional[str] = ..., executor: _Optional[str] = ..., max_model_len: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., block_size: _Optional[int] = ..., engine_policy: _Optional[str] = ..., max_num_seqs: _Optional[int] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    def __init__(self, worker: _Optional[_Union[WorkerInfo, _Mapping]] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("report_interval_s",)
    REPORT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    report_interval_s: float
    def __init__(self, report_interval_s: _Optional[float] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("worker_id", "running", "waiting", "kv_blocks_used", "kv_blocks_free", "step_time_ms", "pending_prefill_tokens", "decode_context_tokens", "iterations", "draining", "kv_blocks_cached", "prefix_hit_tokens", "prefix_queried_tokens")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    PENDING_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_QUERIED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    step_time_ms: float
    pending_prefill_tokens: int
    decode_context_tokens: int
    iterations: int
    draining: bool
    kv_blocks_cached: int
    prefix_hit_tokens: int
    prefix_queried_tokens: int
    def __init__(self, worker_id: _Optional[str] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., step_time_ms: _Optional[float] = ..., pending_prefill_tokens: _Optional[int] = ..., decode_context_tokens: _Optional[int] = ..., iterations: _Optional[int] = ..., draining: _Optional[bool] = ..., kv_blocks_cached: _Optional[int] = ..., prefix_hit_tokens: _Optional[int] = ..., prefix_queried_tokens: _Optional[int] = ...) -> None: ...

class ReportLoadAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeregisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DeregisterWorkerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("request_id", "slo_class", "prompt_chars", "max_tokens", "priority", "tenant", "exclude_workers", "predicted_length", "prompt_tokens_estimate", "slo", "prefix_hashes", "sheddable", "gateway_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SLO_CLASS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HASHES_FIELD_NUMBER: _ClassVar[int]
    SHEDDABLE_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    slo_class: str
    prompt_chars: int
    max_tokens: int
    priority: int
    tenant: str
    exclude_workers: _containers.RepeatedScalarFieldContainer[str]
    predicted_length: _common_pb2.LengthPrediction
    prompt_tokens_estimate: int
    slo: _common_pb2.SloSpec
    prefix_hashes: _containers.RepeatedScalarFieldContainer[int]
    sheddable: bool
    gateway_id: str
    def __init__(self, request_id: _Optional[str] = ..., slo_class: _Optional[str] = ..., prompt_chars: _Optional[int] = ..., max_tokens: _Optional[int] = ..., priority: _Optional[int] = ..., tenant: _Optional[str] = ..., exclude_workers: _Optional[_Iterable[str]] = ..., predicted_length: _Optional[_Union[_common_pb2.LengthPrediction, _Mapping]] = ..., prompt_tokens_estimate: _Optional[int] = ..., slo: _Optional[_Union[_common_pb2.SloSpec, _Mapping]] = ..., prefix_hashes: _Optional[_Iterable[int]] = ..., sheddable: _Optional[bool] = ..., gateway_id: _Optional[str] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("worker_id", "address")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("worker_id", "request_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    request_id: str
    def __init__(self, worker_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("gateway_id",)
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    def __init__(self, gateway_id: _Optional[str] = ...) -> None: ...

class RenewLeaseResponse(_message.Message):
    __slots__ = ("lease_s", "bindings")
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    BINDINGS_FIELD_NUMBER: _ClassVar[int]
    lease_s: float
    bindings: int
    def __init__(self, lease_s: _Optional[float] = ..., bindings: _Optional[int] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("info", "load", "outstanding", "last_report_age_s", "state", "capacity_tok_s", "profile_source")
    INFO_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    LAST_REPORT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_TOK_S_FIELD_NUMBER: _ClassVar[int]
    PROFILE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    info: WorkerInfo
    load: LoadReport
    outstanding: int
    last_report_age_s: float
    state: str
    capacity_tok_s: float
    profile_source: str
    def __init__(self, info: _Optional[_Union[WorkerInfo, _Mapping]] = ..., load: _Optional[_Union[LoadReport, _Mapping]] = ..., outstanding: _Optional[int] = ..., last_report_age_s: _Optional[float] = ..., state: _Optional[str] = ..., capacity_tok_s: _Optional[float] = ..., profile_source: _Optional[str] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "routing_policy", "queue_length", "queue_limit", "shed_total", "evicted_total", "lease_released_total")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_POLICY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    SHED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EVICTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_RELEASED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    routing_policy: str
    queue_length: int
    queue_limit: int
    shed_total: int
    evicted_total: int
    lease_released_total: int
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., routing_policy: _Optional[str] = ..., queue_length: _Optional[int] = ..., queue_limit: _Optional[int] = ..., shed_total: _Optional[int] = ..., evicted_total: _Optional[int] = ..., lease_released_total: _Optional[int] = ...) -> None: ...
