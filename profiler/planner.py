"""Deployment planner (the heterogeneous-throughput paper): for each machine of an inventory, try every
tensor-parallel degree, instances per machine and batch limit that fit in memory, predict each
configuration's throughput from the latency model, and keep the best (exhaustive search).

A configuration's throughput is measured by running the real engine on that latency model in virtual time
(``engine_saturated_throughput``) for the workload's length mix, so KV limits and chunked prefill count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from profiler.capacity import engine_saturated_throughput
from services.catalog import gpu, model
from services.latency import LatencyModel
from services.yamlfile import load_model

TP_DEGREES = (1, 2, 4, 8)
BATCH_LIMITS = (8, 16, 32, 64, 128, 256)


class Machine(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    gpu_type: str
    count: int = Field(gt=0, le=64)

    @field_validator("gpu_type")
    @classmethod
    def _known(cls, v: str) -> str:
        try:
            return gpu(v).name
        except KeyError as e:
            raise ValueError(e.args[0]) from None


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    machines: list[Machine] = Field(min_length=1)
    mean_input: int = Field(1024, gt=0)
    mean_output: int = Field(256, gt=0)


def load_inventory(path: str | Path) -> Inventory:
    return load_model(Inventory, path, what="inventory")


@dataclass(frozen=True)
class Config:
    machine: str
    gpu_type: str
    tp: int
    instances: int
    batch_limit: int
    tok_s: float                  # whole machine: instances x one instance's throughput


def candidates(machine: Machine, model_name: str) -> list[tuple[int, int, int]]:
    """(tp, instances, batch limit) that fit: weights plus room for at least one request's KV."""
    m = model(model_name)
    out = []
    for tp in TP_DEGREES:
        if tp > machine.count or machine.count % tp:
            continue
        kv = LatencyModel(gpu(machine.gpu_type), m, tp=tp).kv_capacity_tokens()
        if kv < m.max_model_len // 4:
            continue
        out.extend((tp, machine.count // tp, b) for b in BATCH_LIMITS)
    return out


def plan(inventory: Inventory, model_name: str, progress: Callable[[int, int], None] | None = None
         ) -> dict[str, list[Config]]:
    """Every fitting configuration per machine, best first."""
    mix: Sequence[tuple[int, int]] = [(inventory.mean_input, inventory.mean_output)]
    todo = [(mac, c) for mac in inventory.machines for c in candidates(mac, model_name)]
    results: dict[str, list[Config]] = {mac.name: [] for mac in inventory.machines}
    cache: dict[tuple[str, int, int], float] = {}
    for i, (mac, (tp, instances, batch)) in enumerate(todo):
        key = (mac.gpu_type, tp, batch)
        if key not in cache:
            lm = LatencyModel(gpu(mac.gpu_type), model(model_name), tp=tp)
            cache[key] = engine_saturated_throughput(lm, mix, max_num_seqs=batch, warmup_s=10, window_s=40)
        results[mac.name].append(Config(mac.name, mac.gpu_type, tp, instances, batch, instances * cache[key]))
        if progress:
            progress(i + 1, len(todo))
    for configs in results.values():
        configs.sort(key=lambda c: -c.tok_s)
    return results


def as_dict(results: dict[str, list[Config]]) -> dict:
    return {name: [asdict(c) for c in configs] for name, configs in results.items()}
