"""Discrete-event cluster simulator: the real balancer decisions and the real engine, in virtual time.

Nothing here re-implements a decision. Each worker is the worker's own ``Engine`` (scheduler, block manager,
engine policy) around the ``SimExecutor``; the simulator calls the engine's two step halves around the sim
executor's predicted step time, the same expression a live sim worker sleeps for. The balancer side is the real
``Registry``, routing policy and ``GlobalQueue``, and every new request goes through ``admit``, the function the
live balancer's Route calls. Workers report ``Engine.load()`` every ``report_interval_s`` (the live default, or
the policy's own scrape interval), so policies route from reports as stale as live ones plus the balancer's own
in-flight accounting; ``report_interval_s=0`` gives an instant view instead, for comparison.

Requests carry ``max_tokens`` as the client's cap; the trace's true length goes to the executor's benchmark-only
stop rule (``TrueLengths``) and to nothing that schedules. A worker that can never hold a request (prompt plus cap
beyond its KV or window) is skipped, which is where the live gateway's retry would land it.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

from balancer.admission import AdmissionControl
from balancer.queue import GlobalQueue, QueueFull, Waiter, admit, bind, drain, report_interval
from balancer.registry import Registry, WorkerState
from balancer.route_context import RouteContext
from balancer.routing import make_policy as make_routing
from bench.metrics import RequestRecord
from bench.replay import ReplayItem, prompt_token_ids
from profiler.predictor import LengthPredictor
from services.cluster import ClusterSpec, WorkerSpec
from services.latency import LatencyModel
from services.slo import DEFAULT_SLO_CLASSES, SloClass
from workers.build import assemble_engine
from workers.clock import VirtualClock
from workers.engine import Engine
from workers.executors.sim import SimExecutor
from workers.request import Request, SamplingParams, SloTarget
from workers.scheduler import RequestOutput, SchedulerOutput

ARRIVAL, ENQUEUE, STEP_DONE, REPORT = range(4)


@dataclass(eq=False)
class SimWorker:
    spec: WorkerSpec
    state: WorkerState                    # the balancer's view of it
    engine: Engine
    executor: SimExecutor
    busy: bool = False
    busy_bins: dict[int, float] = field(default_factory=lambda: defaultdict(float))

    def fits(self, item: ReplayItem) -> bool:
        """Whether prompt plus cap could ever be held (the live worker answers RESOURCE_EXHAUSTED otherwise)."""
        blocks = self.engine.scheduler.blocks
        need = item.input_tokens + item.cap
        return -(-need // blocks.block_size) <= blocks.num_blocks and need <= self.executor.max_model_len


@dataclass
class SimResult:
    records: list[RequestRecord]
    duration_s: float
    utilization: dict[str, list[float]]     # per worker: busy share per bin
    bin_s: float
    events: int
    shed: int


class Simulator:
    def __init__(self, cluster: ClusterSpec, routing: str | None = None, engine: str | None = None, *,
                 slo_classes: dict[str, SloClass] | None = None, seed: int = 0, bin_s: float = 10.0,
                 latency: dict[str, object] | None = None, request_overhead_s: float = 0.0,
                 step_overhead_s: float = 0.0, step_overhead_per_seq_s: float = 0.0,
                 report_interval_s: float | None = None, delivery_per_seq_s: float = 0.0,
                 engine_options: dict[str, object] | None = None) -> None:
        """``latency`` gives a worker (by id) a latency model other than its datasheet one: a calibrated
        profile, or a ``ProfiledLatency`` for a checkpoint outside the catalog. ``request_overhead_s`` (the
        gateway, routing and tokenizing before the engine sees a request) and ``step_overhead_s`` plus
        ``step_overhead_per_seq_s`` for each further sequence in the batch (the engine loop's own work around a
        forward pass) are the serving stack's costs beyond the forward pass, measured at idle.
        ``report_interval_s`` defaults to the cluster file's; 0 lets the balancer see every worker as of now.
        ``delivery_per_seq_s``: a step's tokens reach their clients one stream after another (the worker writes
        them and the gateway relays them one at a time), each this much after the one before it, in the step's
        order; only the clients' token times move, no decision waits for delivery (nor does a live engine's).
        0, the default, delivers a step's tokens all at its end. ``engine_options`` replace the cluster file's
        (a benchmark's clairvoyant twin)."""
        self.clock = VirtualClock()
        self.routing = routing or cluster.routing_policy
        self.engine_policy = engine or cluster.engine_policy
        routing_options = cluster.routing_options if self.routing == cluster.routing_policy else {}
        if engine_options is None:
            engine_options = cluster.engine_options if self.engine_policy == cluster.engine_policy else {}
        self.policy = make_routing(self.routing, seed=seed, **routing_options)
        configured = cluster.report_interval_s if report_interval_s is None else report_interval_s
        self.report_interval_s = report_interval(self.policy, configured) if configured > 0 else 0.0
        self.registry = Registry(self.clock.now, timeout_s=float("inf"))
        admission = AdmissionControl(cluster.admission_busy_s, cluster.admission_slack) \
            if cluster.admission == "slo" else None
        self.queue = GlobalQueue(cluster.queue_limit, cluster.shed_at, cluster.queue_order, self.clock.now, admission)
        self.predictor = LengthPredictor()
        self.classes = slo_classes or cluster.slo_classes or DEFAULT_SLO_CLASSES
        self.bin_s = bin_s
        self.request_overhead_s = request_overhead_s
        self.delivery_per_seq_s = delivery_per_seq_s
        self._delivery_rank = 0              # tokens of the current step delivered so far
        self.workers: dict[str, SimWorker] = {}
        for spec in cluster.workers:
            lm = (latency or {}).get(spec.id) or LatencyModel.from_names(spec.gpu_type, spec.model)
            executor = SimExecutor(lm, self.clock, step_overhead_s=step_overhead_s,
                                   seq_overhead_s=step_overhead_per_seq_s)
            blocks = spec.kv_blocks or lm.kv_capacity_tokens() // spec.block_size
            state = self.registry.register(spec.id, address="sim", model=spec.model, gpu_type=spec.gpu_type,
                                           max_model_len=lm.max_model_len, kv_blocks_total=blocks,
                                           block_size=spec.block_size, engine_policy=self.engine_policy,
                                           max_num_seqs=spec.max_num_seqs)
            state.latency, state.capacity_tok_s, state.profile_source = lm, lm.saturated_decode_tok_s(), "datasheet"
            eng = assemble_engine(executor, blocks, spec.block_size, spec.max_num_seqs, spec.max_num_batched_tokens,
                                  self.engine_policy, engine_options, self.clock, on_output=self._on_output,
                                  recent_steps=0, prefix_caching=spec.prefix_caching)
            self.workers[spec.id] = SimWorker(spec, state, eng, executor)
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = itertools.count()
        self._serial = itertools.count()     # numbers prompts, so unshared prompt tokens differ between requests
        self._records: dict[str, RequestRecord] = {}
        self._items: dict[str, ReplayItem] = {}
        self._open = 0                       # requests not yet arrived or not yet ended
        self._finished = 0

    # ----- the run -----------------------------------------------------------------------------------
    def run(self, items: Sequence[ReplayItem], progress: Callable[[int], None] | None = None) -> SimResult:
        for i, item in enumerate(items):
            self._push(item.arrival_s, ARRIVAL, (f"q{i}", item))
        self._open = len(items)
        if self.report_interval_s > 0:
            n = len(self.workers)
            for k, worker in enumerate(self.workers.values()):     # reports spread over the interval
                self._push(self.report_interval_s * k / n, REPORT, worker)
        events = 0
        heap, clock = self._heap, self.clock
        while heap:
            t, _, kind, payload = heapq.heappop(heap)
            if t > clock.now():
                clock.advance(t - clock.now())
            events += 1
            if kind == STEP_DONE:
                done = self._finished
                self._complete(*payload)  # type: ignore[misc]
                if progress is not None and self._finished != done:
                    progress(self._finished)
            elif kind == REPORT:
                self._report(payload)  # type: ignore[arg-type]
            elif kind == ARRIVAL:
                self._arrive(*payload)  # type: ignore[misc]
            else:
                self._enqueue(*payload)  # type: ignore[misc]
        records = list(self._records.values())
        duration = max((r.token_times[-1] for r in records if r.token_times), default=0.0)
        n_bins = int(duration // self.bin_s) + 1
        utilization = {wid: [min(1.0, w.busy_bins.get(b, 0.0) / self.bin_s) for b in range(n_bins)]
                       for wid, w in self.workers.items()}
        return SimResult(records, duration, utilization, self.bin_s, events, self.queue.shed)

    def _push(self, t: float, kind: int, payload: object) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, payload))

    def _end(self, rid: str, error: str = "") -> None:
        if error:
            self._records[rid].error = error
        self._items.pop(rid, None)
        self._open -= 1

    # ----- the balancer's side -----------------------------------------------------------------------
    def _arrive(self, rid: str, item: ReplayItem) -> None:
        slo = item.slo_for(self.classes)
        now = self.clock.now()
        self._records[rid] = RequestRecord(rid, item.slo_class, slo, now, prompt_tokens=item.input_tokens)
        self._items[rid] = item
        lengths, _ = self.predictor.predict(item.slo_class, item.input_tokens, "", item.cap)
        ctx = RouteContext(rid, item.slo_class, item.input_tokens, item.cap, lengths[1], item.priority,
                           item.tenant, slo.ttft_ms, slo.tpot_ms, slo.e2e_ms, slo.sheddable, item.prefix_hashes,
                           predicted_lengths=lengths)
        candidates = self._candidates(item)
        if not candidates:
            self._end(rid, "UNAVAILABLE: no worker can hold it")
            return
        try:
            admission = admit(self.policy, self.registry, self.queue, ctx, candidates, now)
        except QueueFull as e:
            self._end(rid, f"RESOURCE_EXHAUSTED: {e}")
            return
        for victim in admission.evicted:
            self._end(victim.request.request_id, "RESOURCE_EXHAUSTED: evicted")
        if admission.worker is not None:
            self._bound(ctx, admission.worker)

    def _candidates(self, item: ReplayItem) -> list[WorkerState]:
        """The balancer's view of the workers that can ever hold ``item``: their last reports, or their state as
        of now when reports are instant."""
        fits = [w for w in self.workers.values() if w.fits(item)]
        if self.report_interval_s == 0:
            for w in fits:
                self.registry.report(w.spec.id, **w.engine.load())
        return [w.state for w in fits]

    def _report(self, worker: SimWorker) -> None:
        """A worker's periodic load report; as live, the balancer then tries to bind queued requests."""
        self.registry.report(worker.spec.id, **worker.engine.load())
        if self.queue.waiters:
            self._dispatch()
        if self._open > 0:
            self._push(self.clock.now() + self.report_interval_s, REPORT, worker)

    def _dispatch(self) -> None:
        for waiter, roomy in drain(self.queue, self._waiter_candidates):
            self._bound(waiter.request, bind(self.policy, self.registry, self.queue, waiter.request, roomy))

    def _waiter_candidates(self, waiter: Waiter) -> list[WorkerState]:
        return self._candidates(self._items[waiter.request.request_id])

    def _bound(self, ctx: RouteContext, state: WorkerState) -> None:
        self._records[ctx.request_id].worker_id = state.worker_id
        if self.request_overhead_s:
            self._push(self.clock.now() + self.request_overhead_s, ENQUEUE, (state.worker_id, ctx))
        else:
            self._enqueue(state.worker_id, ctx)

    # ----- the workers' side -------------------------------------------------------------------------
    def _enqueue(self, worker_id: str, ctx: RouteContext) -> None:
        """The request reaches the worker's engine, as the live worker's Generate hands it over."""
        worker = self.workers[worker_id]
        item = self._items[ctx.request_id]
        now = self.clock.now()
        worker.engine.submit(Request(
            ctx.request_id, prompt_token_ids(item, next(self._serial)), SamplingParams(max_tokens=item.cap), now,
            priority=item.priority, tenant=item.tenant,
            slo=SloTarget(item.slo_class, ctx.ttft_ms / 1000, ctx.tpot_ms / 1000, ctx.e2e_ms / 1000, ctx.sheddable),
            eos_token_id=worker.executor.tokenizer.eos_token_id, predicted_output_len=ctx.predicted_output,
            predicted_lengths=ctx.predicted_lengths, upstream_s=now - self._records[ctx.request_id].arrival),
            item.output_tokens)
        if not worker.busy:
            self._start(worker)

    def _start(self, worker: SimWorker) -> None:
        out = worker.engine.begin_step()
        if out is None:
            worker.busy = False
            return
        now = self.clock.now()
        end = now + worker.executor.step_time(out)
        worker.busy = True
        b, t = int(now // self.bin_s), now                  # spread the step over the bins it covers
        while t < end:
            edge = min(end, (b + 1) * self.bin_s)
            worker.busy_bins[b] += edge - t
            t, b = edge, b + 1
        self._push(end, STEP_DONE, (worker, out, now))

    def _complete(self, worker: SimWorker, out: SchedulerOutput, start: float) -> None:
        self._delivery_rank = 0
        worker.engine.end_step(out, worker.executor.sample(out), start, self.clock.now() - start)
        self._start(worker)

    def _on_output(self, output: RequestOutput) -> None:
        """A token reached its client; a finished request releases its place at the balancer, which then binds
        what it can from its queue (the live Release does the same, one release at a time)."""
        request = output.request
        rid = request.request_id
        record = self._records[rid]
        if not output.new_token_ids:              # refused by the engine's triage before it ran
            self._finished += 1
            self._end(rid, f"RESOURCE_EXHAUSTED: {output.finish_reason}")
            self.registry.release(rid)
            if self.queue.waiters:
                self._dispatch()
            return
        record.token_times.append(self.clock.now() + self._delivery_rank * self.delivery_per_seq_s)
        self._delivery_rank += 1
        if output.finished:
            self._finished += 1
            record.ok, record.finish_reason = True, output.finish_reason or ""
            record.preemptions = request.num_preemptions
            record.queue_ms = ((request.first_scheduled_time or self.clock.now()) - request.arrival_time) * 1000
            item = self._items[rid]
            self.predictor.observe(item.slo_class, item.input_tokens, "", record.completion_tokens)
            self._end(rid)
            self.registry.release(rid)
            if self.queue.waiters:
                self._dispatch()
