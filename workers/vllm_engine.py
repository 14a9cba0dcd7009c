"""vLLM (v1, ``AsyncLLM``) as a worker's engine, behind the same Worker service as Tandem's own engine.

The Worker service talks to an engine through a small surface: ``add_request`` returning a stream of chunks,
``abort``, ``load()`` for the balancer, the scheduler's counts for stats, ``run``/``stop``/``wait_idle`` for the
lifecycle, and calibration probes. ``VllmEngine`` gives that surface over vLLM, so streaming, cancellation,
load reports, metrics, tracing of requests and the Profiler's calibration work unchanged:

* prompts are tokenized by the worker (the checkpoint's tokenizer, as for the torch executor) and sent as token
  ids; vLLM detokenizes and applies stop strings itself, and streams deltas;
* Tandem's priority (higher is more important) becomes vLLM's (lower runs first) by negation;
* engine policies ``fcfs`` and ``priority`` map to vLLM's scheduling policies; any other Tandem policy is refused
  at start-up, since vLLM's scheduler cannot run it;
* dropping a stream cancels the request's generator, which aborts it in vLLM's engine core and frees its blocks;
* running and waiting counts, KV usage, prefix-cache hits and step times come from vLLM's own per-step stats,
  through a stat logger; KV blocks used are vLLM's usage times its block count;
* a replayed request's true length (benchmarks only) caps ``max_tokens`` and ignores EOS: vLLM's fcfs and priority
  schedulers order requests without it and read it only to stop at the end, so this is the stop rule, no more.

vLLM imports lazily: the rest of Tandem runs without it. It usually lives in its own environment
(``.venv-vllm``, made by ``scripts/dev``), and the launcher starts vLLM workers with that environment's python.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from services.fit import Probe
from services.settings import WorkerSettings
from workers.clock import Clock
from workers.engine import IterationStats, RequestStream, wait_until_idle
from workers.request import Request, RequestStatus
from workers.scheduler import SchedulerConfig, SchedulerOutput
from workers.true_lengths import TrueLengths

log = logging.getLogger(__name__)

#: Tandem engine policy -> vLLM scheduling policy
SCHEDULING_POLICIES = {"fcfs": "fcfs", "priority": "priority"}
FINISH_REASONS = {"stop": RequestStatus.FINISHED_STOPPED, "length": RequestStatus.FINISHED_LENGTH,
                  "abort": RequestStatus.FINISHED_ABORTED}


def cpu_kv_bytes(folder: Path, tokens: int, dtype_bytes: int = 4) -> int:
    """Bytes of a float32 KV cache holding ``tokens`` tokens of the checkpoint in ``folder``."""
    from workers.executors.llama import LlamaArch

    arch = LlamaArch.from_folder(folder)
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * dtype_bytes * tokens


def scheduling_policy(engine_policy: str) -> str:
    try:
        return SCHEDULING_POLICIES[engine_policy]
    except KeyError:
        raise ValueError(f"engine_policy: {engine_policy!r} is Tandem's own engine's; a vllm worker runs vLLM's "
                         f"scheduler, which offers {', '.join(SCHEDULING_POLICIES)}") from None


@dataclass
class BlocksView:
    """The block manager's counts, as vLLM reports them."""

    num_blocks: int
    block_size: int
    num_used_blocks: int = 0
    num_cached_blocks: int = 0        # vLLM does not report it
    hit_tokens: int = 0
    queried_tokens: int = 0

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self.num_used_blocks


class SchedulerView:
    """What the Worker service reads of a scheduler, kept from vLLM's stats and the engine's own counts."""

    def __init__(self, config: SchedulerConfig, blocks: BlocksView) -> None:
        self.config = config
        self.blocks = blocks
        self.num_running = 0
        self.num_waiting = 0
        self.num_finished = 0
        self.num_aborted = 0


class VllmExecutor:
    """The executor-shaped part: the tokenizer the service encodes with, the context window, and the device."""

    name = "vllm"

    def __init__(self, tokenizer: object, max_model_len: int, device: object) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.device = device
        self.true_lengths = TrueLengths()


class VllmEngine:
    def __init__(self, cfg: WorkerSettings, clock: Clock, step_time_ema: float = 0.2, recent_steps: int = 256) -> None:
        policy = scheduling_policy(cfg.engine_policy)
        if cfg.engine_options:
            raise ValueError(f"engine_options: {sorted(cfg.engine_options)} are Tandem engine options; a vllm worker "
                             "takes none")
        import torch
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from workers.executors.torch_executor import HfTokenizer

        self.clock = clock
        tokenizer = HfTokenizer(Path(cfg.model))
        on_gpu = torch.cuda.is_available() and cfg.device != "cpu"
        args = AsyncEngineArgs(
            model=cfg.model, max_model_len=cfg.max_model_len or None, max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens, enable_prefix_caching=cfg.prefix_caching,
            scheduling_policy=policy, dtype="float32" if cfg.dtype == "auto" and not on_gpu else cfg.dtype,
            num_gpu_blocks_override=(cfg.kv_blocks or None) if on_gpu else None,
            block_size=cfg.block_size if "block_size" in cfg.model_fields_set else None,
            gpu_memory_utilization=cfg.gpu_memory_utilization, seed=0, disable_log_stats=False,
            # on CPU vLLM would reserve a share of all memory: the cache holds kv_blocks x block_size tokens
            # (vLLM chooses its own block size there) or cpu_kv_tokens, as Tandem's own engine would
            kv_cache_memory_bytes=None if on_gpu else cpu_kv_bytes(
                Path(cfg.model), cfg.kv_blocks * cfg.block_size if cfg.kv_blocks else cfg.cpu_kv_tokens))
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[self._stat_logger_factory()])
        vc = self.llm.vllm_config
        self.executor = VllmExecutor(tokenizer, vc.model_config.max_model_len,
                                     torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        if tokenizer.eos_token_id is None:
            tokenizer.eos_token_id = self.llm.get_tokenizer().eos_token_id
        self.scheduler = SchedulerView(
            SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, vc.model_config.max_model_len),
            BlocksView(vc.cache_config.num_gpu_blocks or 0, vc.cache_config.block_size))
        self.on_iteration: Callable[[IterationStats, SchedulerOutput], None] | None = None
        self.recent: deque[IterationStats] = deque(maxlen=recent_steps)
        self.iterations = 0
        self.preemptions = 0
        self.step_time_ms = 0.0
        self._ema = step_time_ema
        self._last_step: float | None = None
        self._streams: dict[str, RequestStream] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._accepting = True
        self._stopped = asyncio.Event()
        self.step_lock = asyncio.Lock()      # probes run alone

    # ----- vLLM's stats ----------------------------------------------------------------------------------
    def _stat_logger_factory(self) -> Callable[..., object]:
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class TandemStats(StatLoggerBase):
            """Receives vLLM's stats of every engine step, in this process."""

            def __init__(self, vllm_config: object, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):  # type: ignore
                engine._record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return TandemStats

    def _record(self, scheduler_stats: object, iteration_stats: object) -> None:
        s = self.scheduler
        if scheduler_stats is not None:
            s.num_running = scheduler_stats.num_running_reqs
            s.num_waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            s.blocks.num_used_blocks = round(scheduler_stats.kv_cache_usage * s.blocks.num_blocks)
            prefix = scheduler_stats.prefix_cache_stats
            s.blocks.hit_tokens += prefix.hits
            s.blocks.queried_tokens += prefix.queries
        if iteration_stats is None:
            return
        now = iteration_stats.iteration_timestamp
        step = now - self._last_step if self._last_step is not None else 0.0
        self._last_step = now
        self.iterations += 1
        self.preemptions += iteration_stats.num_preempted_reqs
        if 0 < step < 1.0:          # an idle gap is not a step
            ms = step * 1000
            self.step_time_ms = ms if not self.step_time_ms else (1 - self._ema) * self.step_time_ms + self._ema * ms
        stats = IterationStats(self.iterations, self.clock.now() - step, step, s.num_running,
                               iteration_stats.num_prompt_tokens, iteration_stats.num_generation_tokens,
                               iteration_stats.num_preempted_reqs, s.blocks.num_used_blocks, s.num_waiting)
        self.recent.append(stats)
        if self.on_iteration is not None:
            self.on_iteration(stats, SchedulerOutput())

    # ----- requests ----------------------------------------------------------------------------------------
    def add_request(self, request: Request, true_output_len: int = 0) -> RequestStream:
        if not self._accepting:
            raise RuntimeError("engine is draining")
        rid = request.request_id
        if rid in self._streams:
            raise ValueError(f"duplicate request id {rid!r}")
        if request.num_prompt_tokens >= self.scheduler.config.max_model_len:
            raise ValueError(f"prompt of {request.num_prompt_tokens} tokens does not fit the context window "
                             f"of {self.scheduler.config.max_model_len}")
        stream = RequestStream(request, None)  # type: ignore[arg-type]   (vLLM detokenizes)
        self._streams[rid] = stream
        self._tasks[rid] = asyncio.create_task(self._pump(request, stream, self._sampling(request, true_output_len)))
        return stream

    @staticmethod
    def _sampling(request: Request, true_output_len: int) -> object:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sp = request.sampling
        stop_at = min(sp.max_tokens, true_output_len) if true_output_len else sp.max_tokens
        return SamplingParams(max_tokens=stop_at, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k or 0,
                              seed=sp.seed, stop=list(sp.stop) or None, stop_token_ids=list(sp.stop_token_ids) or None,
                              ignore_eos=sp.ignore_eos or bool(true_output_len), output_kind=RequestOutputKind.DELTA)

    async def _pump(self, request: Request, stream: RequestStream, sampling: object) -> None:
        """Relay vLLM's deltas to the request's stream; cancelling this task aborts the request in vLLM."""
        rid = request.request_id
        reason: str | None = None
        try:
            async for out in self.llm.generate({"prompt_token_ids": request.prompt_token_ids}, sampling, rid,
                                               priority=-request.priority):
                completion = out.outputs[0]
                now = self.clock.now()
                if completion.token_ids and request.first_token_time is None:
                    request.first_scheduled_time = request.first_token_time = now
                for token in completion.token_ids:
                    request.append_output(token)
                if out.finished:
                    reason = completion.finish_reason or "abort"
                    self._end(request, FINISH_REASONS.get(reason, RequestStatus.FINISHED_STOPPED))
                stream.push(tuple(completion.token_ids), completion.text, reason)
        except asyncio.CancelledError:
            self._end(request, RequestStatus.FINISHED_ABORTED)
            raise
        except Exception:      # the engine core died or refused the request: the stream ends, aborted
            log.exception("vLLM request failed", extra={"fields": {"request_id": rid}})
            self._end(request, RequestStatus.FINISHED_ABORTED)
            stream.push((), "", "abort")
        finally:
            self._streams.pop(rid, None)
            self._tasks.pop(rid, None)

    def _end(self, request: Request, status: RequestStatus) -> None:
        if request.is_finished:
            return
        request.status = status
        request.finished_time = self.clock.now()
        if status is RequestStatus.FINISHED_ABORTED:
            self.scheduler.num_aborted += 1
        else:
            self.scheduler.num_finished += 1

    def abort(self, request_id: str) -> bool:
        task = self._tasks.pop(request_id, None)
        stream = self._streams.pop(request_id, None)
        if task is None:
            return False
        task.cancel()           # vLLM's generate() aborts the request in the engine core when cancelled
        if stream is not None:
            stream.push((), "", RequestStatus.FINISHED_ABORTED.finish_reason)
        return True

    # ----- lifecycle ---------------------------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_accepting(self) -> None:
        self._accepting = False

    async def wait_idle(self, timeout: float) -> bool:
        return await wait_until_idle(lambda: bool(self._tasks), timeout)

    def stop(self) -> None:
        self._stopped.set()

    async def run(self) -> None:
        """vLLM runs its own loop; this waits for ``stop`` and then shuts its engine core down."""
        try:
            await self._stopped.wait()
        finally:
            for task in list(self._tasks.values()):
                task.cancel()
            self.llm.shutdown()

    def load(self) -> dict[str, object]:
        s = self.scheduler
        waiting = [st.request for st in self._streams.values() if st.request.first_token_time is None]
        running = [st.request for st in self._streams.values() if st.request.first_token_time is not None]
        return {"running": s.num_running, "waiting": s.num_waiting, "kv_blocks_used": s.blocks.num_used_blocks,
                "kv_blocks_free": s.blocks.num_free_blocks, "step_time_ms": self.step_time_ms,
                "pending_prefill_tokens": sum(r.num_prompt_tokens for r in waiting),
                "decode_context_tokens": sum(r.num_tokens for r in running), "iterations": self.iterations,
                "draining": not self._accepting, "kv_blocks_cached": 0, "prefix_hit_tokens": s.blocks.hit_tokens,
                "prefix_queried_tokens": s.blocks.queried_tokens}

    # ----- calibration -------------------------------------------------------------------------------------
    async def time_probes(self, probes: list[Probe], repeats: int) -> list[float]:
        """Median step seconds of each probe, timed from outside vLLM with requests of the probe's shape (random
        token ids, so the prefix cache holds none of them): a prefill probe is the time to the first token of
        one P-token prompt; a decode probe of b sequences at context C is the mean gap between tokens 2..17 of b
        C-token prompts decoding together."""
        import random

        from vllm import SamplingParams

        rng = random.Random(0)
        vocab = max(8, getattr(self.executor.tokenizer.hf, "vocab_size", 512))

        def prompt(n: int) -> dict:
            return {"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(n)]}

        async def one(tokens: int, max_tokens: int) -> list[float]:
            times = []
            sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            start = time.perf_counter()
            async for out in self.llm.generate(prompt(tokens), sp, f"probe-{uuid.uuid4().hex}"):
                times.append(time.perf_counter())
            return [start] + times

        async def measure(p: Probe) -> float:
            if p.is_prefill:
                stamps = await one(p.prefill_tokens, 1)
                return stamps[1] - stamps[0]
            runs = await asyncio.gather(*(one(p.context, 17) for _ in range(p.batch)))
            return statistics.median((r[-1] - r[2]) / max(1, len(r) - 3) for r in runs)

        results: list[list[float]] = [[] for _ in probes]
        async with self.step_lock:
            for rep in range(repeats + 1):
                for k, p in enumerate(probes):
                    t = await measure(p)
                    if rep:
                        results[k].append(t)
        return [statistics.median(r) for r in results]
