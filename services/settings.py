"""Settings of every service: defaults, then ``TANDEM_*`` environment variables, then command-line flags.

Flags are parsed by pydantic-settings from the same models (``--gpu-type A10``), so a setting has one name
everywhere: ``gpu_type`` in code, ``TANDEM_GPU_TYPE`` in the environment, ``--gpu-type`` on the command line.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.slo import DEFAULT_SLO_CLASSES, SloClass


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(0, ge=0, le=65535, description="port to listen on; 0 picks a free one")
    log_level: str = "INFO"
    drain_grace_s: float = Field(10.0, ge=0, description="on SIGTERM, how long open streams may finish")
    max_message_bytes: int = Field(16 * 1024 * 1024, gt=0, description="gRPC receive limit")
    metrics_port: int = Field(-1, ge=-1, le=65535, description="Prometheus /metrics over HTTP on this port; "
                              "0 picks a free one, -1 turns it off")
    tls_cert: str = Field("", description="PEM certificate: served on this service's port, and presented as the "
                          "client certificate on calls to other services")
    tls_key: str = Field("", description="PEM private key of tls_cert")
    tls_ca: str = Field("", description="PEM CA bundle: verifies the services this one calls and, with "
                        "tls_client_auth, the clients that call it")
    tls_client_auth: bool = Field(True, description="with tls_ca: callers must present a certificate it signed "
                                  "(mutual TLS)")


class ProfilerSettings(ServiceSettings):
    db_path: str = Field(".tandem/profiles.sqlite", description="SQLite file of calibrated profiles")


class BalancerSettings(ServiceSettings):
    routing_policy: str = "token_aware"
    routing_options: dict[str, Any] = Field(default_factory=dict, description="the routing policy's options (JSON)")
    worker_timeout_s: float = Field(1.5, gt=0, description="a worker silent this long leaves rotation")
    report_interval_s: float = Field(0.2, gt=0, description="how often workers should report load")
    profiler_address: str = ""
    queue_limit: int = Field(512, gt=0, description="requests that may wait at the balancer for a worker")
    shed_at: float = Field(0.5, ge=0, le=1, description="queue share above which sheddable requests are refused")
    gateway_lease_s: float = Field(10.0, gt=0, description="a gateway silent this long loses its in-flight "
                                   "bindings (it renews every third of it)")
    admission: Literal["off", "slo"] = Field("off", description="slo: refuse requests bound at once that no worker "
                                             "can serve within their SLO, and when the cluster is busy, sheddable "
                                             "ones and those of tenants over their share (balancer/admission.py)")
    admission_busy_s: float = Field(0.05, gt=0, description="admission: queued prefill (seconds of it) "
                                    "on every worker above which the cluster is busy")
    admission_slack: float = Field(1.0, gt=0, description="admission: admit when the forecast is within this "
                                   "many times the request's target")
    queue_order: Literal["fair", "slack"] = Field("fair", description="fair: priority, tenant VTC, deadline; slack: "
                                                  "priority, then lost causes behind those that can make it")


class WorkerSettings(ServiceSettings):
    worker_id: str = ""
    advertise_address: str = Field("", description="host:port others use to reach this worker")
    balancer_address: str = ""
    profiler_address: str = ""
    executor: Literal["sim", "torch", "vllm"] = "sim"
    gpu_type: str = "A100-80G"
    model: str = Field("llama-2-7b", description="sim: a model name; torch, vllm: a checkpoint folder")
    engine_policy: str = "sage"
    engine_options: dict[str, Any] = Field(default_factory=dict, description="the engine policy's options (JSON)")
    block_size: int = Field(16, gt=0)
    prefix_caching: bool = Field(True, description="keep full KV blocks keyed by their tokens for later prompts "
                                 "that start the same way")
    kv_blocks: int = Field(0, ge=0, description="KV block budget; 0 derives it from device memory")
    max_num_seqs: int = Field(256, gt=0)
    max_num_batched_tokens: int = Field(2048, gt=0)
    time_scale: float = Field(1.0, gt=0, description="sim executor: multiply predicted step times")
    device: str = Field("auto", description="torch executor: cpu, cuda, cuda:N or auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = Field(0, ge=0, description="torch executor: cap on the context window; 0 = the model's")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of GPU memory for weights and KV")
    cpu_kv_tokens: int = Field(65536, gt=0, description="torch executor on CPU: KV cache size in tokens")
    torch_threads: int = Field(0, ge=0, description="torch executor: intra-op threads; 0 = torch's default")
    stream_interval_ms: float = Field(0.0, ge=0, description="after its first token, a stream sends at most one "
                                      "message this often (tokens in between go together); 0: one per step")


class GatewaySettings(ServiceSettings):
    port: int = Field(50051, ge=0, le=65535)
    balancer_address: str = ""
    profiler_address: str = ""
    default_max_tokens: int = Field(256, gt=0)
    max_prompt_bytes: int = Field(1024 * 1024, gt=0)
    max_stop_strings: int = Field(8, ge=0)
    retry_attempts: int = Field(3, ge=1, description="workers tried before the first token")
    queue_wait_s: float = Field(120.0, gt=0, description="longest wait at the balancer without a client deadline")
    predict_timeout_ms: float = Field(20.0, gt=0, description="bound on the length-prediction look-up")
    slo_classes: dict[str, SloClass] = Field(default_factory=lambda: dict(DEFAULT_SLO_CLASSES))
    api_keys: dict[str, str] = Field(default_factory=dict, description="API key -> tenant; empty: open")
    http_port: int = Field(-1, ge=-1, le=65535, description="OpenAI-compatible HTTP API on this port; "
                           "0 picks a free one, -1 turns it off")
    served_model: str = Field("tandem", description="the model name the HTTP API lists and accepts")
    chat_template: str = Field("", description="a checkpoint folder whose tokenizer's chat template renders "
                               "chat prompts; empty: a plain role-prefixed transcript")
    gateway_id: str = Field("", description="names this gateway's lease at the balancer; default: a random id")
    worker_stream_window_bytes: int = Field(256, ge=0, description="receive window per worker stream: a gateway "
                                            "that falls behind makes its workers send several tokens a message; "
                                            "0: gRPC's default (64 KiB and growing)")
    tls_client_auth: bool = Field(False, description="with tls_ca: clients must present a certificate (the "
                                  "public port usually takes any client)")


S = TypeVar("S", bound=ServiceSettings)


def load(cls: type[S], argv: Sequence[str] = (), prog: str | None = None) -> S:
    """Build settings from defaults, the environment and ``argv`` flags."""
    return cls(_cli_parse_args=list(argv), _cli_kebab_case=True, _cli_prog_name=prog,
               _cli_implicit_flags=True)
