"""Gateway leases at the balancer: a gateway that dies without releasing its requests stops counting against
their workers once its lease lapses; a gateway that renews keeps its bindings."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

from balancer.registry import Assignment, Registry
from services.rpc import balancer_pb2, balancer_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from tests.helpers import cluster, start_stack, wait_until


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def registry_with(*bindings: tuple[str, str]) -> tuple[Registry, FakeClock]:
    clock = FakeClock()
    registry = Registry(clock, timeout_s=1e9)
    registry.register("w", address="127.0.0.1:1")
    for request_id, gateway_id in bindings:
        registry.acquire(request_id, Assignment("w", 1.0, 100, 10, gateway_id))
    return registry, clock


LEASE_TABLE = [
    # case, bindings, renewals (time, gateway), check time, outstanding left
    ("silent gateway lapses", [("r1", "g1"), ("r2", "g1")], [], 11.0, 0),
    ("renewed gateway keeps", [("r1", "g1")], [(8.0, "g1")], 11.0, 1),
    ("only the dead one goes", [("r1", "g1"), ("r2", "g2")], [(8.0, "g2")], 11.0, 1),
    ("not yet lapsed", [("r1", "g1")], [], 9.0, 1),
    ("no gateway id: no lease", [("r1", "")], [], 100.0, 1),
]


@pytest.mark.parametrize("case,bindings,renewals,at,left", LEASE_TABLE, ids=[c[0] for c in LEASE_TABLE])
def test_lease_table(case, bindings, renewals, at, left):
    registry, clock = registry_with(*bindings)
    for t, gateway in renewals:
        clock.t = t
        registry.renew(gateway)
    clock.t = at
    registry.expire_leases(10.0)
    state = registry.workers["w"]
    assert state.outstanding == left
    assert (state.assigned_tokens, state.assigned_work_s) == (100 * left, 1.0 * left)


def test_renew_counts_the_gateways_bindings():
    registry, _ = registry_with(("r1", "g1"), ("r2", "g1"), ("r3", "g2"))
    assert registry.renew("g1") == 2 and registry.renew("g3") == 0


def outstanding(balancer_address: str) -> tuple[int, int]:
    with grpc.insecure_channel(balancer_address) as channel:
        listing = balancer_pb2_grpc.BalancerStub(channel).ListWorkers(balancer_pb2.ListWorkersRequest(), timeout=5)
    return sum(w.outstanding for w in listing.workers), listing.lease_released_total


@pytest.mark.slow
def test_a_dead_gateways_requests_are_released_after_its_lease(tmp_path):
    spec = cluster("A10", routing="least_outstanding", time_scale=20.0)   # slow steps: answers take seconds
    stack = start_stack(spec, tmp_path, env={"TANDEM_GATEWAY_LEASE_S": "1.5"})
    try:
        async def start_streams(n: int) -> None:
            channel = grpc.aio.insecure_channel(stack.gateway_address)
            stub = gateway_pb2_grpc.GatewayStub(channel)
            calls = [stub.Generate(gateway_pb2.GenerateRequest(prompt=f"a long answer {i}", max_tokens=400,
                                                               ignore_eos=True)) for i in range(n)]
            for call in calls:
                await call.read()              # each has its first token: bound and running
            stack.kill("gateway", signal.SIGKILL)
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError):
                    while (await call.read()) is not grpc.aio.EOF:
                        pass
            await channel.close(grace=None)

        asyncio.run(start_streams(3))
        held, _ = outstanding(stack.balancer_address)
        assert held == 3, "the balancer should still count the dead gateway's requests until its lease lapses"
        waited = wait_until(lambda: outstanding(stack.balancer_address)[0] == 0, timeout=10)
        assert 0.5 < waited < 6
        assert outstanding(stack.balancer_address)[1] == 3
    finally:
        stack.stop()
