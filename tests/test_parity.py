"""Parity: the live balancer servicer with in-process engines on a virtual clock, and the simulator, make the same
routing decisions on the same workload.

The live side here is the real ``BalancerServicer`` (Register, the ReportLoad stream, Route, Release, its queue)
and one real ``Engine`` per worker around the sim executor, driven by a small event loop of this test's own:
arrivals call Route as the gateway would, a bound request is submitted to its worker's engine as the worker's
Generate does, engines step by the sim executor's predicted time, each worker streams ``Engine.load()`` every
report interval, and a finished request is released. Nothing of the simulator is used on that side.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

import pytest

from balancer.service import BalancerServicer
from bench.replay import ReplayItem
from bench.scenario import Scenario, Source, build_workload
from bench.simulator import Simulator
from profiler.predictor import LengthPredictor
from services.cluster import ClusterSpec, WorkerSpec
from services.latency import LatencyModel
from services.profiles import datasheet_profile, latency_model
from services.rpc import balancer_pb2, common_pb2
from services.settings import BalancerSettings
from services.slo import DEFAULT_SLO_CLASSES
from services.telemetry import Telemetry
from workers.build import assemble_engine
from workers.clock import VirtualClock
from workers.executors.sim import SimExecutor
from workers.request import Request, SamplingParams, SloTarget

CLUSTER = ClusterSpec(workers=[WorkerSpec(id="a100", gpu_type="A100-80G", max_num_seqs=6),
                               WorkerSpec(id="l40s", gpu_type="L40S", max_num_seqs=4),
                               WorkerSpec(id="a10", gpu_type="A10", max_num_seqs=2)], queue_limit=128)


class Context:
    """Enough of a grpc.aio.ServicerContext for the servicer's paths this test takes."""

    async def abort(self, code, details):
        raise AssertionError(f"aborted: {code} {details}")

    def set_trailing_metadata(self, md):
        pass


class Reports:
    """A worker's ReportLoad stream: the test pushes ``Engine.load()`` snapshots into it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.queue.get()


async def live_decisions(items: list[ReplayItem], routing: str, engine_policy: str, interval: float
                         ) -> tuple[dict[str, str], int]:
    """Each request's worker as the live servicer chose it, and the longest its queue grew."""
    clock = VirtualClock()
    servicer = BalancerServicer(BalancerSettings(routing_policy=routing, report_interval_s=interval,
                                                 queue_limit=CLUSTER.queue_limit, shed_at=CLUSTER.shed_at,
                                                 worker_timeout_s=1e9), Telemetry("parity"), clock=clock.now)
    predictor = LengthPredictor()
    ctx = Context()
    engines, executors, streams, busy = {}, {}, {}, {}
    heap: list = []
    seq = itertools.count()
    decided: dict[str, str] = {}
    open_requests = len(items)
    tasks = []
    peak_queue = 0

    def push(t, kind, payload):
        heapq.heappush(heap, (t, next(seq), kind, payload))

    def start(wid):
        out = engines[wid].begin_step()
        busy[wid] = out is not None
        if out is not None:
            push(clock.now() + executors[wid].step_time(out), 2, (wid, out, clock.now()))

    finished: list[str] = []

    for spec in CLUSTER.workers:
        lm = LatencyModel.from_names(spec.gpu_type, spec.model)
        executors[spec.id] = ex = SimExecutor(lm, clock)
        blocks = lm.kv_capacity_tokens() // spec.block_size
        engines[spec.id] = assemble_engine(ex, blocks, spec.block_size, spec.max_num_seqs,
                                           spec.max_num_batched_tokens, engine_policy, {}, clock,
                                           on_output=lambda o: finished.append(o.request.request_id)
                                           if o.finished else None)
        reply = await servicer.Register(balancer_pb2.RegisterWorkerRequest(worker=balancer_pb2.WorkerInfo(
            worker_id=spec.id, address=f"in-process/{spec.id}", model=spec.model, gpu_type=spec.gpu_type,
            max_model_len=lm.max_model_len, kv_blocks_total=blocks, block_size=spec.block_size,
            engine_policy=engine_policy, max_num_seqs=spec.max_num_seqs)), ctx)
        state = servicer.registry.workers[spec.id]        # what _learn_capacity takes from the Profiler
        state.latency = latency_model(datasheet_profile(spec.model, spec.gpu_type))
        state.capacity_tok_s, state.profile_source = state.latency.saturated_decode_tok_s(), "datasheet"
        streams[spec.id] = Reports()
        tasks.append(asyncio.create_task(servicer.ReportLoad(streams[spec.id], ctx)))
        busy[spec.id] = False
    rate = reply.report_interval_s

    async def route(rid: str, item: ReplayItem) -> None:
        slo = DEFAULT_SLO_CLASSES[item.slo_class]
        lengths, _ = predictor.predict(item.slo_class, item.input_tokens, "", item.cap)
        choice = await servicer.Route(balancer_pb2.RouteRequest(
            request_id=rid, slo_class=item.slo_class, max_tokens=item.cap, prompt_tokens_estimate=item.input_tokens,
            predicted_length=common_pb2.LengthPrediction(lengths=lengths), sheddable=slo.sheddable,
            slo=common_pb2.SloSpec(slo_class=item.slo_class, ttft_ms=slo.ttft_ms, tpot_ms=slo.tpot_ms,
                                   e2e_ms=slo.e2e_ms, sheddable=slo.sheddable)), ctx)
        decided[rid] = choice.worker_id
        engines[choice.worker_id].submit(Request(
            rid, [1] * item.input_tokens, SamplingParams(max_tokens=item.cap), clock.now(),
            slo=SloTarget(item.slo_class, slo.ttft_ms / 1000, slo.tpot_ms / 1000, slo.e2e_ms / 1000, slo.sheddable),
            eos_token_id=0, predicted_output_len=lengths[1], predicted_lengths=tuple(lengths)), item.output_tokens)
        if not busy[choice.worker_id]:
            start(choice.worker_id)

    async def settle() -> None:
        for _ in range(4):
            await asyncio.sleep(0)

    for i, item in enumerate(items):
        push(item.arrival_s, 0, (f"q{i}", item))
    for k, spec in enumerate(CLUSTER.workers):             # reports spread over the interval, as workers start
        push(rate * k / len(CLUSTER.workers), 3, spec.id)
    by_id = {f"q{i}": item for i, item in enumerate(items)}
    while heap:
        t, _, kind, payload = heapq.heappop(heap)
        if t > clock.now():
            clock.advance(t - clock.now())
        if kind == 0:
            tasks.append(asyncio.create_task(route(*payload)))
        elif kind == 2:
            wid, out, began = payload
            engines[wid].end_step(out, executors[wid].sample(out), began, clock.now() - began)
            for rid in finished:
                predictor.observe(by_id[rid].slo_class, by_id[rid].input_tokens, "", by_id[rid].output_tokens)
                await servicer.Release(balancer_pb2.ReleaseRequest(request_id=rid, worker_id=wid), ctx)
                open_requests -= 1
            finished.clear()
            await settle()
            start(wid)
        else:
            streams[payload].queue.put_nowait(balancer_pb2.LoadReport(worker_id=payload, **engines[payload].load()))
            if open_requests > 0:
                push(clock.now() + rate, 3, payload)
        await settle()
        peak_queue = max(peak_queue, len(servicer.queue))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return decided, peak_queue


@pytest.mark.parametrize("pair", ["capacity/fcfs", "llmd/fcfs", "token_aware/fcfs", "round_robin/fcfs",
                                  "token_aware/sage"])
@pytest.mark.parametrize("interval", [0.2])
async def test_live_servicer_and_simulator_route_alike(pair, interval):
    scenario = Scenario(name="parity", duration_s=30, rate_scale=20.0,
                        sources=[Source(trace="azure-conv", slo_class="interactive"),
                                 Source(trace="azure-code", slo_class="code")])
    items = build_workload(scenario, 4096)
    route, engine = pair.split("/")
    live, peak_queue = await live_decisions(items, route, engine, interval)
    sim = Simulator(CLUSTER, route, engine, report_interval_s=interval).run(items)
    simulated = {r.request_id: r.worker_id for r in sim.records}
    assert len(live) == len(items) and all(r.ok for r in sim.records)
    assert len(set(live.values())) == 3                     # every worker was used: decisions were real
    if route in ("capacity", "token_aware") and engine == "fcfs":
        assert peak_queue >= 10                             # and the balancer's queue held requests back
    if engine == "sage":
        assert peak_queue == 0                              # in front of engines that triage, it binds at once
    assert live == simulated
