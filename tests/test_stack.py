"""The whole stack as separate processes over gRPC on loopback: what a client of Tandem sees."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time

import grpc
import pytest

from services.rpc import balancer_pb2, balancer_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from tests.helpers import wait_until, worker_stats

pytestmark = pytest.mark.slow


def gen(prompt="the quick brown fox", **kw) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(prompt=prompt, **kw)


async def collect(stub, request, **kw):
    replies = [r async for r in stub.Generate(request, **kw)]
    return replies


def test_32_concurrent_streams_finish_with_correct_metrics(stack):
    async def main():
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            requests = [gen(" ".join(["w"] * (5 + 13 * i)), max_tokens=8 + i, seed=i, request_id=f"req-{i}")
                        for i in range(32)]
            started = time.perf_counter()
            results = await asyncio.gather(*(collect(stub, r) for r in requests))
            return requests, results, time.perf_counter() - started

    requests, results, wall = asyncio.run(main())
    stats = worker_stats(stack)
    assert sum(s.finished for s in stats.values()) >= 32
    assert all(s.iterations > 0 and s.recent_batch_size >= 1 for s in stats.values())
    workers_used = set()
    for request, replies in zip(requests, results):
        final = replies[-1]
        assert [r.finish_reason for r in replies[:-1]] == [""] * (len(replies) - 1)
        assert final.finish_reason == "length" and final.request_id == request.request_id
        tokens = [t for r in replies for t in r.token_ids]
        m = final.metrics
        assert len(tokens) == m.completion_tokens == request.max_tokens
        assert m.prompt_tokens == len(request.prompt.split())
        assert "".join(r.text for r in replies).startswith("[simulated]")
        assert 0 <= m.queue_ms <= m.ttft_ms <= m.e2e_ms <= wall * 1000
        # E2E = TTFT + (n - 1) * TPOT, all measured at the gateway
        assert m.e2e_ms == pytest.approx(m.ttft_ms + (m.completion_tokens - 1) * m.tpot_ms, rel=1e-6, abs=1e-3)
        assert m.tpot_ms > 0 and m.preemptions >= 0
        workers_used.add(m.worker_id)
    assert workers_used == {w.id for w in stack.cluster.workers}
    wait_until(lambda: all(s.kv_blocks_used == 0 for s in worker_stats(stack).values()), 5)


def test_same_seed_same_text(stack):
    async def main():
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            a, b = await asyncio.gather(collect(stub, gen(max_tokens=12, seed=42)), collect(stub, gen(max_tokens=12, seed=42)))
            return "".join(r.text for r in a), "".join(r.text for r in b)

    a, b = asyncio.run(main())
    assert a == b and len(a.split()) == 12


def test_cancelled_stream_frees_its_blocks_at_once(stack):
    before = {w: s.aborted for w, s in worker_stats(stack).items()}

    async def main():
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            call = stub.Generate(gen(" ".join(["w"] * 600), max_tokens=3000, ignore_eos=True))
            got = 0
            async for reply in call:
                got += len(reply.token_ids)
                if got >= 5:
                    break
            used = sum(s.kv_blocks_used for s in worker_stats(stack).values())
            call.cancel()
            return used

    used_while_streaming = asyncio.run(main())
    assert used_while_streaming >= 600 // 16
    took = wait_until(lambda: sum(s.kv_blocks_used for s in worker_stats(stack).values()) == 0, 2)
    assert took < 1.0
    after = {w: s.aborted for w, s in worker_stats(stack).items()}
    assert sum(after.values()) == sum(before.values()) + 1


def test_client_deadline_is_honoured_and_frees_blocks(stack):
    async def main():
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            started = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub, gen(max_tokens=3000, ignore_eos=True), timeout=0.5)
            return info.value.code(), time.perf_counter() - started

    code, elapsed = asyncio.run(main())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and elapsed < 1.5
    wait_until(lambda: sum(s.kv_blocks_used for s in worker_stats(stack).values()) == 0, 2)


BAD_INPUTS = [
    ("empty prompt", dict(prompt=""), "prompt"),
    ("blank prompt", dict(prompt="   \n"), "prompt"),
    ("max_tokens zero", dict(max_tokens=0), "max_tokens"),
    ("max_tokens negative", dict(max_tokens=-3), "max_tokens"),
    ("max_tokens above model limit", dict(max_tokens=5000), "max_tokens"),
    ("prompt plus max_tokens over window", dict(prompt=" ".join(["w"] * 4000), max_tokens=200), "max_tokens"),
    ("negative temperature", dict(temperature=-0.5), "temperature"),
    ("NaN temperature", dict(temperature=math.nan), "temperature"),
    ("infinite temperature", dict(temperature=math.inf), "temperature"),
    ("top_p zero", dict(top_p=0.0), "top_p"),
    ("top_p above one", dict(top_p=1.5), "top_p"),
    ("top_p NaN", dict(top_p=math.nan), "top_p"),
    ("top_k negative", dict(top_k=-1), "top_k"),
    ("unknown slo_class", dict(slo_class="platinum"), "slo_class"),
    ("prompt longer than window", dict(prompt=" ".join(["w"] * 4200), max_tokens=1), "prompt"),
    ("prompt over size limit", dict(prompt="x" * (2 * 1024 * 1024)), "prompt"),
    ("too many stop strings", dict(stop=[str(i) for i in range(20)]), "stop"),
]


@pytest.mark.parametrize("case,fields,field_name", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_invalid_argument_naming_the_field(stack, case, fields, field_name):
    fields = {"prompt": "hello", **fields}

    async def main():
        async with grpc.aio.insecure_channel(stack.gateway_address,
                                             options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub, gen(**fields), timeout=10)
            ok = await collect(stub, gen(max_tokens=3), timeout=10)     # and the stack keeps serving
            return info.value, ok

    error, ok = asyncio.run(main())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details().startswith(f"{field_name}:"), error.details()
    assert ok[-1].finish_reason == "length"


def test_message_over_the_transport_limit_is_refused_cleanly(stack):
    async def main():
        async with grpc.aio.insecure_channel(stack.gateway_address,
                                             options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub, gen(prompt="x" * (20 << 20)), timeout=20)
            ok = await collect(stub, gen(max_tokens=2), timeout=10)
            return info.value.code(), ok

    code, ok = asyncio.run(main())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ok[-1].finish_reason == "length"


def test_cli_generate_and_status(stack):
    out = subprocess.run([sys.executable, "-m", "tandem.cli", "generate", "hello world", "--max-tokens", "6",
                          "--address", stack.gateway_address], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("[simulated]") and len(out.stdout.split()) == 6
    assert "finish: length" in out.stderr
    status = subprocess.run([sys.executable, "-m", "tandem.cli", "status", "--address", stack.gateway_address],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    for spec in stack.cluster.workers:
        assert spec.id in status.stdout and spec.gpu_type in status.stdout
    assert "serving" in status.stdout and "(datasheet)" in status.stdout     # capacity from the Profiler
    assert "% hit" in status.stdout                 # the prefix cache of the worker that served "hello world"
    bad = subprocess.run([sys.executable, "-m", "tandem.cli", "generate", "hi", "--slo-class", "gold",
                          "--address", stack.gateway_address], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "INVALID_ARGUMENT: slo_class" in bad.stderr


def test_health_and_reflection_on_every_service(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    expected = {"gateway": "tandem.v1.Gateway", "balancer": "tandem.v1.Balancer", "profiler": "tandem.v1.Profiler"}
    for name, process in stack.processes.items():
        service = expected.get(name, "tandem.v1.Worker")
        with grpc.insecure_channel(process.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            listing = next(iter(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)))
            names = {s.name for s in listing.list_services_response.service}
            assert service in names and "grpc.health.v1.Health" in names


def test_a_repeated_prompt_is_served_from_the_prefix_cache_and_reports_say_so(stack):
    """A long prompt sent four times to three workers: wherever it comes again, the worker takes it from its
    prefix cache; its stats and the load reports the balancer holds count the hits, the blocks stay cached after
    the requests end, and none is held."""
    prompt = " ".join(f"w{i}" for i in range(400))     # the sim tokenizer: 400 tokens, 25 blocks of 16

    async def main():
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            return [(await collect(stub, gen(prompt, max_tokens=4, ignore_eos=True)))[-1].metrics.worker_id
                    for _ in range(4)]

    before = {w: s.prefix_hit_tokens for w, s in worker_stats(stack).items()}
    served = asyncio.run(main())
    stats = worker_stats(stack)
    repeats = {w: served.count(w) for w in set(served)}
    assert max(repeats.values()) >= 2
    for w, n in repeats.items():
        assert stats[w].prefix_hit_tokens - before[w] >= (n - 1) * (400 - 16), w
        assert stats[w].kv_blocks_cached >= 400 // 16
    wait_until(lambda: all(s.kv_blocks_used == 0 for s in worker_stats(stack).values()), 2)

    def reported() -> bool:
        with grpc.insecure_channel(stack.balancer_address) as channel:
            listing = balancer_pb2_grpc.BalancerStub(channel).ListWorkers(balancer_pb2.ListWorkersRequest())
        loads = {w.info.worker_id: w.load for w in listing.workers}
        return all(loads[w].prefix_hit_tokens == stats[w].prefix_hit_tokens and loads[w].kv_blocks_cached > 0
                   for w, n in repeats.items() if n >= 2)

    wait_until(reported, 3)
