"""Admission control at the balancer (``admission: slo``): table tests of the one rule the live balancer and the
simulator both call, and the cluster file that turns it on."""

from __future__ import annotations

import pytest

from balancer.admission import AdmissionControl
from balancer.registry import WorkerState
from balancer.route_context import RouteContext
from services.catalog import gpu, model
from services.cluster import load_cluster
from services.latency import LatencyModel
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(worker_id: str = "w", queued: int = 0, kv_free: float = 1.0, waiting: int = 0, running: int = 0
           ) -> WorkerState:
    """An A100 running sage with ``queued`` prefill tokens waiting and ``kv_free`` of its cache free."""
    state = WorkerState(worker_id, gpu_type="A100-80G", engine_policy="sage", kv_blocks_total=1000,
                        max_num_seqs=256, step_time_ms=20.0, running=running, waiting=waiting)
    state.kv_blocks_free = int(1000 * kv_free)
    state.pending_prefill_tokens = queued
    state.latency = LatencyModel(gpu("A100-80G"), model("llama-2-7b"))
    return state


INTERACTIVE = RouteContext(request_id="i", slo_class="interactive", prompt_tokens=200, max_tokens=256,
                           tenant="a", ttft_ms=1000, tpot_ms=100)
BATCH = RouteContext(request_id="b", slo_class="batch", prompt_tokens=200, max_tokens=256, tenant="a",
                     e2e_ms=60_000, sheddable=True)
TIGHT = RouteContext(request_id="t", slo_class="interactive", prompt_tokens=200, max_tokens=256, tenant="a",
                     ttft_ms=5, tpot_ms=100)

TABLE = [
    # case, request, workers, tenants in flight, admitted, admitted to (or the refusal's words)
    ("idle cluster takes interactive", INTERACTIVE, [worker()], {}, True, {"w"}),
    ("idle cluster takes batch", BATCH, [worker()], {}, True, {"w"}),
    ("busy cluster sheds batch", BATCH, [worker(queued=20_000)], {}, False, "sheddable work is refused"),
    ("batch goes only to the idle worker", BATCH, [worker("busy", queued=20_000), worker("idle")], {}, True,
     {"idle"}),
    ("full KV cache is busy for batch", BATCH, [worker(kv_free=0.01, waiting=3)], {}, False, "sheddable"),
    ("busy cluster still takes interactive it can serve", INTERACTIVE, [worker(queued=4_000)], {}, True, {"w"}),
    ("hopeless interactive is refused", INTERACTIVE, [worker(queued=400_000)], {}, False,
     "no worker can meet the request's SLO"),
    ("target nobody can meet", TIGHT, [worker()], {}, False, "no worker can meet"),
    ("tenant over its share on a busy cluster", INTERACTIVE, [worker(queued=4_000)], {"a": 30, "b": 2}, False,
     "holds more than its share"),
    ("tenant under its share on a busy cluster", INTERACTIVE, [worker(queued=4_000)], {"a": 2, "b": 30}, True,
     {"w"}),
    ("a lone tenant has no share to exceed", INTERACTIVE, [worker(queued=4_000)], {"a": 30}, True, {"w"}),
]


@pytest.mark.parametrize("case,r,workers,tenants,admitted,detail", TABLE, ids=[c[0] for c in TABLE])
def test_admission_table(case, r, workers, tenants, admitted, detail):
    control = AdmissionControl()
    for tenant in tenants:                      # tenants with requests in flight count towards the share
        control.seen[tenant] = 0.0
    refusal = control.check(r, workers, tenants, now=1.0)
    if admitted:
        assert refusal is None, refusal
        assert {w.worker_id for w in control.feasible} == detail
    else:
        assert refusal is not None and detail in refusal.reason
        assert refusal.retry_s >= 0.1            # a refusal always says when to come back


def test_refusals_are_counted():
    control = AdmissionControl()
    control.check(BATCH, [worker(queued=20_000)], {}, now=0.0)
    control.check(INTERACTIVE, [worker()], {}, now=0.0)
    assert control.refused == 1


def test_the_guarded_cluster_file_turns_it_on_and_the_default_does_not():
    guarded = load_cluster(ROOT / "bench" / "data" / "guarded_cluster.yaml")
    assert guarded.admission == "slo" and guarded.engine_options.get("refuse_late") is True
    assert load_cluster(None).admission == "off"
