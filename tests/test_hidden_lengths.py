"""Hidden output lengths: nothing that schedules may know how long an answer will be.

A replayed request's true length reaches the executor's stop rule and a clairvoyant reference's named path,
nothing else. Proved three ways: the source names it only where allowed; a simulated run makes the same
routing, queueing and engine decisions whatever the hidden lengths are, up to the first finish; and a live
worker ends a replayed answer at its true length although the request asked for far more.
"""

from __future__ import annotations

import ast
import dataclasses
import random
from pathlib import Path

import grpc
import pytest

from bench.replay import ReplayItem
from bench.simulator import Simulator
from services.cluster import ClusterSpec, WorkerSpec

ROOT = Path(__file__).resolve().parent.parent
HIDDEN_NAMES = {"replay_truth", "true_lengths", "TrueLengths", "true_output_len", "ReplayTruth"}
# where the true length may be named: the benchmark side (bench/, the client that knows the trace), the
# pass-through of the request, the executor's stop rule, the one clairvoyant reference, and the SLO-aware
# policies' clairvoyant twins (only through the engine option ``clairvoyant``); a vLLM worker's stop rule is vLLM's
# own max_tokens check (its fcfs and priority schedulers order requests without it)
ALLOWED = {"workers/vllm_engine.py", "gateway/service.py", "workers/service.py", "workers/engine.py",
           "workers/build.py", "workers/true_lengths.py", "workers/executors/base.py", "workers/executors/sim.py",
           "workers/executors/torch_executor.py", "workers/policies/oracle.py", "workers/policies/base.py",
           "workers/policies/slo_aware.py"}


def test_only_the_stop_rule_and_the_named_clairvoyant_path_mention_true_lengths():
    found = {}
    for package in ("services", "gateway", "balancer", "workers", "profiler", "bench", "tandem"):
        for path in (ROOT / package).rglob("*.py"):
            if "proto" in path.parts:
                continue
            names = {n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else n.arg
                     for n in ast.walk(ast.parse(path.read_text()))
                     if isinstance(n, (ast.Name, ast.Attribute, ast.arg))}
            if names & HIDDEN_NAMES:
                found[str(path.relative_to(ROOT))] = sorted(names & HIDDEN_NAMES)
    outside = {k: v for k, v in found.items() if k not in ALLOWED and not k.startswith("bench/")}
    assert not outside, outside
    # the scheduling packages never do
    assert not [k for k in found if k.split("/")[0] in ("balancer", "profiler")]
    assert not [k for k in found if k.startswith("workers/") and k.split("/")[1] in ("scheduler.py", "request.py")]


class Recording(Simulator):
    """The simulator, noting every binding and every engine step with its time."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.log: list[tuple] = []
        self.first_finish = float("inf")

    def _bound(self, ctx, state) -> None:
        self.log.append((self.clock.now(), "bind", ctx.request_id, state.worker_id, ctx.max_tokens,
                         ctx.predicted_output))
        super()._bound(ctx, state)

    def _start(self, worker) -> None:
        super()._start(worker)
        if worker.busy:
            out = self._heap_last_step(worker)
            self.log.append((self.clock.now(), "step", worker.spec.id,
                             tuple((s.request.request_id, s.num_new_tokens) for s in out.scheduled),
                             tuple(r.request_id for r in out.preempted)))

    def _heap_last_step(self, worker):
        return max((e for e in self._heap if e[2] == 2 and e[3][0] is worker), key=lambda e: e[1])[3][1]

    def _on_output(self, output) -> None:
        if output.finished:
            self.first_finish = min(self.first_finish, self.clock.now())
        super()._on_output(output)


CLUSTER = ClusterSpec(workers=[WorkerSpec(id="a100", gpu_type="A100-80G", max_num_seqs=8),
                               WorkerSpec(id="a10", gpu_type="A10", max_num_seqs=4),
                               WorkerSpec(id="l4", gpu_type="L4", max_num_seqs=4)], queue_limit=64)


def workload(lengths: list[int]) -> list[ReplayItem]:
    rng = random.Random(7)
    items = []
    for i, n_out in enumerate(lengths):
        items.append(ReplayItem(arrival_s=0.004 * i, input_tokens=rng.randint(50, 900), output_tokens=n_out,
                                slo_class=("interactive", "code", "batch")[i % 3], max_tokens=2048))
    return items


@pytest.mark.parametrize("pair", ["capacity/fcfs", "llmd/fcfs", "token_aware/priority", "round_robin/orca",
                                  "adaptive/rtc", "sglang_cache_aware/fcfs"])
@pytest.mark.parametrize("report_interval_s", [0.0, 0.2])
def test_decisions_do_not_depend_on_hidden_lengths_until_the_first_finish(pair, report_interval_s):
    # a burst that overloads the small workers: binding, the balancer's queue and preemption all happen
    n = 60
    short = [40 + 7 * (i % 5) for i in range(n)]
    long = [400 + 90 * (i % 7) for i in range(n)]
    route, engine = pair.split("/")
    runs = []
    for lengths in (short, long):
        sim = Recording(CLUSTER, route, engine, report_interval_s=report_interval_s)
        result = sim.run(workload(lengths))
        runs.append((sim, result))
    (a, ra), (b, rb) = runs
    # the true lengths really were different, and every answer served ended exactly there
    for lengths, result in ((short, ra), (long, rb)):
        served = [r for r in result.records if r.ok]
        assert len(served) >= n // 2
        assert all(r.completion_tokens == lengths[int(r.request_id[1:])] and r.finish_reason == "stop"
                   for r in served)
    cut = min(a.first_finish, b.first_finish)
    before_a = [e for e in a.log if e[0] < cut]
    before_b = [e for e in b.log if e[0] < cut]
    assert len(before_a) > n // 2, "the comparison must cover real decisions"
    assert any(e[1] == "step" for e in before_a) and any(e[1] == "bind" for e in before_a)
    assert before_a == before_b
    # and every request was bound with the client's cap, never its true length
    assert {e[4] for e in a.log if e[1] == "bind"} == {2048}


def test_the_oracle_gets_true_lengths_only_through_its_named_path():
    from workers.policies import make_policy
    from workers.request import Request, SamplingParams
    from workers.true_lengths import TrueLengths

    with pytest.raises(ValueError, match="clairvoyant"):
        make_policy("oracle")
    truth = TrueLengths()
    policy = make_policy("oracle", true_lengths=truth)
    a = Request("a", [1] * 10, SamplingParams(max_tokens=2048), 0.0, predicted_output_len=5.0)
    b = Request("b", [1] * 10, SamplingParams(max_tokens=2048), 0.0, predicted_output_len=900.0)
    truth.set("a", 1000)
    truth.set("b", 20)
    # ranked by the true lengths, not by the predictions
    assert policy.key(b, 0.0) < policy.key(a, 0.0)


@pytest.mark.slow
def test_a_live_worker_ends_a_replayed_answer_at_its_true_length_only(tmp_path):
    from services.rpc import common_pb2, gateway_pb2, gateway_pb2_grpc
    from tandem.launcher import LocalStack

    cluster = ClusterSpec(workers=[WorkerSpec(id="a100", gpu_type="A100-80G", time_scale=0.2)])
    with LocalStack(cluster, gateway_port=0, log_dir=tmp_path) as stack:
        with grpc.insecure_channel(stack.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            replies = list(stub.Generate(gateway_pb2.GenerateRequest(
                prompt="tok " * 40, max_tokens=512, replay_truth=common_pb2.ReplayTruth(output_tokens=17)),
                timeout=30))
            plain = list(stub.Generate(gateway_pb2.GenerateRequest(prompt="tok " * 40, max_tokens=23), timeout=30))
    assert replies[-1].finish_reason == "stop" and replies[-1].metrics.completion_tokens == 17
    assert sum(len(r.token_ids) for r in replies) == 17
    assert plain[-1].finish_reason == "length" and plain[-1].metrics.completion_tokens == 23


def test_replay_item_cap_defaults_to_the_true_length_only_when_no_cap_is_given():
    item = ReplayItem(0.0, 10, 30)
    assert item.cap == 30 and dataclasses.replace(item, max_tokens=2048).cap == 2048
