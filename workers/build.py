"""Assembles an engine from worker settings: executor, KV block budget, scheduler and policy."""

from __future__ import annotations

from services.profiler.latency import LatencyModel
from services.settings import WorkerSettings
from workers.block_manager import BlockManager
from workers.clock import Clock
from workers.engine import Engine
from workers.executors.base import Executor
from workers.executors.sim import SimExecutor
from workers.policies import make_policy
from workers.scheduler import Scheduler, SchedulerConfig


def build_executor(cfg: WorkerSettings, clock: Clock, latency: LatencyModel | None = None
                   ) -> tuple[Executor, int]:
    """The executor and its KV capacity in tokens; ``latency`` is the Profiler's model, else the datasheet's."""
    if cfg.executor == "sim":
        latency = latency or LatencyModel.from_names(cfg.gpu_type, cfg.model)
        return SimExecutor(latency, clock, time_scale=cfg.time_scale), latency.kv_capacity_tokens()
    raise ValueError(f"executor {cfg.executor!r} is not available in this build; use --executor sim")


def build_engine(cfg: WorkerSettings, clock: Clock, latency: LatencyModel | None = None, **engine_kw: object
                 ) -> Engine:
    executor, kv_tokens = build_executor(cfg, clock, latency)
    num_blocks = cfg.kv_blocks or kv_tokens // cfg.block_size
    if num_blocks <= 0:
        raise ValueError(f"{cfg.model} leaves no KV memory on {cfg.gpu_type}; set --kv-blocks")
    scheduler = Scheduler(
        SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, executor.max_model_len),
        BlockManager(num_blocks, cfg.block_size), make_policy(cfg.engine_policy), clock)
    return Engine(scheduler, executor, clock, **engine_kw)
