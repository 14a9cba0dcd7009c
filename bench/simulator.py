"""Discrete-event cluster simulator: the real balancer policies and the real engine in virtual time.

Nothing here re-implements a policy. Every worker is a real ``Scheduler`` with a ``BlockManager`` and an engine
policy; its steps take the latency model's predicted time. The balancer side uses the real ``Registry``
accounting, routing policy objects and ``GlobalQueue``, and learns output lengths with the Profiler's
``LengthPredictor``. Events are arrivals and step completions on one heap; the balancer sees each worker's
state as of the moment it routes (the live balancer sees reports up to 200 ms old). A worker that can never
hold a request is skipped, which is where the live gateway's retry would land it.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

from balancer.estimate import kv_tokens_needed
from balancer.queue import GlobalQueue, QueueFull, Waiter, bind, drain, has_room
from balancer.registry import Registry, WorkerState
from balancer.route_context import RouteContext
from balancer.routing import make_policy as make_routing
from bench.metrics import RequestRecord
from bench.replay import ReplayItem
from services.cluster import ClusterSpec, WorkerSpec
from services.latency import BatchShape, LatencyModel
from profiler.predictor import LengthPredictor
from services.slo import DEFAULT_SLO_CLASSES, SloClass
from workers.block_manager import BlockManager
from workers.clock import VirtualClock
from workers.policies import make_policy as make_engine
from workers.request import Request, SamplingParams, SloTarget
from workers.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

ARRIVAL, STEP_DONE, ENQUEUE = 0, 1, 2


@dataclass
class SimWorker:
    spec: WorkerSpec
    state: WorkerState
    latency: LatencyModel                  # or anything with its interface (ProfiledLatency)
    scheduler: Scheduler
    busy: bool = False
    out: SchedulerOutput | None = None
    busy_s: float = 0.0
    busy_bins: dict[int, float] = field(default_factory=lambda: defaultdict(float))

    def sync(self) -> None:
        """What a load report would say, as of now."""
        s, st = self.scheduler, self.state
        st.running, st.waiting = s.num_running, s.num_waiting
        st.kv_blocks_used, st.kv_blocks_free = s.blocks.num_used_blocks, s.blocks.num_free_blocks
        st.pending_prefill_tokens = s.pending_prefill_tokens()
        st.decode_context_tokens = s.decode_context_tokens()
        st.routed_since_report = 0


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
                 step_overhead_s: float = 0.0, step_overhead_per_seq_s: float = 0.0) -> None:
        """``latency`` gives a worker (by id) a latency model other than its datasheet one: a calibrated
        profile, or a ``ProfiledLatency`` for a checkpoint outside the catalog. ``request_overhead_s`` (the
        gateway, routing and tokenizing before the engine sees a request) and ``step_overhead_s`` plus
        ``step_overhead_per_seq_s`` for each further sequence in the batch (the engine loop's own work around a
        forward pass: scheduling, delivering and writing each request's tokens) are the serving stack's costs
        beyond the forward pass, measured at idle."""
        self.clock = VirtualClock()
        self.routing = routing or cluster.routing_policy
        self.engine = engine or cluster.engine_policy
        options = {"seed": seed} if self.routing in ("random", "power_of_two") else {}
        self.policy = make_routing(self.routing, **options)
        self.registry = Registry(self.clock.now, timeout_s=float("inf"))
        self.queue = GlobalQueue(cluster.queue_limit, cluster.shed_at)
        self.predictor = LengthPredictor()
        self.classes = slo_classes or cluster.slo_classes or DEFAULT_SLO_CLASSES
        self.bin_s = bin_s
        self.request_overhead_s, self.step_overhead_s = request_overhead_s, step_overhead_s
        self.step_overhead_per_seq_s = step_overhead_per_seq_s
        self.workers: dict[str, SimWorker] = {}
        for spec in cluster.workers:
            lm = (latency or {}).get(spec.id) or LatencyModel.from_names(spec.gpu_type, spec.model)
            blocks = spec.kv_blocks or lm.kv_capacity_tokens() // 16
            state = self.registry.register(spec.id, address="sim", model=spec.model, gpu_type=spec.gpu_type,
                                           max_model_len=lm.max_model_len, kv_blocks_total=blocks,
                                           block_size=16, engine_policy=self.engine, max_num_seqs=spec.max_num_seqs)
            state.latency, state.capacity_tok_s, state.profile_source = lm, lm.saturated_decode_tok_s(), "datasheet"
            sched = Scheduler(SchedulerConfig(spec.max_num_seqs, spec.max_num_batched_tokens, lm.max_model_len),
                              BlockManager(blocks, 16), make_engine(self.engine), self.clock)
            self.workers[spec.id] = SimWorker(spec, state, lm, sched)
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = itertools.count()
        self._records: dict[str, RequestRecord] = {}
        self._items: dict[str, ReplayItem] = {}

    # ----- the run -----------------------------------------------------------------------------------
    def run(self, items: Sequence[ReplayItem], progress: Callable[[int], None] | None = None) -> SimResult:
        for i, item in enumerate(items):
            self._push(item.arrival_s, ARRIVAL, (f"q{i}", item))
        events = done = 0
        while self._heap:
            t, _, kind, payload = heapq.heappop(self._heap)
            self.clock.advance(max(0.0, t - self.clock.now()))
            events += 1
            if kind == ARRIVAL:
                rid, item = payload  # type: ignore[misc]
                self._arrive(rid, item)
            elif kind == ENQUEUE:
                self._enqueue(*payload)  # type: ignore[misc]
            else:
                done += self._complete(payload)  # type: ignore[arg-type]
                if progress is not None and done:
                    progress(done)
        records = list(self._records.values())
        duration = max((r.token_times[-1] for r in records if r.token_times), default=0.0)
        n_bins = int(duration // self.bin_s) + 1
        utilization = {wid: [min(1.0, w.busy_bins.get(b, 0.0) / self.bin_s) for b in range(n_bins)]
                       for wid, w in self.workers.items()}
        return SimResult(records, duration, utilization, self.bin_s, events, self.queue.shed)

    def _push(self, t: float, kind: int, payload: object) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, payload))

    # ----- the balancer's side -----------------------------------------------------------------------
    def _arrive(self, rid: str, item: ReplayItem) -> None:
        slo = self.classes[item.slo_class]
        now = self.clock.now()
        self._records[rid] = RequestRecord(rid, item.slo_class, slo, now, prompt_tokens=item.input_tokens)
        self._items[rid] = item
        lengths, _ = self.predictor.predict(item.slo_class, item.input_tokens, "", item.output_tokens)
        ctx = RouteContext(rid, item.slo_class, item.input_tokens, item.output_tokens, lengths[1], item.priority,
                           item.tenant, slo.ttft_ms, slo.tpot_ms, slo.e2e_ms, slo.sheddable)
        fits = [w for w in self.workers.values() if self._fits(w, item)]
        if not fits:
            self._records[rid].error = "UNAVAILABLE: no worker can hold it"
            return
        for w in fits:
            w.sync()
        states = [w.state for w in fits]
        need = kv_tokens_needed(ctx)
        if not self.policy.late_binding:
            self._bind(ctx, states)
            return
        roomy = [s for s in states if has_room(s, need)] if not self.queue.waiters else []
        if roomy:
            self._bind(ctx, roomy)
            return
        try:
            _, evicted = self.queue.push(ctx, frozenset(), now + (slo.ttft_ms or slo.e2e_ms) / 1000)
        except QueueFull as e:
            self._records[rid].error = f"RESOURCE_EXHAUSTED: {e}"
            return
        for victim in evicted:
            self._records[victim.request.request_id].error = "RESOURCE_EXHAUSTED: evicted"

    def _fits(self, w: SimWorker, item: ReplayItem) -> bool:
        blocks = w.scheduler.blocks
        return -(-(item.input_tokens + item.output_tokens) // blocks.block_size) <= blocks.num_blocks and \
            item.input_tokens + item.output_tokens <= w.scheduler.config.max_model_len

    def _bind(self, ctx: RouteContext, candidates: list[WorkerState]) -> None:
        choice = bind(self.policy, self.registry, self.queue, ctx, candidates)
        self._records[ctx.request_id].worker_id = choice.worker_id
        if self.request_overhead_s:
            self._push(self.clock.now() + self.request_overhead_s, ENQUEUE, (choice.worker_id, ctx))
        else:
            self._enqueue(choice.worker_id, ctx)

    def _enqueue(self, worker_id: str, ctx: RouteContext) -> None:
        """The request reaches the worker's engine."""
        worker = self.workers[worker_id]
        item = self._items[ctx.request_id]
        slo = self.classes[item.slo_class]
        oracle = self.engine == "oracle"
        worker.scheduler.add_request(Request(
            ctx.request_id, [1] * item.input_tokens, SamplingParams(max_tokens=item.output_tokens, ignore_eos=True),
            self._records[ctx.request_id].arrival, priority=item.priority, tenant=item.tenant,
            slo=SloTarget(item.slo_class, slo.ttft_ms / 1000, slo.tpot_ms / 1000, slo.e2e_ms / 1000, slo.sheddable),
            predicted_output_len=float(item.output_tokens) if oracle else ctx.predicted_output))
        if not worker.busy:
            self._start(worker)

    def _dispatch(self) -> None:
        for waiter, roomy in drain(self.queue, self._candidates):
            self._bind(waiter.request, roomy)

    def _candidates(self, waiter: Waiter) -> list[WorkerState]:
        """Workers that can ever hold the request, with their state as of now."""
        fits = [w for w in self.workers.values() if self._fits(w, self._items[waiter.request.request_id])]
        for w in fits:
            w.sync()
        return [w.state for w in fits]

    # ----- the workers' side -------------------------------------------------------------------------
    def _start(self, worker: SimWorker) -> None:
        out = worker.scheduler.schedule()
        if not out.scheduled:
            worker.busy = False
            return
        step = worker.latency.step_time(BatchShape.of((s.num_new_tokens, s.context_before) for s in out.scheduled)) \
            + self.step_overhead_s + self.step_overhead_per_seq_s * (len(out.scheduled) - 1)
        now = self.clock.now()
        worker.busy, worker.out = True, out
        worker.busy_s += step
        b, t, end = int(now // self.bin_s), now, now + step          # spread the step over the bins it covers
        while t < end:
            edge = min(end, (b + 1) * self.bin_s)
            worker.busy_bins[b] += edge - t
            t, b = edge, b + 1
        self._push(end, STEP_DONE, worker)

    def _complete(self, worker: SimWorker) -> int:
        out, worker.out = worker.out, None
        now = self.clock.now()
        finished = 0
        for result in worker.scheduler.update(out, {s.request.request_id: 7 for s in out.scheduled if s.samples}):
            request = result.request
            record = self._records[request.request_id]
            record.token_times.append(now)
            if result.finished:
                finished += 1
                record.ok, record.finish_reason = True, result.finish_reason or ""
                record.preemptions = request.num_preemptions
                record.queue_ms = ((request.first_scheduled_time or now) - request.arrival_time) * 1000
                self.registry.release(request.request_id)
                item = self._items.pop(request.request_id)
                self.predictor.observe(item.slo_class, item.input_tokens, "", record.completion_tokens)
        if finished and self.queue.waiters:
            self._dispatch()
        self._start(worker)
        return finished
