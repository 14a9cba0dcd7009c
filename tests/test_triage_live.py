"""Engine triage through the live stack: a sheddable request that can no longer meet its SLO is refused with
RESOURCE_EXHAUSTED and a retry hint, passed through the gateway unretried; one that is not sheddable still runs."""

from __future__ import annotations

import grpc
import pytest

from services.cluster import ClusterSpec, WorkerSpec
from services.rpc import gateway_pb2, gateway_pb2_grpc
from tests.helpers import start_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    spec = ClusterSpec(engine={"name": "sage", "refuse_sheddable": True},
                       workers=[WorkerSpec(id="a", gpu_type="A100-80G"), WorkerSpec(id="b", gpu_type="A10")])
    s = start_stack(spec, tmp_path_factory.mktemp("triage"))
    yield s
    s.stop()


def generate(stack, **fields):
    with grpc.insecure_channel(stack.gateway_address) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).Generate(
            gateway_pb2.GenerateRequest(prompt="w " * 30, max_tokens=4, **fields), timeout=10)
        try:
            return list(call), grpc.StatusCode.OK, {}
        except grpc.RpcError as e:
            return [], e.code(), dict(e.trailing_metadata() or ())


def test_a_sheddable_lost_cause_is_refused_with_a_retry_hint(stack):
    replies, code, trailing = generate(stack, slo_class="batch", e2e_ms=0.001)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and not replies
    assert int(trailing["retry-after-ms"]) >= 100


@pytest.mark.parametrize("fields", [dict(slo_class="code", e2e_ms=0.001),          # late, but not sheddable
                                    dict(slo_class="batch"), dict(slo_class="interactive")])
def test_other_requests_are_served(stack, fields):
    replies, code, _ = generate(stack, **fields)
    assert code is grpc.StatusCode.OK and replies[-1].finish_reason == "length"
    assert replies[-1].metrics.completion_tokens == 4
