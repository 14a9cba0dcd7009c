"""A request's own SLO targets and its upstream time, end to end: client -> gateway -> worker engine."""

from __future__ import annotations

import asyncio
import json
import math
from types import SimpleNamespace

import grpc
import pytest

from bench.replay import ReplayItem, replay, set_slo_targets
from bench.scenario import Scenario, Source, build_workload, load_scenario
from services import settings as settings_mod
from services.rpc import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2
from services.slo import DEFAULT_SLO_CLASSES, SloClass, resolve
from services.validation import Invalid, check_slo_target
from tests.helpers import OtlpReceiver, cluster, start_stack, wait_until

TRACE_ID = "5cf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "10f067aa0ba902b7"


# ----- the one rule: services.slo.resolve ---------------------------------------------------------------------
INTERACTIVE = DEFAULT_SLO_CLASSES["interactive"]      # ttft 1000, tpot 100
CODE = DEFAULT_SLO_CLASSES["code"]                    # e2e 2000
BATCH = DEFAULT_SLO_CLASSES["batch"]                  # e2e 60000, sheddable

RESOLVE_TABLE = [
    ("class as is", INTERACTIVE, {}, (1000, 100, 0)),
    ("scaled", INTERACTIVE, dict(scale=2), (2000, 200, 0)),
    ("tighter scale", CODE, dict(scale=0.5), (0, 0, 1000)),
    ("own e2e added", INTERACTIVE, dict(e2e_ms=5000), (1000, 100, 5000)),
    ("own ttft wins over scale", INTERACTIVE, dict(ttft_ms=300, scale=3), (300, 300, 0)),
    ("own target replaces class", CODE, dict(e2e_ms=750), (0, 0, 750)),
    ("zero keeps the class's", CODE, dict(ttft_ms=0, tpot_ms=0, e2e_ms=0), (0, 0, 2000)),
]


@pytest.mark.parametrize("case,cls,kw,want", RESOLVE_TABLE, ids=[c[0] for c in RESOLVE_TABLE])
def test_resolve_table(case, cls, kw, want):
    got = resolve(cls, **kw)
    assert (got.ttft_ms, got.tpot_ms, got.e2e_ms) == pytest.approx(want)
    assert got.sheddable == cls.sheddable


def test_resolve_keeps_sheddable():
    assert resolve(BATCH, e2e_ms=10).sheddable and not resolve(CODE, e2e_ms=10).sheddable


@pytest.mark.parametrize("field", ["ttft_ms", "tpot_ms", "e2e_ms"])
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, -math.inf])
def test_check_slo_target_names_the_field(field, value):
    with pytest.raises(Invalid) as info:
        check_slo_target(field, value)
    assert info.value.field == field and str(info.value).startswith(f"{field}:")


@pytest.mark.parametrize("value", [None, 0.0, 0.5, 1e6])
def test_check_slo_target_accepts_finite_non_negative(value):
    check_slo_target("e2e_ms", value)


# ----- the gateway's resolution, unit level -------------------------------------------------------------------
def test_gateway_resolves_the_request_targets_against_its_classes():
    from gateway.service import GatewayServicer

    cfg = settings_mod.GatewaySettings(slo_classes={"interactive": SloClass(ttft_ms=800, tpot_ms=80),
                                                    "batch": SloClass(e2e_ms=90_000, sheddable=True)})
    fake = SimpleNamespace(cfg=cfg)
    slo = GatewayServicer._slo(fake, gateway_pb2.GenerateRequest(prompt="x", e2e_ms=1500), "interactive")
    assert (slo.ttft_ms, slo.tpot_ms, slo.e2e_ms, slo.sheddable) == (800, 80, 1500, False)
    slo = GatewayServicer._slo(fake, gateway_pb2.GenerateRequest(prompt="x", ttft_ms=0.0), "batch")
    assert (slo.ttft_ms, slo.tpot_ms, slo.e2e_ms, slo.sheddable) == (0, 0, 90_000, True)


# ----- the worker's engine request, unit level ----------------------------------------------------------------
@pytest.fixture(scope="module")
def worker_servicer():
    from services.telemetry import Telemetry
    from workers.build import build_engine
    from workers.clock import RealClock
    from workers.service import WorkerServicer

    cfg = settings_mod.WorkerSettings(worker_id="w-unit", kv_blocks=256)
    clock = RealClock()
    return WorkerServicer(cfg, build_engine(cfg, clock), clock, Telemetry("test"))


def _worker_request(**kw) -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(
        request_id="r1", prompt="one two three", sampling=common_pb2.SamplingParams(max_tokens=8, top_p=1.0),
        slo=common_pb2.SloSpec(slo_class="interactive", ttft_ms=1000, tpot_ms=100, e2e_ms=4500), **kw)


def test_engine_request_carries_targets_upstream_time_and_length_distribution(worker_servicer):
    request = _worker_request(upstream_ms=37.5, predicted_length=common_pb2.LengthPrediction(
        quantiles=[0.1, 0.5, 0.9], lengths=[12.0, 40.0, 150.0], source="model"))
    r = worker_servicer._to_engine_request(request, arrival=100.0)
    assert (r.slo.ttft_s, r.slo.tpot_s, r.slo.e2e_s) == pytest.approx((1.0, 0.1, 4.5))
    assert r.upstream_s == pytest.approx(0.0375)
    assert r.slo_start == pytest.approx(100.0 - 0.0375)
    assert r.predicted_lengths == (12.0, 40.0, 150.0)
    assert r.predicted_output_len == 40.0                     # the median stays the point estimate


def test_engine_request_without_upstream_or_prediction(worker_servicer):
    r = worker_servicer._to_engine_request(_worker_request(), arrival=5.0)
    assert r.upstream_s == 0.0 and r.slo_start == 5.0
    assert r.predicted_lengths == () and r.predicted_output_len is None
    for bad in (-3.0, math.nan, math.inf):                    # never a clock that started in the future or nowhere
        assert worker_servicer._to_engine_request(_worker_request(upstream_ms=bad), arrival=5.0).upstream_s == 0.0


# ----- scenarios and replay items -----------------------------------------------------------------------------
@pytest.fixture()
def trace_file(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"arrival_s": i * 0.5, "input_tokens": 20 + i, "output_tokens": 5}) + "\n"
                            for i in range(6)))
    return path


def test_scenario_slo_scale_doubles_the_class_targets(trace_file, tmp_path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text(f"duration_s: 10\nsources:\n"
                        f"  - {{trace: {trace_file}, slo_class: interactive, slo_scale: 2}}\n"
                        f"  - {{trace: {trace_file}, slo_class: code, e2e_ms: 5000}}\n"
                        f"  - {{trace: {trace_file}, slo_class: batch}}\n")
    items = build_workload(load_scenario(scenario), max_model_len=4096)
    assert len(items) == 18
    by_class = {c: [i for i in items if i.slo_class == c] for c in ("interactive", "code", "batch")}
    for item in by_class["interactive"]:
        slo = item.slo_for(DEFAULT_SLO_CLASSES)
        assert item.overrides_slo and (slo.ttft_ms, slo.tpot_ms, slo.e2e_ms) == (2000, 200, 0)
    for item in by_class["code"]:
        assert item.overrides_slo and item.slo_for(DEFAULT_SLO_CLASSES).e2e_ms == 5000
    for item in by_class["batch"]:
        assert not item.overrides_slo and item.slo_for(DEFAULT_SLO_CLASSES) == BATCH


@pytest.mark.parametrize("bad", [dict(slo_scale=0), dict(slo_scale=-1), dict(slo_scale=math.inf),
                                 dict(ttft_ms=-1), dict(e2e_ms=math.nan), dict(tpot_ms=math.inf)])
def test_scenario_rejects_bad_targets(bad):
    with pytest.raises(ValueError):
        Scenario(sources=[Source(trace="azure-conv", **bad)])


def test_replay_puts_only_the_targets_it_has_on_the_wire():
    request = gateway_pb2.GenerateRequest(prompt="x")
    set_slo_targets(request, resolve(CODE, scale=3))
    assert request.e2e_ms == 6000 and not request.HasField("ttft_ms") and not request.HasField("tpot_ms")


# ----- live: a stack whose spans we receive -------------------------------------------------------------------
@pytest.fixture(scope="module")
def traced_stack(tmp_path_factory):
    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
               "OTEL_EXPORTER_OTLP_INSECURE": "true"}
        stack = start_stack(cluster("A100-80G", "A10"), tmp_path_factory.mktemp("logs"), env)
        try:
            yield stack, receiver
        finally:
            stack.stop()


def _attrs(span) -> dict[str, object]:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.double_value if v.HasField("double_value") else v.int_value if v.HasField("int_value") else \
            v.string_value
    return out


def _span_of(receiver: OtlpReceiver, name: str, request_id: str):
    with receiver._lock:
        spans = list(receiver.spans)
    for _, span in spans:
        inside = str(_attrs(span).get("tandem.request_id", ""))   # the gateway makes a client's id unique inside
        if span.name == name and (inside == request_id or inside.startswith(f"{request_id}~")):
            return span
    return None


@pytest.mark.slow
@pytest.mark.parametrize("field,value", [("ttft_ms", -1.0), ("e2e_ms", math.nan), ("tpot_ms", math.inf)])
def test_live_bad_target_is_invalid_argument_naming_the_field(traced_stack, field, value):
    stack, _ = traced_stack

    async def main():
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [r async for r in stub.Generate(gateway_pb2.GenerateRequest(prompt="hello", **{field: value}),
                                                    timeout=10)]
            ok = [r async for r in stub.Generate(gateway_pb2.GenerateRequest(prompt="hello", max_tokens=2),
                                                 timeout=10)]
            return info.value, ok

    error, ok = asyncio.run(main())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details().startswith(f"{field}:"), error.details()
    assert ok[-1].finish_reason == "length"


@pytest.mark.slow
def test_live_e2e_override_and_upstream_time_reach_the_worker_engine(traced_stack):
    stack, receiver = traced_stack

    async def main():
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            md = (("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01"),)
            request = gateway_pb2.GenerateRequest(prompt="a request with its own deadline", max_tokens=4,
                                                  request_id="own-e2e", e2e_ms=1234.5, tpot_ms=0.0)
            return [r async for r in stub.Generate(request, metadata=md, timeout=10)]

    replies = asyncio.run(main())
    assert replies[-1].finish_reason == "length"
    wait_until(lambda: _span_of(receiver, "worker.generate", "own-e2e") and
               _span_of(receiver, "gateway.generate", "own-e2e"), 10, 0.05)
    worker = _span_of(receiver, "worker.generate", "own-e2e")
    gateway = _span_of(receiver, "gateway.generate", "own-e2e")
    w, g = _attrs(worker), _attrs(gateway)
    # the engine's targets: the request's own E2E, the interactive class's TTFT and TPOT (tpot_ms=0: the class's)
    for attrs in (w, g):
        targets = (attrs["tandem.slo_ttft_ms"], attrs["tandem.slo_tpot_ms"], attrs["tandem.slo_e2e_ms"])
        assert targets == pytest.approx((1000, 100, 1234.5))
    # the time before the worker saw it: positive, and within the gateway's own span, which began before it
    upstream = w["tandem.upstream_ms"]
    assert upstream > 0
    assert upstream <= (worker.start_time_unix_nano - gateway.start_time_unix_nano) / 1e6 + 5


@pytest.mark.slow
def test_live_replay_sends_scaled_targets_and_scores_against_them(traced_stack):
    stack, receiver = traced_stack
    items = [ReplayItem(0.0, 12, 3, "interactive", max_tokens=3, slo_scale=2.0),
             ReplayItem(0.05, 12, 3, "code", max_tokens=3, e2e_ms=9000),
             ReplayItem(0.1, 12, 3, "code", max_tokens=3)]
    records, _ = asyncio.run(replay(stack.gateway_address, items, timeout_s=20))
    assert all(r.ok for r in records), [r.error for r in records]
    by_class = {}
    for r in records:
        by_class.setdefault(r.slo_class, []).append(r)
    (scaled,) = by_class["interactive"]
    assert (scaled.slo.ttft_ms, scaled.slo.tpot_ms, scaled.slo.e2e_ms) == (2000, 200, 0)
    own, plain = sorted(by_class["code"], key=lambda r: r.slo.e2e_ms, reverse=True)
    assert own.slo.e2e_ms == 9000 and plain.slo == CODE
    wanted = {scaled.request_id: (2000, 200, 0), own.request_id: (0, 0, 9000), plain.request_id: (0, 0, 2000)}
    wait_until(lambda: all(_span_of(receiver, "worker.generate", rid) for rid in wanted), 10, 0.05)
    for rid, targets in wanted.items():
        a = _attrs(_span_of(receiver, "worker.generate", rid))
        assert (a["tandem.slo_ttft_ms"], a["tandem.slo_tpot_ms"], a["tandem.slo_e2e_ms"]) == pytest.approx(targets)
