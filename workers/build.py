"""Assembles an engine from worker settings: executor, KV block budget, scheduler and policy."""

from __future__ import annotations

from services.latency import LatencyModel
from services.settings import WorkerSettings
from workers.block_manager import BlockManager
from workers.clock import Clock
from workers.engine import Engine
from workers.executors.base import Executor
from workers.executors.sim import SimExecutor
from workers.policies import make_policy
from workers.scheduler import Scheduler, SchedulerConfig
from workers.step_estimate import ObservedLatency


def build_executor(cfg: WorkerSettings, clock: Clock, latency: LatencyModel | None = None
                   ) -> tuple[Executor, int]:
    """The executor and its KV block budget (``kv_blocks`` when set, else from device memory or a setting)."""
    if cfg.executor == "sim":
        latency = latency or LatencyModel.from_names(cfg.gpu_type, cfg.model)
        executor: Executor = SimExecutor(latency, clock, time_scale=cfg.time_scale)
        return executor, cfg.kv_blocks or latency.kv_capacity_tokens() // cfg.block_size
    if cfg.executor == "torch":
        try:
            from workers.executors.torch_executor import TorchExecutor
        except ImportError as e:
            raise ValueError(f"the torch executor needs the torch extra (pip install 'tandem-serve[torch]'): {e}")
        torch_executor = TorchExecutor(cfg.model, device=cfg.device, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                                       threads=cfg.torch_threads)
        if cfg.kv_blocks:
            blocks = cfg.kv_blocks
        elif torch_executor.device.type == "cuda":
            blocks = torch_executor.kv_blocks_for_memory(cfg.block_size, cfg.gpu_memory_utilization)
        else:
            blocks = cfg.cpu_kv_tokens // cfg.block_size
        return torch_executor, blocks
    raise ValueError(f"executor {cfg.executor!r} is not available in this build; use sim, torch or vllm")


def build_engine(cfg: WorkerSettings, clock: Clock, latency: LatencyModel | None = None, **engine_kw: object
                 ) -> Engine:
    if cfg.executor == "vllm":
        from workers.vllm_engine import VllmEngine

        try:
            return VllmEngine(cfg, clock)  # type: ignore[return-value]   (the same surface, over vLLM)
        except ImportError as e:
            raise ValueError(f"the vllm executor needs vLLM in this environment (scripts/dev makes .venv-vllm): {e}")
    executor, num_blocks = build_executor(cfg, clock, latency)
    if num_blocks <= 0:
        raise ValueError(f"{cfg.model} leaves no KV memory on {cfg.gpu_type}; set --kv-blocks")
    return assemble_engine(executor, num_blocks, cfg.block_size, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                           cfg.engine_policy, cfg.engine_options, clock, prefix_caching=cfg.prefix_caching,
                           **engine_kw)


def assemble_engine(executor: Executor, num_blocks: int, block_size: int, max_num_seqs: int,
                    max_num_batched_tokens: int, policy: str, policy_options: dict[str, object], clock: Clock,
                    prefix_caching: bool = False, **engine_kw: object) -> Engine:
    """An engine around ``executor``: its blocks, scheduler and policy. The worker and the simulator both use it."""
    blocks = BlockManager(num_blocks, block_size, caching=prefix_caching)
    executor.bind_blocks(blocks)
    # the worker's own latency model when its executor runs on one, else what the engine measures of its steps
    latency = getattr(executor, "latency", None)
    observed = ObservedLatency() if latency is None else None
    scheduler = Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens, executor.max_model_len), blocks,
                          make_policy(policy, true_lengths=executor.true_lengths, latency=latency or observed,
                                      kv_tokens=num_blocks * block_size, **policy_options), clock)
    return Engine(scheduler, executor, clock, step_observer=observed, **engine_kw)
