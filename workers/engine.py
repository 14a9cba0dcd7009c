"""The engine loop: one task owns the scheduler; it schedules, executes and delivers, one iteration at a time.

Requests join and leave between iterations. Each request's outputs go to its own ``RequestStream``; a reader
that falls behind gets everything pending coalesced into one chunk. Cancelling is dropping the stream:
``abort`` frees the request's blocks at once, even while a step that includes it is running.

An iteration is ``begin_step`` (schedule), the executor's work, then ``end_step`` (update, deliver, count). The
worker's ``run`` loop awaits the executor in between; the simulator calls the same two halves around the sim
executor's predicted step time in virtual time, so both run one engine. ``load`` is the one load snapshot the
worker reports to the balancer and the simulator feeds its balancer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from workers.clock import Clock
from workers.executors.base import Executor
from workers.request import Request, RequestStatus
from workers.scheduler import RequestOutput, Scheduler, SchedulerOutput
from workers.step_estimate import ObservedLatency
from workers.tokenizer import Detokenizer

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    """Everything a request produced since its reader last looked."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None


@dataclass(frozen=True)
class IterationStats:
    iteration: int
    start: float
    step_time: float
    batch_size: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_preempted: int
    blocks_used: int
    num_waiting: int


class RequestStream:
    def __init__(self, request: Request, detokenizer: Detokenizer) -> None:
        self.request = request
        self.detokenizer = detokenizer
        self._pending = Chunk()
        self._ready = asyncio.Event()

    def push(self, token_ids: tuple[int, ...], text: str, finish_reason: str | None) -> None:
        self._pending.token_ids.extend(token_ids)
        self._pending.text += text
        if finish_reason is not None:
            self._pending.finished = True
            self._pending.finish_reason = finish_reason
        self._ready.set()

    async def next_chunk(self) -> Chunk:
        await self._ready.wait()
        chunk, self._pending = self._pending, Chunk()
        self._ready.clear()
        return chunk


async def wait_until_idle(has_work: Callable[[], bool], timeout: float) -> bool:
    """Poll ``has_work`` until it is False; True when that happened within ``timeout`` seconds (a draining worker
    waits on its engine with it, whichever engine it runs)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while has_work() and loop.time() < deadline:
        await asyncio.sleep(0.02)
    return not has_work()


class Engine:
    def __init__(self, scheduler: Scheduler, executor: Executor, clock: Clock,
                 on_iteration: Callable[[IterationStats, SchedulerOutput], None] | None = None,
                 step_time_ema: float = 0.2, on_output: Callable[[RequestOutput], None] | None = None,
                 recent_steps: int = 256, step_observer: ObservedLatency | None = None) -> None:
        """``on_output`` receives the outputs of requests added with ``submit`` (no stream: the simulator);
        ``recent_steps`` iterations are kept for the worker's stats (0 keeps none and skips counting them);
        ``step_observer`` learns step times from every iteration (the SLO-aware policies' latency model on an
        executor without one)."""
        self.scheduler = scheduler
        self.executor = executor
        self.clock = clock
        self.on_iteration = on_iteration
        self.on_output = on_output
        self._streams: dict[str, RequestStream] = {}
        self._wake = asyncio.Event()
        self.step_lock = asyncio.Lock()      # held for each iteration; calibration probes take it in between
        self._stopped = False
        self._accepting = True
        self.iterations = 0
        self.preemptions = 0
        self.recent: deque[IterationStats] = deque(maxlen=recent_steps)
        self.step_time_ms = 0.0
        self._ema = step_time_ema
        self.step_observer = step_observer

    # ----- requests ----------------------------------------------------------------------------------
    def add_request(self, request: Request, true_output_len: int = 0) -> RequestStream:
        """Queue ``request``; its tokens arrive on the returned stream. ``true_output_len`` (replay only) goes to
        the executor's stop rule and nowhere else."""
        self.submit(request, true_output_len)
        stream = RequestStream(request, Detokenizer(self.executor.tokenizer, request.sampling.stop,
                                                    request.prompt_token_ids))
        self._streams[request.request_id] = stream
        return stream

    def submit(self, request: Request, true_output_len: int = 0) -> None:
        """Queue ``request`` without a stream: its outputs go to ``on_output``."""
        if not self._accepting:
            raise RuntimeError("engine is draining")
        self.scheduler.add_request(request)
        self.executor.true_lengths.set(request.request_id, true_output_len)
        self._wake.set()

    def abort(self, request_id: str) -> bool:
        request = self.scheduler.abort_request(request_id)
        stream = self._streams.pop(request_id, None)
        self.executor.release(request_id)
        if stream is not None:
            stream.push((), "", RequestStatus.FINISHED_ABORTED.finish_reason)
        return request is not None

    # ----- lifecycle ---------------------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_accepting(self) -> None:
        self._accepting = False

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every request has ended; True when that happened within ``timeout`` seconds."""
        return await wait_until_idle(self.scheduler.has_work, timeout)

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    async def run(self) -> None:
        while not self._stopped:
            if not self.scheduler.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self.step_lock:
                out = self.begin_step()
                if out is None:
                    # nothing fits this instant (all blocks held by requests being aborted); let others run
                    await asyncio.sleep(0.001)
                    continue
                start = self.clock.now()
                try:
                    sampled = await self.executor.execute(out)
                except Exception:
                    log.exception("executor failed; aborting the batch")
                    for item in out.scheduled:
                        self.abort(item.request.request_id)
                    continue
                self.end_step(out, sampled, start, self.clock.now() - start)

    # ----- one iteration, in two halves --------------------------------------------------------------
    def begin_step(self) -> SchedulerOutput | None:
        """Schedule the next batch; None when nothing can run now."""
        out = self.scheduler.schedule()
        for request in out.refused:
            self._end_unrun(request)
        return out if out.scheduled else None

    def end_step(self, out: SchedulerOutput, sampled: dict[str, int], start: float, step: float) -> None:
        """Apply a step's sampled tokens, deliver them, and count the iteration."""
        self._deliver(self.scheduler.update(out, sampled))
        self.iterations += 1
        ms = step * 1000.0
        self.step_time_ms = ms if self.iterations == 1 else (1 - self._ema) * self.step_time_ms + self._ema * ms
        self.preemptions += len(out.preempted)
        if self.step_observer is not None:
            self.step_observer.observe(out, step)
        if not self.recent.maxlen and self.on_iteration is None:
            return
        stats = IterationStats(self.iterations, start, step, len(out.scheduled), out.num_prefill_tokens,
                               out.num_decode_tokens, len(out.preempted), self.scheduler.blocks.num_used_blocks,
                               self.scheduler.num_waiting)
        self.recent.append(stats)
        if self.on_iteration is not None:
            self.on_iteration(stats, out)

    def _end_unrun(self, request: Request) -> None:
        """Tell a request's reader that it ended before it ran (refused by the policy's triage)."""
        reason = request.status.finish_reason
        self.executor.release(request.request_id)
        stream = self._streams.pop(request.request_id, None)
        if stream is not None:
            stream.push((), "", reason)
        elif self.on_output is not None:
            self.on_output(RequestOutput(request, (), True, reason))

    def load(self) -> dict[str, object]:
        """What a load report says now (the balancer's ``LOAD_FIELDS``): one snapshot for the live worker's
        reports and the simulator's."""
        s = self.scheduler
        return {"running": s.num_running, "waiting": s.num_waiting, "kv_blocks_used": s.blocks.num_used_blocks,
                "kv_blocks_free": s.blocks.num_free_blocks, "step_time_ms": self.step_time_ms,
                "pending_prefill_tokens": s.pending_prefill_tokens(), "decode_context_tokens": s.decode_context_tokens(),
                "iterations": self.iterations, "draining": not self._accepting,
                "kv_blocks_cached": s.blocks.num_cached_blocks, "prefix_hit_tokens": s.blocks.hit_tokens,
                "prefix_queried_tokens": s.blocks.queried_tokens}

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            request = output.request
            stream = self._streams.get(request.request_id)
            if stream is None:
                if self.on_output is not None:
                    if output.finished:
                        self.executor.release(request.request_id)
                    self.on_output(output)
                continue
            text, stopped = stream.detokenizer.add(request.output_token_ids)
            reason = output.finish_reason
            if stopped and not output.finished:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
                reason = RequestStatus.FINISHED_STOPPED.finish_reason
            if reason is not None:
                if not stopped:
                    text += stream.detokenizer.flush(request.output_token_ids)
                del self._streams[request.request_id]
                self.executor.release(request.request_id)
            stream.push(output.new_token_ids, text, reason)
