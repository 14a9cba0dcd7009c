"""`tandem up` as a user runs it: serves, then stops cleanly on SIGTERM, leaving no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from services.rpc import gateway_pb2, gateway_pb2_grpc
from tests.helpers import tandem_up, wait_until

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_serves_and_sigterm_stops_everything(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("routing_policy: round_robin\nworkers:\n  - {id: fast, gpu_type: H100-SXM}\n"
                       "  - {id: slow, gpu_type: T4, model: llama-2-7b, kv_blocks: 200}\n")
    proc, address, printed = tandem_up(["--cluster", str(cluster), "--port", "0", "--log-dir", str(tmp_path / "logs")])
    pids = [int(p) for p in re.findall(r"│\s*(\d{2,})\s*│", printed)]
    assert len(pids) == 5, printed                          # profiler, balancer, 2 workers, gateway
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        workers = {list(stub.Generate(gateway_pb2.GenerateRequest(prompt="hi", max_tokens=2)))[-1].metrics.worker_id
                   for _ in range(4)}
    assert workers == {"fast", "slow"}                        # round robin from the cluster file
    metrics = re.findall(r"(http://127\.0\.0\.1:\d+/metrics)", printed)
    assert len(set(metrics)) == 5, printed                    # every service's /metrics in the table
    assert "tandem_gateway_requests_total" in urllib.request.urlopen(metrics[-1], timeout=5).read().decode()
    openai_url = re.search(r"OpenAI-compatible API on (http://\S+/v1)", printed).group(1)
    models = json.loads(urllib.request.urlopen(f"{openai_url}/models", timeout=5).read())
    assert [m["id"] for m in models["data"]] == ["tandem"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert not [p for p in pids if alive(p)]


def test_up_rejects_a_bad_cluster_file(tmp_path):
    cluster = tmp_path / "bad.yaml"
    cluster.write_text("workers: [{id: x, gpu_type: Z80}]\n")
    out = subprocess.run([sys.executable, "-m", "tandem.cli", "up", "--cluster", str(cluster)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown GPU type 'Z80'" in out.stderr


def test_up_restarts_a_killed_worker_and_keeps_serving(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("routing_policy: round_robin\nrestart: on-failure\nrestart_backoff_s: 0.2\nworkers:\n"
                       "  - {id: a, gpu_type: A100-80G}\n  - {id: b, gpu_type: A10}\n")
    proc, address, printed = tandem_up(["--cluster", str(cluster), "--port", "0", "--log-dir", str(tmp_path / "logs")])
    try:
        pid_a = int(re.search(r"worker-a\s*│[^│]*│\s*(\d+)", printed).group(1))
        os.kill(pid_a, signal.SIGKILL)
        with grpc.insecure_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            served, deadline = set(), time.monotonic() + 20
            while served != {"a", "b"} and time.monotonic() < deadline:   # the rest serve; a comes back
                try:
                    served.add(list(stub.Generate(gateway_pb2.GenerateRequest(prompt="hi", max_tokens=2),
                                                  timeout=5))[-1].metrics.worker_id)
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        assert served == {"a", "b"} and time.monotonic() < deadline
        assert proc.poll() is None                                        # the stack did not stop
        log = tmp_path / "logs" / "supervisor.log"
        wait_until(lambda: "worker-a restarted" in log.read_text(), 5)   # it notices READY within a beat
        assert "worker-a exited: signal 9" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
