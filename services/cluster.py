"""Cluster files: which workers a stack runs (executor, GPU type, model, ports) and with which policies."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.catalog import gpu, model
from services.slo import SloClass
from services.yamlfile import load_model


class WorkerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    executor: Literal["sim", "torch", "vllm"] = "sim"
    gpu_type: str = "A100-80G"
    model: str = "llama-2-7b"
    port: int = Field(0, ge=0, le=65535)
    kv_blocks: int = Field(0, ge=0)
    block_size: int = Field(16, gt=0)
    prefix_caching: bool = True
    max_num_seqs: int = Field(256, gt=0)
    max_num_batched_tokens: int = Field(2048, gt=0)
    time_scale: float = Field(1.0, gt=0)
    device: str = "auto"                 # torch executor
    dtype: str = "auto"                  # torch executor
    torch_threads: int = Field(0, ge=0)  # torch executor; 0 = torch's default
    python: str = ""                     # the interpreter this worker runs with; "" the default (vllm: .venv-vllm)

    @model_validator(mode="after")
    def _known_names(self) -> "WorkerSpec":
        if self.executor != "sim":
            if "gpu_type" not in self.model_fields_set:
                self.gpu_type = ""       # the worker reports the device it finds
            return self
        try:
            gpu(self.gpu_type)
            model(self.model)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return self


class ClusterSpec(BaseModel):
    """``routing_policy``/``engine_policy`` name a policy; ``routing``/``engine`` may instead give a name with
    options, as in ``routing: {name: prefix_affinity, slack: 2}``."""

    model_config = ConfigDict(extra="forbid")

    routing_policy: str = "token_aware"
    routing_options: dict[str, Any] = Field(default_factory=dict)
    engine_policy: str = "sage"
    engine_options: dict[str, Any] = Field(default_factory=dict)
    report_interval_s: float = Field(0.2, gt=0, description="how often workers report load to the balancer")
    queue_limit: int = Field(512, gt=0)
    shed_at: float = Field(0.5, ge=0, le=1)
    queue_order: Literal["fair", "slack"] = "fair"
    #: the balancer's admission control for requests it binds at once (``balancer/admission.py``)
    admission: Literal["off", "slo"] = "off"
    admission_busy_s: float = Field(0.05, gt=0)
    admission_slack: float = Field(1.0, gt=0)
    #: what ``tandem up`` does when a service process dies: restart it always, on failure only (a non-zero exit
    #: or a signal) at most ``restart_limit`` times, or never; restarts wait ``restart_backoff_s``, doubling
    restart: Literal["always", "on-failure", "never"] = "on-failure"
    restart_limit: int = Field(5, ge=0)
    restart_backoff_s: float = Field(0.5, gt=0)
    slo_classes: dict[str, SloClass] | None = None
    workers: list[WorkerSpec] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _policy_with_options(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for level in ("routing", "engine"):
            choice = data.pop(level, None)
            if choice is None:
                continue
            if isinstance(choice, str):
                choice = {"name": choice}
            if not isinstance(choice, dict) or "name" not in choice:
                raise ValueError(f"{level}: expected a policy name or {{name: ..., option: value}}, got {choice!r}")
            options = dict(choice)
            data[f"{level}_policy"] = options.pop("name")
            data[f"{level}_options"] = options
        return data

    @field_validator("workers")
    @classmethod
    def _unique_ids(cls, workers: list[WorkerSpec]) -> list[WorkerSpec]:
        ids = [w.id for w in workers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"worker ids must be unique, got {ids}")
        return workers


class ClusterFileError(ValueError):
    pass


def load_cluster(path: str | Path | None = None) -> ClusterSpec:
    """Read and check a cluster file; ``None`` gives the embedded default. Errors name the file and the field."""
    return load_model(ClusterSpec, path, default=("services.data", "default_cluster.yaml"), error=ClusterFileError,
                      what="cluster file")
