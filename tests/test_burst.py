"""A burst of thousands of concurrent streams on one client channel at the default ``tandem up`` stack (issue 10).

Every request must end OK or with a documented status; none may end CANCELLED when the client cancelled
nothing. The CANCELLEDs came from gRPC core, not from Tandem's code: a grpc.aio server takes one call at a time
from core, so a burst waits in core's pending queue, and core drops what is over
``grpc.server.max_pending_requests`` (1000, at random, up to the hard limit of 3000) or older than
``grpc.server_max_unrequested_time_in_server`` (30 s) by cancelling it before any handler, interceptor or log
line has run.

The stack is the one ``tandem up`` starts (``tandem.cli._stack`` with no cluster file: the embedded default
cluster, three sim workers at their default ``time_scale``). The prompts are 20-420 words and the classes mixed,
as in the issue; ``max_tokens`` is 8-16 rather than the issue's 32-96 to keep the test near a minute on two
cores (the burst's arrival, not its length, is what overflows the queue). With 32-96 the same holds: 5,000
streams take about 90 s there and their late arrivals also wait in core past its 30 s limit.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time

import grpc
import pytest

from services.rpc import gateway_pb2, gateway_pb2_grpc
from tests.helpers import wait_until, worker_stats

pytestmark = pytest.mark.slow

CLASSES = ("interactive", "code", "batch")
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
         "def return import class lambda yield async await").split()
MAX_TOKENS = (8, 16)
BURST_LIMIT_S = 240.0     # a hang fails the test with the counts so far instead of running into pytest's timeout


@pytest.fixture(scope="module")
def default_stack(tmp_path_factory):
    """The default stack exactly as ``tandem up`` builds it, on a free gateway port."""
    from tandem.cli import _stack

    stack = _stack(None, 0, None, tmp_path_factory.mktemp("burst-logs"))
    assert [w.id for w in stack.cluster.workers] == ["a100-0", "l40s-0", "a10-0"]     # the embedded default
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def requests_for(n: int, seed: int) -> list[gateway_pb2.GenerateRequest]:
    rng = random.Random(seed)
    return [gateway_pb2.GenerateRequest(
        prompt=" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 420))),
        max_tokens=rng.randint(*MAX_TOKENS), slo_class=CLASSES[i % len(CLASSES)], request_id=f"burst-{seed}-{i}")
        for i in range(n)]


async def one(stub: gateway_pb2_grpc.GatewayStub, request: gateway_pb2.GenerateRequest) -> tuple[str, str, str]:
    """(status, details, retry-after-ms) of one stream; an OK stream must end with its final message."""
    finals, tokens = [], 0
    try:
        async for reply in stub.Generate(request):
            tokens += len(reply.token_ids)
            if reply.finish_reason:
                finals.append(reply)
    except grpc.aio.AioRpcError as e:
        trailing = dict(e.trailing_metadata() or ())
        return e.code().name, e.details() or "", trailing.get("retry-after-ms", "")
    if len(finals) != 1 or finals[0].request_id != request.request_id or tokens > request.max_tokens:
        return "OK-BUT-MALFORMED", f"{len(finals)} final messages, {tokens} tokens", ""
    return "OK", "", ""


def burst(address: str, requests: list[gateway_pb2.GenerateRequest]) -> tuple[list[tuple[str, str, str]], float]:
    """All ``requests`` at once, over one channel; each one's outcome, and the wall time."""

    async def main() -> tuple[list[tuple[str, str, str]], float]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            started = time.perf_counter()
            tasks = [asyncio.ensure_future(one(stub, r)) for r in requests]
            done, pending = await asyncio.wait(tasks, timeout=BURST_LIMIT_S)
            for task in pending:
                task.cancel()
            outcomes = [t.result() if t in done else ("HUNG", f"no end within {BURST_LIMIT_S:.0f} s", "")
                        for t in tasks]
            return outcomes, time.perf_counter() - started

    return asyncio.run(main())


def documented(outcome: tuple[str, str, str]) -> bool:
    """OK, or shed with RESOURCE_EXHAUSTED and a retry hint in milliseconds (docs: Errors)."""
    code, _, retry_after_ms = outcome
    return code == "OK" or (code == "RESOURCE_EXHAUSTED" and retry_after_ms.isdigit() and int(retry_after_ms) > 0)


@pytest.mark.parametrize("n", [2000, 5000])
def test_burst_of_concurrent_streams_ends_ok_or_documented(default_stack, n):
    outcomes, wall = burst(default_stack.gateway_address, requests_for(n, seed=n))
    counts = collections.Counter(code for code, _, _ in outcomes)
    kinds = collections.Counter((code, details[:80]) for code, details, _ in outcomes if code != "OK")
    summary = f"{n} streams in {wall:.1f} s: {dict(counts)}; not OK: {kinds.most_common(5)}"
    assert counts["CANCELLED"] == 0, summary
    assert all(documented(o) for o in outcomes), summary
    assert counts["OK"] >= n // 2, summary        # shedding is allowed, refusing most of a burst is not
    # nothing left behind on the workers: every stream closed, every KV block back
    wait_until(lambda: all(s.open_streams == 0 and s.kv_blocks_used == 0
                           for s in worker_stats(default_stack).values()), 15)
