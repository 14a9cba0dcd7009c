"""A real vLLM worker (vLLM's v1 ``AsyncLLM`` on CPU) started by ``tandem up --executor vllm --model PATH``, behind
Tandem's gateway and balancer: greedy output equal to transformers', a cancelled stream freeing vLLM's blocks, load
reports that move, calibration probes through it, and a clean stop on SIGTERM.

vLLM lives in its own environment (``.venv-vllm``, made by ``scripts/dev``); the launcher starts the worker with
that environment's python. CI must run these: under ``CI=true`` a missing vLLM fails instead of skipping."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass

import grpc
import pytest

from services.cluster import WorkerSpec
from services.rpc import balancer_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from tandem.launcher import StackError, worker_python
from tests.helpers import tandem_up, wait_until
from workers.vllm_engine import scheduling_policy

PROMPTS = ["the model of the cluster", "stream batch memory " * 5, "a worker", "cancel the request and free " * 9]


def test_a_tandem_only_engine_policy_is_refused_by_name():
    assert scheduling_policy("fcfs") == "fcfs" and scheduling_policy("priority") == "priority"
    with pytest.raises(ValueError, match="engine_policy: 'sage' is Tandem's own engine's.*fcfs, priority"):
        scheduling_policy("sage")


def vllm_python() -> str:
    try:
        return worker_python(WorkerSpec(id="v", executor="vllm", model="x"))
    except StackError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the vLLM worker test: {e}")
        pytest.skip(str(e))


@dataclass
class Stack:
    """What the tests need of a stack started by `tandem up`."""

    gateway_address: str
    worker_address: str


@pytest.fixture(scope="module")
def vllm_stack(tmp_path_factory):
    """`tandem up --executor vllm --model PATH`, as a user runs it, on a tiny random checkpoint."""
    vllm_python()
    from workers.executors.checkpoint import make_tiny_llama

    folder = make_tiny_llama(tmp_path_factory.mktemp("vllm-llama"), hidden_size=128, num_layers=3, num_heads=2,
                             num_kv_heads=2, intermediate_size=344, vocab_size=512, max_position_embeddings=1024,
                             seed=3)
    proc, address, printed = tandem_up(["--executor", "vllm", "--model", str(folder), "--port", "0",
                                        "--log-dir", str(tmp_path_factory.mktemp("logs"))], timeout=300)
    try:
        with grpc.insecure_channel(address) as channel:
            status = gateway_pb2_grpc.GatewayStub(channel).ClusterStatus(gateway_pb2.ClusterStatusRequest(), timeout=5)
        yield Stack(address, status.workers[0].info.address), folder
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "tandem up did not stop cleanly"


def stats(stack: Stack) -> worker_pb2.WorkerStats:
    with grpc.insecure_channel(stack.worker_address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).GetStats(worker_pb2.GetStatsRequest(), timeout=5)


def reported_load(stack: Stack) -> balancer_pb2.LoadReport:
    """The worker's load as the balancer last heard it (the gateway's cluster status relays the balancer's)."""
    with grpc.insecure_channel(stack.gateway_address) as channel:
        status = gateway_pb2_grpc.GatewayStub(channel).ClusterStatus(gateway_pb2.ClusterStatusRequest(), timeout=5)
    return status.workers[0].load


@pytest.mark.slow
def test_greedy_through_the_gateway_equals_transformers(vllm_stack):
    from tests.test_torch_executor import hf_greedy

    stack, folder = vllm_stack

    async def main():
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)

            async def one(prompt):
                replies = [r async for r in stub.Generate(gateway_pb2.GenerateRequest(
                    prompt=prompt, max_tokens=16, temperature=0.0), timeout=120)]
                return [t for r in replies for t in r.token_ids], "".join(r.text for r in replies), replies[-1]

            return await asyncio.gather(*(one(p) for p in PROMPTS))

    results = asyncio.run(main())
    for (tokens, text, final), want in zip(results, hf_greedy(folder, PROMPTS, 16)):
        assert tokens == want
        assert final.finish_reason == ("length" if len(want) == 16 else "stop")
        assert final.metrics.worker_id == "vllm-0" and final.metrics.completion_tokens == len(want)
        assert final.metrics.ttft_ms > 0 and text
    s = stats(stack)
    assert s.executor == "vllm" and s.engine_policy == "fcfs" and s.finished >= len(PROMPTS)


@pytest.mark.slow
def test_cancelling_a_stream_frees_vllms_blocks_and_load_reports_follow(vllm_stack):
    stack, _ = vllm_stack
    seen: dict[str, object] = {}

    async def main():
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            call = stub.Generate(gateway_pb2.GenerateRequest(prompt=" ".join(["cluster"] * 200), max_tokens=700,
                                                             temperature=0.0, ignore_eos=True), timeout=120)
            got = 0
            async for reply in call:
                got += len(reply.token_ids)
                if got >= 20:
                    seen["busy"] = stats(stack)
                    # the balancer's view moves too (reports every 0.2 s)
                    seen["waited"] = await asyncio.to_thread(
                        wait_until, lambda: reported_load(stack).kv_blocks_used > 0, 3)
                    break
            call.cancel()

    asyncio.run(main())
    busy = seen["busy"]
    assert busy.running == 1 and busy.kv_blocks_used >= 200 // busy.block_size
    wait_until(lambda: stats(stack).kv_blocks_used == 0 and stats(stack).running == 0, 5)
    wait_until(lambda: reported_load(stack).kv_blocks_used == 0, 3)
    assert stats(stack).aborted >= 1


@pytest.mark.slow
def test_calibration_probes_run_through_vllm(vllm_stack):
    stack, _ = vllm_stack
    probes = [worker_pb2.ProbeSpec(prefill_tokens=64), worker_pb2.ProbeSpec(batch=4, context=64)]
    with grpc.insecure_channel(stack.worker_address) as channel:
        reply = worker_pb2_grpc.WorkerStub(channel).Profile(worker_pb2.ProfileRequest(probes=probes, repeats=1),
                                                            timeout=120)
    assert reply.executor == "vllm" and [r.step_ms > 0 for r in reply.results] == [True, True]
    assert stats(stack).kv_blocks_used == 0
