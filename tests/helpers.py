"""Shared test helpers: starting stacks, calling them, and an in-process OTLP/gRPC trace receiver."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Callable

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from services.cluster import ClusterSpec, WorkerSpec
from tandem.launcher import LocalStack
from services.rpc import worker_pb2, worker_pb2_grpc


def cluster(*gpus: str, routing: str = "least_outstanding", **worker_kw: object) -> ClusterSpec:
    return ClusterSpec(routing_policy=routing,
                       workers=[WorkerSpec(id=f"w{i}-{g.lower()}", gpu_type=g, **worker_kw) for i, g in enumerate(gpus)])


def start_stack(spec: ClusterSpec, log_dir: Path, env: dict[str, str] | None = None) -> LocalStack:
    return LocalStack(spec, gateway_port=0, log_dir=log_dir, env=env or {}).start()


def worker_stats(stack: LocalStack) -> dict[str, worker_pb2.WorkerStats]:
    out = {}
    for spec in stack.cluster.workers:
        name = f"worker-{spec.id}"
        if stack.processes[name].popen.poll() is not None:
            continue
        with grpc.insecure_channel(stack.worker_address(spec.id)) as channel:
            out[spec.id] = worker_pb2_grpc.WorkerStub(channel).GetStats(worker_pb2.GetStatsRequest(), timeout=5)
    return out


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> float:
    """Seconds it took for ``predicate`` to hold; raises AssertionError when it did not within ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def tandem_up(args: list[str], timeout: float = 90.0) -> tuple[subprocess.Popen, str, str]:
    """Run `tandem up ARGS` as a user would; returns the process, the gateway address and what it printed."""
    if "--http-port" not in args:          # never the default 8000: tests run beside other things
        args = [*args, "--http-port", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "up", *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError("tandem up exited early:\n" + "".join(seen))
        seen.append(line)
        if m := re.search(r"gateway on (\S+);", line):
            return proc, m.group(1), "".join(seen)
    proc.kill()
    raise AssertionError("tandem up did not start in time:\n" + "".join(seen))


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects exported spans as (service name, span) pairs."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def Export(self, request, context):  # noqa: N802 (gRPC naming)
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: bytes) -> list[tuple[str, object]]:
        with self._lock:
            return [(s, span) for s, span in self.spans if span.trace_id == trace_id]

    def __enter__(self) -> "OtlpReceiver":
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(0)


def step(sched, clock=None, token=5):
    """One engine iteration by hand: schedule, then each request that samples gets ``token``; ``clock`` (when
    given) moves on 10 ms."""
    out = sched.schedule()
    sched.update(out, {s.request.request_id: token for s in out.scheduled if s.samples})
    if clock is not None:
        clock.advance(0.01)
    return out


def ids(out):
    """The ids of a step's scheduled requests, in batch order."""
    return [s.request.request_id for s in out.scheduled]
