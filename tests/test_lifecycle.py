"""Workers coming and going: graceful drain on SIGTERM, silent workers, failures before the first token."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest

from services.rpc import balancer_pb2, balancer_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2
from services.rpc import worker_pb2_grpc
from tests.helpers import cluster, start_stack, wait_until

pytestmark = pytest.mark.slow


def listed(stack) -> set[str]:
    with grpc.insecure_channel(stack.balancer_address) as channel:
        reply = balancer_pb2_grpc.BalancerStub(channel).ListWorkers(balancer_pb2.ListWorkersRequest(), timeout=5)
    return {w.info.worker_id for w in reply.workers}


@pytest.fixture
def small_stack(tmp_path):
    s = start_stack(cluster("A100-80G", "L40S", "A10"), tmp_path)
    try:
        yield s
    finally:
        s.stop()


def test_sigterm_drains_open_streams_then_exits(small_stack):
    stack = small_stack
    target = stack.cluster.workers[2]          # the A10: slowest, so the stream is still open at SIGTERM

    async def main():
        async with grpc.aio.insecure_channel(stack.worker_address(target.id)) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            call = stub.Generate(worker_pb2.WorkerGenerateRequest(
                request_id="drain-me", prompt="a b c d",
                sampling=common_pb2.SamplingParams(max_tokens=40, temperature=1.0, top_p=1.0, ignore_eos=True)))
            replies = []
            async for reply in call:
                replies.append(reply)
                if len(replies) == 2:
                    stack.processes[f"worker-{target.id}"].popen.send_signal(signal.SIGTERM)
            return replies

    replies = asyncio.run(main())
    assert replies[-1].finish_reason == "length"
    assert sum(len(r.token_ids) for r in replies) == 40
    assert stack.processes[f"worker-{target.id}"].popen.wait(timeout=15) == 0
    assert target.id not in listed(stack)
    # new requests go to the others
    with grpc.insecure_channel(stack.gateway_address) as channel:
        replies = list(gateway_pb2_grpc.GatewayStub(channel).Generate(gateway_pb2.GenerateRequest(prompt="hi",
                                                                                                   max_tokens=3)))
    assert replies[-1].metrics.worker_id != target.id


def test_silent_worker_leaves_rotation_within_2s_and_rejoins(small_stack):
    stack = small_stack
    victim = stack.cluster.workers[0].id
    process = stack.processes[f"worker-{victim}"].popen
    process.send_signal(signal.SIGSTOP)     # alive but silent: no reports, no closed stream
    try:
        took = wait_until(lambda: victim not in listed(stack), 5)
        assert took < 2.0
    finally:
        process.send_signal(signal.SIGCONT)
    wait_until(lambda: victim in listed(stack), 10)


def test_worker_killed_before_first_token_is_retried_elsewhere(small_stack):
    stack = small_stack
    victim = stack.cluster.workers[0]
    stack.kill(f"worker-{victim.id}", signal.SIGKILL)
    # the balancer may still list it for a moment: requests routed there fail before the first token and
    # must be retried on another worker, never surfacing an error to the client
    with grpc.insecure_channel(stack.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for i in range(6):
            replies = list(stub.Generate(gateway_pb2.GenerateRequest(prompt=f"retry {i}", max_tokens=3), timeout=10))
            assert replies[-1].finish_reason == "length"
            assert replies[-1].metrics.worker_id != victim.id
    wait_until(lambda: victim.id not in listed(stack), 2)
    stack.start_worker(victim)                 # a restarted worker rejoins
    wait_until(lambda: victim.id in listed(stack), 10)


def test_gateway_sigterm_lets_streams_finish(small_stack):
    stack = small_stack

    async def main():
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            call = stub.Generate(gateway_pb2.GenerateRequest(prompt="x y", max_tokens=30, ignore_eos=True))
            replies = []
            async for reply in call:
                replies.append(reply)
                if len(replies) == 1:
                    stack.processes["gateway"].popen.send_signal(signal.SIGTERM)
            return replies

    started = time.monotonic()
    replies = asyncio.run(main())
    assert replies[-1].finish_reason == "length" and replies[-1].metrics.completion_tokens == 30
    assert stack.processes["gateway"].popen.wait(timeout=15) == 0
    assert time.monotonic() - started < 15


def test_worker_failing_before_first_token_is_retried_on_another(small_stack):
    """A registered, reporting worker whose Generate cannot be reached: every request still succeeds."""
    stack = small_stack

    async def main():
        async with grpc.aio.insecure_channel(stack.balancer_address) as bch, \
                grpc.aio.insecure_channel(stack.gateway_address) as gch:
            balancer = balancer_pb2_grpc.BalancerStub(bch)
            await balancer.Register(balancer_pb2.RegisterWorkerRequest(worker=balancer_pb2.WorkerInfo(
                worker_id="a-ghost", address="127.0.0.1:9", model="llama-2-7b", gpu_type="H200", executor="sim",
                max_model_len=4096, kv_blocks_total=1000, block_size=16)))

            async def reports():
                while True:
                    yield balancer_pb2.LoadReport(worker_id="a-ghost", kv_blocks_free=1000)
                    await asyncio.sleep(0.1)

            reporting = asyncio.ensure_future(balancer.ReportLoad(reports()))
            await asyncio.sleep(0.3)
            stub = gateway_pb2_grpc.GatewayStub(gch)
            finals = []
            for i in range(6):
                replies = [r async for r in stub.Generate(gateway_pb2.GenerateRequest(prompt=f"p {i}", max_tokens=2),
                                                         timeout=10)]
                finals.append(replies[-1])
            reporting.cancel()
            return finals

    finals = asyncio.run(main())
    assert all(f.finish_reason == "length" and f.metrics.worker_id != "a-ghost" for f in finals)
    log = stack.processes["gateway"].stderr_path.read_text()
    assert log.count('"worker_id": "a-ghost"') >= 3, "the ghost (preferred on ties) was never tried"
