from services.proto.tandem.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProbeSpec(_message.Message):
    __slots__ = ("prefill_tokens", "batch", "context")
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    prefill_tokens: int
    batch: int
    context: int
    def __init__(self, prefill_tokens: _Optional[int] = ..., batch: _Optional[int] = ..., context: _Optional[int] = ...) -> None: ...

class ProbeResult(_message.Message):
    __slots__ = ("probe", "step_ms")
    PROBE_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_FIELD_NUMBER: _ClassVar[int]
    probe: ProbeSpec
    step_ms: float
    def __init__(self, probe: _Optional[_Union[ProbeSpec, _Mapping]] = ..., step_ms: _Optional[float] = ...) -> None: ...

class ProfileRequest(_message.Message):
    __slots__ = ("probes", "repeats")
    PROBES_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    probes: _containers.RepeatedCompositeFieldContainer[ProbeSpec]
    repeats: int
    def __init__(self, probes: _Optional[_Iterable[_Union[ProbeSpec, _Mapping]]] = ..., repeats: _Optional[int] = ...) -> None: ...

class ProfileResponse(_message.Message):
    __slots__ = ("results", "worker_id", "model", "gpu_type", "executor", "kv_capacity_tokens")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GPU_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ProbeResult]
    worker_id: str
    model: str
    gpu_type: str
    executor: str
    kv_capacity_tokens: int
    def __init__(self, results: _Optional[_Iterable[_Union[ProbeResult, _Mapping]]] = ..., worker_id: _Optional[str] = ..., model: _Optional[str] = ..., gpu_type: _Optional[str] = ..., executor: _Optional[str] = ..., kv_capacity_tokens: _Optional[int] = ...) -> None: ...

class WorkerGenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "sampling", "slo", "priority", "tenant", "predicted_length", "replay_truth", "upstream_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    REPLAY_TRUTH_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    sampling: _common_pb2.SamplingParams
    slo: _common_pb2.SloSpec
    priority: int
    tenant: str
    predicted_length: _common_pb2.LengthPrediction
    replay_truth: _common_pb2.ReplayTruth
    upstream_ms: float
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., slo: _Optional[_Union[_common_pb2.SloSpec, _Mapping]] = ..., priority: _Optional[int] = ..., tenant: _Optional[str] = ..., predicted_length: _Optional[_Union[_common_pb2.LengthPrediction, _Mapping]] = ..., replay_truth: _Optional[_Union[_common_pb2.ReplayTruth, _Mapping]] = ..., upstream_ms: _Optional[float] = ...) -> None: ...

class WorkerGenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "metrics")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    metrics: _common_pb2.RequestMetrics
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., metrics: _Optional[_Union[_common_pb2.RequestMetrics, _Mapping]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("worker_id", "gpu_type", "model", "executor", "running", "waiting", "kv_blocks_total", "kv_blocks_used", "block_size", "iterations", "step_time_ms", "finished", "aborted", "max_model_len", "engine_policy", "recent_batch_size", "recent_prefill_tokens", "recent_decode_tokens", "preemptions", "max_num_batched_tokens", "max_num_seqs", "open_streams", "asyncio_tasks", "kv_blocks_cached", "prefix_hit_tokens", "prefix_queried_tokens")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    ENGINE_POLICY_FIELD_NUMBER: _ClassVar[int]
    RECENT_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RECENT_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RECENT_DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    OPEN_STREAMS_FIELD_NUMBER: _ClassVar[int]
    ASYNCIO_TASKS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_QUERIED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    gpu_type: str
    model: str
    executor: str
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    block_size: int
    iterations: int
    step_time_ms: float
    finished: int
    aborted: int
    max_model_len: int
    engine_policy: str
    recent_batch_size: float
    recent_prefill_tokens: float
    recent_decode_tokens: float
    preemptions: int
    max_num_batched_tokens: int
    max_num_seqs: int
    open_streams: int
    asyncio_tasks: int
    kv_blocks_cached: int
    prefix_hit_tokens: int
    prefix_queried_tokens: int
    def __init__(self, worker_id: _Optional[str] = ..., gpu_type: _Optional[str] = ..., model: _Optional[str] = ..., executor: _Optional[str] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., block_size: _Optional[int] = ..., iterations: _Optional[int] = ..., step_time_ms: _Optional[float] = ..., finished: _Optional[int] = ..., aborted: _Optional[int] = ..., max_model_len: _Optional[int] = ..., engine_policy: _Optional[str] = ..., recent_batch_size: _Optional[float] = ..., recent_prefill_tokens: _Optional[float] = ..., recent_decode_tokens: _Optional[float] = ..., preemptions: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., open_streams: _Optional[int] = ..., asyncio_tasks: _Optional[int] = ..., kv_blocks_cached: _Optional[int] = ..., prefix_hit_tokens: _Optional[int] = ..., prefix_queried_tokens: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...
