"""Coalescing streams: the gateway's relay batches what arrived during a slow write, and a worker's
``stream_interval_ms`` sends the tokens of several steps in one message; nothing is lost or reordered."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.coalesce import coalesced
from services.cluster import ClusterSpec, WorkerSpec
from services import rpc
from services.rpc import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.helpers import start_stack


async def source(items, gap=0.0, fail=None):
    for i in items:
        await asyncio.sleep(gap)
        yield i
    if fail is not None:
        raise fail


async def consume(stream, work=0.0):
    batches = []
    async for batch in coalesced(stream):
        batches.append(batch)
        await asyncio.sleep(work)
    return batches


def test_a_consumer_that_keeps_up_gets_one_item_a_batch():
    batches = asyncio.run(consume(source(range(20), gap=0.002)))
    assert batches == [[i] for i in range(20)]


def test_a_slow_consumer_gets_everything_in_order_in_fewer_batches():
    batches = asyncio.run(consume(source(range(200), gap=0.0005), work=0.02))
    assert [i for b in batches for i in b] == list(range(200))
    assert len(batches) < 60


def test_an_error_comes_after_the_items_before_it():
    async def main():
        got = []
        with pytest.raises(ValueError, match="worker gone"):
            async for batch in coalesced(source(range(5), fail=ValueError("worker gone"))):
                got.extend(batch)
        return got

    assert asyncio.run(main()) == list(range(5))


@pytest.mark.slow
def test_a_stream_interval_puts_several_steps_tokens_in_one_message(tmp_path):
    stack = start_stack(ClusterSpec(workers=[WorkerSpec(id="w0", time_scale=0.2)]), tmp_path,
                        env={"TANDEM_STREAM_INTERVAL_MS": "40"})
    try:
        async def main():
            async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                return [r async for r in stub.Generate(gateway_pb2.GenerateRequest(
                    prompt="the quick brown fox", max_tokens=60, ignore_eos=True, temperature=0.0), timeout=60)]

        replies = asyncio.run(main())
    finally:
        stack.stop()
    tokens = [t for r in replies for t in r.token_ids]
    assert len(tokens) == 60 and replies[-1].metrics.completion_tokens == 60
    assert len(replies[0].token_ids) == 1           # the first token is not held back
    assert len(replies) < 30                        # ~3 ms steps: 40 ms carries several tokens a message


@pytest.mark.slow
def test_a_small_receive_window_makes_a_worker_batch_tokens_for_a_reader_that_falls_behind(tmp_path):
    """The gateway's worker channels (``worker_stream_window_bytes``): a reader that takes 25 ms a message holds
    the worker's next write, and the tokens of the steps meanwhile go out together. With gRPC's default window
    the same reader is sent one message a token, queued up for it."""
    stack = start_stack(ClusterSpec(workers=[WorkerSpec(id="w0", time_scale=0.2)]), tmp_path)
    try:
        async def read_slowly(window: int, n: int) -> list[worker_pb2.WorkerGenerateResponse]:
            async with rpc.channel(stack.worker_address("w0"), stream_window_bytes=window) as channel:
                call = worker_pb2_grpc.WorkerStub(channel).Generate(worker_pb2.WorkerGenerateRequest(
                    request_id=f"slow-{window}", prompt="the quick brown fox",
                    sampling=common_pb2.SamplingParams(max_tokens=n, temperature=0.0, top_p=1.0, ignore_eos=True)),
                    timeout=60)
                replies = []
                async for reply in call:
                    replies.append(reply)
                    await asyncio.sleep(0.025)
                return replies

        small = asyncio.run(read_slowly(256, 120))
        default = asyncio.run(read_slowly(0, 120))
    finally:
        stack.stop()
    for replies in (small, default):
        assert [len(r.token_ids) for r in replies].count(0) <= 1 and replies[-1].finish_reason == "length"
        assert sum(len(r.token_ids) for r in replies) == 120
    print(f"\nmessages for 120 tokens: window 256 B {len(small)}, default window {len(default)}")
    assert len(default) >= 100            # every step's token queued as its own message
    assert len(small) <= 60               # the worker waited for the reader, and batched meanwhile


@pytest.mark.slow
def test_streams_whose_reader_stopped_do_not_hold_up_the_others_on_the_same_connection(tmp_path):
    """The small window is per stream: 20 streams nobody reads any more (a client that went quiet) leave the
    connection's other streams at full speed."""
    stack = start_stack(ClusterSpec(workers=[WorkerSpec(id="w0", time_scale=0.2)]), tmp_path)
    try:
        async def main() -> tuple[float, int]:
            async with rpc.channel(stack.worker_address("w0"), stream_window_bytes=256) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)

                def call(name: str, n: int):
                    return stub.Generate(worker_pb2.WorkerGenerateRequest(
                        request_id=name, prompt="the quick brown fox",
                        sampling=common_pb2.SamplingParams(max_tokens=n, temperature=0.0, top_p=1.0, ignore_eos=True)),
                        timeout=60)

                stuck = [call(f"stuck-{i}", 2000) for i in range(20)]
                for s in stuck:
                    await s.read()                       # the first message, then nothing more is read
                await asyncio.sleep(0.5)                 # their windows are full by now
                started = asyncio.get_running_loop().time()
                tokens = sum([len(r.token_ids) async for r in call("reader", 100)])
                took = asyncio.get_running_loop().time() - started
                for s in stuck:
                    s.cancel()
                return took, tokens

        took, tokens = asyncio.run(main())
    finally:
        stack.stop()
    print(f"\n100 tokens beside 20 stalled streams in {took:.2f} s")
    assert tokens == 100 and took < 5.0
