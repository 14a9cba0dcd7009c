"""Abuse and faults against live stacks, each checked the way an operator would check it.

- 1,000 streams cancelled by their clients mid-answer leave nothing behind: no KV block, running or waiting
  request, open stream or extra asyncio task on any worker, nothing outstanding at the balancer, nothing in
  flight at the gateway, and every one of them counted as aborted on its worker. The same for 400 streams
  cancelled in their first milliseconds, before their first token (this one finds a leak at the balancer).
- SIGTERM to every process of a stack at once (what a container orchestrator does when it stops a deployment)
  with 100 answers streaming: all 100 end with a final message, new requests are refused with UNAVAILABLE at
  once rather than hanging, and every process exits cleanly.
- A worker SIGKILLed under load in a ``tandem up`` stack: no request hangs, each ends with a final message or
  ABORTED / UNAVAILABLE, and the supervisor brings the worker back to serve within 10 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.cluster import ClusterSpec, WorkerSpec
from services.rpc import balancer_pb2, balancer_pb2_grpc, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.helpers import start_stack, tandem_up, wait_until, worker_stats

pytestmark = pytest.mark.slow


# ----- helpers ------------------------------------------------------------------------------------------
def listing(balancer_address: str) -> balancer_pb2.ListWorkersResponse:
    with grpc.insecure_channel(balancer_address) as channel:
        return balancer_pb2_grpc.BalancerStub(channel).ListWorkers(balancer_pb2.ListWorkersRequest(), timeout=5)


def gateway_gauge(stack, name: str) -> float:
    """A gauge on the gateway's Prometheus /metrics, as an operator's dashboard reads it."""
    text = urllib.request.urlopen(stack.metrics_urls()["gateway"], timeout=5).read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


async def stream(stub: gateway_pb2_grpc.GatewayStub, request: gateway_pb2.GenerateRequest, timeout: float,
                 first_token: asyncio.Event | None = None) -> tuple[str, str, int, gateway_pb2.GenerateResponse | None]:
    """Read a whole answer: (status code name, details, tokens received, final message or None). Sets
    ``first_token`` when the first token arrives."""
    tokens, final = 0, None
    try:
        async for reply in stub.Generate(request, timeout=timeout):
            tokens += len(reply.token_ids)
            if tokens and first_token is not None:
                first_token.set()
            if reply.finish_reason:
                final = reply
        return "OK", "", tokens, final
    except grpc.aio.AioRpcError as e:
        return e.code().name, e.details() or "", tokens, final


# ----- a. 1,000 streams cancelled mid-answer -----------------------------------------------------------
CANCELLED = 1000
AT_ONCE = 100           # streams open together; the rest wait their turn
# GetStats counts the tasks of the worker's event loop at that instant: the engine loop, the balancer link,
# gRPC's own and the GetStats handler itself are in every count; a short-lived task (a load report being
# sent, a profiler call) may be in one look and not in the other. Two such at once is the slack; a task left
# behind by even a small share of 1,000 cancelled streams is more than that (17 before and 17 after here).
TASK_SLACK = 2


def settled(stack, before: dict[str, worker_pb2.WorkerStats], within: float = 10.0
            ) -> tuple[dict[str, worker_pb2.WorkerStats], balancer_pb2.ListWorkersResponse]:
    """Wait until every worker is as idle as it was ``before`` (no KV block, running or waiting request or open
    stream; asyncio tasks back to the count before, within TASK_SLACK) and the balancer's queue is empty;
    returns what the workers and the balancer then show."""
    def quiet() -> bool:
        stats, listed = worker_stats(stack), listing(stack.balancer_address)
        return (len(stats) == len(before) and len(listed.workers) == len(before) and listed.queue_length == 0
                and all(s.kv_blocks_used == s.running == s.waiting == s.open_streams == 0 for s in stats.values())
                and all(s.asyncio_tasks <= before[w].asyncio_tasks + TASK_SLACK for w, s in stats.items()))

    try:
        wait_until(quiet, within, 0.1)
    except AssertionError:
        raise AssertionError(f"workers not back to idle: before {fmt(before)}\nafter {fmt(worker_stats(stack))}"
                             ) from None
    assert all(p.popen.poll() is None for p in stack.processes.values())
    return worker_stats(stack), listing(stack.balancer_address)


def released(stack, within: float = 5.0) -> bool:
    """Whether the balancer counts nothing outstanding against any worker (soon: releases are asynchronous)."""
    try:
        wait_until(lambda: all(w.outstanding == 0 for w in listing(stack.balancer_address).workers), within, 0.1)
        return True
    except AssertionError:
        return False


def cancel_storm(stack, count: int, early: bool) -> list[tuple[int, str]]:
    """``count`` streams, ``AT_ONCE`` open together, each cancelled by its client: after its first token(s)
    (``early`` False), or at a moment in its first 40 ms, most often before its first token (``early`` True).
    Returns (tokens received, status code name) for each."""
    async def main() -> list[tuple[int, str]]:
        async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            gate = asyncio.Semaphore(AT_ONCE)

            async def read_then_cancel(i: int) -> tuple[int, str]:
                async with gate:
                    # 1,000 tokens at real-time sim speed: many seconds, so no answer finishes by itself
                    call = stub.Generate(gateway_pb2.GenerateRequest(
                        prompt=f"cancel me {i} " + "w " * (i % 50), max_tokens=1000, ignore_eos=True,
                        request_id=f"cancel-{early}-{i}"), timeout=60)
                    tokens = 0

                    async def read() -> None:
                        nonlocal tokens
                        async for reply in call:
                            tokens += len(reply.token_ids)
                            if not early and tokens >= 1 + i % 3:       # after its first token(s)
                                return

                    if early:
                        await asyncio.wait([asyncio.ensure_future(read())], timeout=(i * 7 % 40) / 1000)
                    else:
                        await read()
                    call.cancel()
                    return tokens, (await call.code()).name

            return await asyncio.gather(*(read_then_cancel(i) for i in range(count)))

    return asyncio.run(main())


def two_workers(tmp_path):
    spec = ClusterSpec(workers=[WorkerSpec(id="c-a100", gpu_type="A100-80G"), WorkerSpec(id="c-l40s", gpu_type="L40S")])
    return start_stack(spec, tmp_path)


def test_a_thousand_streams_cancelled_mid_answer_leave_nothing_behind(tmp_path):
    stack = two_workers(tmp_path)
    try:
        before = worker_stats(stack)
        started = time.monotonic()
        outcomes = cancel_storm(stack, CANCELLED, early=False)
        print(f"\n{CANCELLED} streams opened and cancelled in {time.monotonic() - started:.1f} s")
        assert all(tokens >= 1 for tokens, _ in outcomes), "a stream was cancelled before its first token"
        assert {code for _, code in outcomes} == {"CANCELLED"}
        after, _ = settled(stack, before)
        print("asyncio tasks before / after:", {w: (before[w].asyncio_tasks, after[w].asyncio_tasks) for w in after})
        # every cancelled stream was aborted on its worker, none ran on to its 1,000 tokens
        assert sum(after[w].aborted - before[w].aborted for w in after) == CANCELLED
        assert all(after[w].finished == before[w].finished for w in after)
        assert released(stack), f"outstanding at the balancer: {listing(stack.balancer_address)}"
        assert gateway_gauge(stack, "tandem_gateway_in_flight") == 0
    finally:
        stack.stop()


def test_streams_cancelled_before_their_first_token_leave_nothing_behind(tmp_path):
    """Cancelled at random moments of their first 40 ms: while the gateway validates, predicts or routes them,
    or while they wait for a batch. The workers must be clean and the gateway idle; the balancer must count
    nothing outstanding (a binding made as the client left is released, else it counts against its worker for
    as long as the gateway lives)."""
    stack = two_workers(tmp_path)
    try:
        before = worker_stats(stack)
        outcomes = cancel_storm(stack, 400, early=True)
        print(f"\n{sum(1 for tokens, _ in outcomes if tokens == 0)} of 400 cancelled before their first token")
        assert {code for _, code in outcomes} == {"CANCELLED"}
        after, _ = settled(stack, before)
        assert all(after[w].finished == before[w].finished for w in after)
        assert gateway_gauge(stack, "tandem_gateway_in_flight") == 0
        leaked = {w.info.worker_id: w.outstanding for w in listing(stack.balancer_address).workers}
        assert released(stack), f"bindings leaked at the balancer with nothing in flight: {leaked}"
    finally:
        stack.stop()


def fmt(stats: dict[str, worker_pb2.WorkerStats]) -> str:
    return json.dumps({w: {k: getattr(s, k) for k in ("running", "waiting", "kv_blocks_used", "open_streams",
                                                      "asyncio_tasks", "finished", "aborted")}
                       for w, s in stats.items()})


# ----- b. SIGTERM to the whole stack with 100 answers streaming ---------------------------------------
IN_FLIGHT = 100


def test_sigterm_to_every_process_at_once_lets_100_streams_finish_and_refuses_new_ones(tmp_path):
    """The harder of the two ways a stack is stopped: not ``LocalStack.stop`` (gateway first, each process
    after the one before has exited), but SIGTERM to every process at the same moment, as ``docker compose
    down`` or Kubernetes deleting a deployment does. The gateway must keep relaying and the workers keep
    generating while the balancer and profiler shut down around them (drain_grace_s, 10 s by default)."""
    spec = ClusterSpec(workers=[WorkerSpec(id="t-a100", gpu_type="A100-80G"), WorkerSpec(id="t-l40s", gpu_type="L40S")])
    stack = start_stack(spec, tmp_path)
    max_tokens = 150         # 2-3 s of answer at real-time sim speed: inside the 10 s grace, and no answer
                             # ends before the last of the 100 has its first token
    try:
        async def main():
            async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                started = [asyncio.Event() for _ in range(IN_FLIGHT)]
                calls = [asyncio.ensure_future(stream(stub, gateway_pb2.GenerateRequest(
                    prompt=f"drain {i} " + "w " * (i % 40), max_tokens=max_tokens, ignore_eos=True), 60, started[i]))
                    for i in range(IN_FLIGHT)]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
                assert not any(c.done() for c in calls), "an answer finished before SIGTERM: make them longer"
                for process in stack.processes.values():
                    process.popen.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                await asyncio.to_thread(wait_until, lambda: all(      # each has begun its drain
                    '"msg": "draining"' in p.stderr_path.read_text(errors="replace")
                    for p in stack.processes.values()), 10)
                # new requests, on the open channel and on a new one: refused at once, not held
                refused = []
                for fresh in (False, True):
                    new_channel = grpc.aio.insecure_channel(stack.gateway_address) if fresh else None
                    try:
                        t = time.monotonic()
                        late = gateway_pb2.GenerateRequest(prompt="late", max_tokens=2)
                        code, details, tokens, _ = await stream(gateway_pb2_grpc.GatewayStub(new_channel or channel),
                                                                late, 5)
                        refused.append((code, details, tokens, time.monotonic() - t))
                    finally:
                        if new_channel is not None:
                            await new_channel.close()
                results = await asyncio.gather(*calls)
                return results, refused, time.monotonic() - signalled

        results, refused, drained_in = asyncio.run(main())
        print(f"\n{IN_FLIGHT} streams finished {drained_in:.1f} s after SIGTERM; late requests: {refused}")
        for code, details, tokens, final in results:
            assert code == "OK", (code, details, tokens)
            assert final is not None and final.finish_reason == "length" and tokens == max_tokens
        for code, details, tokens, took in refused:
            assert code == "UNAVAILABLE" and "shutting down" in details and tokens == 0 and took < 2.0, \
                (code, details, took)
        exits = {name: p.popen.wait(timeout=20) for name, p in stack.processes.items()}
        assert exits == {name: 0 for name in stack.processes}, exits
    finally:
        stack.stop()


# ----- c. a worker SIGKILLed under load in `tandem up` ------------------------------------------------
def child_pids(parent: int) -> dict[int, list[str]]:
    """The parent's children and their command lines, from /proc (no psutil here)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError, ValueError):
            continue
    return out


def worker_pid(up_pid: int, worker_id: str) -> int | None:
    for pid, argv in child_pids(up_pid).items():
        if "worker" in argv and "--worker-id" in argv and argv[argv.index("--worker-id") + 1] == worker_id:
            return pid
    return None


UNDER_LOAD = 100
BACK_WITHIN_S = 10.0


def test_worker_sigkilled_under_load_in_tandem_up_is_restarted_and_nothing_hangs(tmp_path):
    """Extends test_cli_up's restart test (a kill while idle) to a kill while ~100 answers stream, with the
    ``always`` restart policy. The victim is the worker with the most open streams at that moment."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("restart: always\nrestart_backoff_s: 0.5\nworkers:\n  - {id: k-a100, gpu_type: A100-80G}\n"
                       "  - {id: k-l40s, gpu_type: L40S}\n  - {id: k-a10, gpu_type: A10}\n")
    log_dir = tmp_path / "logs"
    proc, address, printed = tandem_up(["--cluster", str(cluster), "--port", "0", "--log-dir", str(log_dir)])
    max_tokens = 80
    try:
        workers = ["k-a100", "k-l40s", "k-a10"]
        pids = {w: worker_pid(proc.pid, w) for w in workers}
        assert all(pids.values()), (pids, printed)

        async def status(stub: gateway_pb2_grpc.GatewayStub) -> dict[str, balancer_pb2.WorkerStatus]:
            return {w.info.worker_id: w for w in (await stub.ClusterStatus(gateway_pb2.ClusterStatusRequest(),
                                                                           timeout=5)).workers}

        async def main():
            async with grpc.aio.insecure_channel(address) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                started = [asyncio.Event() for _ in range(UNDER_LOAD)]
                calls = [asyncio.ensure_future(stream(stub, gateway_pb2.GenerateRequest(
                    prompt=f"load {i} " + "w " * (i % 30), max_tokens=max_tokens, ignore_eos=True), 60, started[i]))
                    for i in range(UNDER_LOAD)]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
                load = {w: s.load.running for w, s in (await status(stub)).items()}
                victim = max(load, key=load.get)
                async with grpc.aio.insecure_channel((await status(stub))[victim].info.address) as wch:
                    open_streams = (await worker_pb2_grpc.WorkerStub(wch).GetStats(worker_pb2.GetStatsRequest(),
                                                                                     timeout=5)).open_streams
                os.kill(pids[victim], signal.SIGKILL)
                killed = time.monotonic()
                done, hanging = await asyncio.wait(calls, timeout=45)
                ended_in = time.monotonic() - killed
                for c in hanging:
                    c.cancel()
                # back and serving: listed again, and a request answered by it
                served_by_victim_after = None
                while served_by_victim_after is None and time.monotonic() - killed < BACK_WITHIN_S + 5:
                    if victim in await status(stub):
                        probes = await asyncio.gather(*(stream(stub, gateway_pb2.GenerateRequest(
                            prompt=f"are you back {i}", max_tokens=2), 10) for i in range(6)))
                        if any(final is not None and final.metrics.worker_id == victim for *_, final in probes):
                            served_by_victim_after = time.monotonic() - killed
                    await asyncio.sleep(0.1)
                results = [c.result() for c in done]
                return victim, open_streams, results, len(hanging), ended_in, served_by_victim_after

        victim, open_streams, results, hanging, ended_in, back_after = asyncio.run(main())
        outcomes: dict[str, int] = {}
        for code, details, tokens, final in results:
            outcomes[code] = outcomes.get(code, 0) + 1
        print(f"\nkilled {victim} with {open_streams} streams open; outcomes {outcomes}, all ended "
              f"{ended_in:.1f} s after; served again {back_after} s after the kill")
        assert open_streams > 0, "the victim had no streams when it was killed"
        assert hanging == 0, f"{hanging} requests still open 45 s after the kill"
        for code, details, tokens, final in results:
            if code == "OK":
                assert final is not None and final.finish_reason == "length" and tokens == max_tokens
            else:
                assert code in ("ABORTED", "UNAVAILABLE"), (code, details)
                assert victim in details, details        # it says which worker failed
        assert outcomes.get("ABORTED", 0) >= 1           # the streams cut off on the victim said so
        assert back_after is not None and back_after < BACK_WITHIN_S, f"served again after {back_after} s"
        new_pid = worker_pid(proc.pid, victim)
        assert new_pid and new_pid != pids[victim]
        supervisor = (log_dir / "supervisor.log").read_text()
        assert f"{victim} exited: signal 9" in supervisor and f"{victim} restarted" in supervisor, supervisor
        assert proc.poll() is None                       # the stack itself never went down
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
