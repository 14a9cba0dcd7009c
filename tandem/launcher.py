"""Starts a whole Tandem stack as separate processes on loopback, and stops it cleanly.

Used by ``tandem up``, the demo, the benchmarks and the multi-process tests, so they all exercise the same
path: each service is ``python -m tandem.cli serve NAME`` with flags, announces its port with a READY line,
and is stopped with SIGTERM (graceful drain), then SIGKILL if it does not exit in time. ``supervise`` restarts
a process that died, as the cluster file's restart policy says (``tandem up`` calls it every quarter second);
what it does goes to the console and to ``supervisor.log`` beside the services' logs.
"""

from __future__ import annotations

import importlib.util
import os
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.cluster import ClusterSpec, WorkerSpec
from services.rpc import balancer_pb2, balancer_pb2_grpc
from services.tls import Tls


class StackError(RuntimeError):
    pass


REPO_ROOT = Path(__file__).resolve().parent.parent
VLLM_START_S = 300.0


def worker_python(spec: WorkerSpec) -> str:
    """The interpreter a worker runs with: the cluster file's ``python``, else for a vllm worker
    ``$TANDEM_VLLM_PYTHON``, the ``.venv-vllm`` that scripts/dev makes, or this one when vLLM imports here; else
    this one. vLLM pins its own versions of shared libraries, so it usually gets an environment of its own."""
    if spec.python:
        return spec.python
    if spec.executor != "vllm":
        return sys.executable
    if env := os.environ.get("TANDEM_VLLM_PYTHON"):
        return env
    venv = REPO_ROOT / ".venv-vllm" / "bin" / "python"
    if venv.exists():
        return str(venv)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise StackError(f"worker {spec.id}: a vllm worker needs vLLM; run `scripts/dev setup` (it makes .venv-vllm), "
                     "set TANDEM_VLLM_PYTHON, or give the worker `python:` in the cluster file")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    stdout_path: Path
    stderr_path: Path
    address: str = ""
    args: list[str] = field(default_factory=list)     # its ``serve`` flags, to start it again the same way
    restarts: int = 0
    restart_at: float | None = None                   # a restart is due then (backing off)
    starting_until: float | None = None               # restarted, not READY yet; given up on after this
    python: str = ""                                  # the interpreter it runs with; "" this one

    def endpoints(self) -> dict[str, str]:
        """Other endpoints it announced (``ENDPOINT <service> <kind> <url>``): kind -> URL."""
        try:
            lines = self.stdout_path.read_text(errors="replace").splitlines()
        except OSError:
            return {}
        return {parts[2]: parts[3] for line in lines if (parts := line.split()) and parts[0] == "ENDPOINT"
                and len(parts) == 4}

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass(frozen=True)
class SupervisorEvent:
    """Something ``LocalStack.supervise`` did or saw, for the console and the logs."""

    name: str
    what: str          # "exited", "restarting", "restarted", "given up"
    detail: str


@dataclass
class LocalStack:
    cluster: ClusterSpec
    gateway_port: int = 50051
    log_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    profiles_db: Path | None = None         # default: beside the logs, so test stacks start uncalibrated
    http_port: int | None = None            # the gateway's OpenAI-compatible HTTP API (0: a free port); None: off
    metrics: bool = True                    # every service serves Prometheus /metrics on a free port
    processes: dict[str, Process] = field(default_factory=dict)

    # ----- addresses ---------------------------------------------------------------------------------
    @property
    def gateway_address(self) -> str:
        return self.processes["gateway"].address

    @property
    def balancer_address(self) -> str:
        return self.processes["balancer"].address

    @property
    def profiler_address(self) -> str:
        return self.processes["profiler"].address

    def worker_address(self, worker_id: str) -> str:
        return self.processes[f"worker-{worker_id}"].address

    @property
    def openai_url(self) -> str:
        """Base URL of the OpenAI-compatible API (``.../v1``); "" when it is off."""
        return self.processes["gateway"].endpoints().get("openai", "")

    @property
    def tls(self) -> Tls | None:
        """The stack's TLS, when its environment sets ``TANDEM_TLS_*`` for every service."""
        env = {**os.environ, **self.env}
        return Tls.from_paths(env.get("TANDEM_TLS_CERT", ""), env.get("TANDEM_TLS_KEY", ""),
                              env.get("TANDEM_TLS_CA", ""))

    def channel(self, address: str) -> grpc.Channel:
        """A blocking channel to one of the stack's services, with the stack's certificate when it has TLS."""
        credentials = self.tls.channel_credentials() if self.tls is not None else None
        return grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)

    def metrics_urls(self) -> dict[str, str]:
        """Each service's Prometheus /metrics URL, by process name."""
        return {name: url for name, p in self.processes.items() if (url := p.endpoints().get("metrics"))}

    # ----- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "LocalStack":
        if any(w.executor == "vllm" for w in self.cluster.workers):
            timeout = max(timeout, VLLM_START_S)      # vLLM compiles its model at start (about a minute on CPU)
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="tandem-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        try:
            self._launch("profiler", ["--db-path", str(self.profiles_db or self.log_dir / "profiles.sqlite")], deadline)
            self._launch("balancer", ["--routing-policy", self.cluster.routing_policy,
                                      "--routing-options", json.dumps(self.cluster.routing_options),
                                      "--report-interval-s", str(self.cluster.report_interval_s),
                                      "--queue-limit", str(self.cluster.queue_limit),
                                      "--shed-at", str(self.cluster.shed_at),
                                      "--queue-order", self.cluster.queue_order,
                                      "--admission", self.cluster.admission,
                                      "--admission-busy-s", str(self.cluster.admission_busy_s),
                                      "--admission-slack", str(self.cluster.admission_slack),
                                      "--profiler-address", self.profiler_address], deadline)
            for spec in self.cluster.workers:
                self.start_worker(spec, wait=False)
            for spec in self.cluster.workers:
                self.processes[f"worker-{spec.id}"].address = self._ready(f"worker-{spec.id}", deadline)
            gateway_args = ["--port", str(self.gateway_port), "--balancer-address", self.balancer_address,
                            "--profiler-address", self.profiler_address]
            if self.http_port is not None:
                gateway_args += ["--http-port", str(self.http_port)]
                checkpoints = {spec.model for spec in self.cluster.workers if spec.executor != "sim"}
                if len(checkpoints) == 1:       # chat prompts in the one checkpoint's own template
                    gateway_args += ["--chat-template", checkpoints.pop()]
            if self.cluster.slo_classes:
                gateway_args += ["--slo-classes", json.dumps({k: v.model_dump() for k, v in self.cluster.slo_classes.items()})]
            self._launch("gateway", gateway_args, deadline)
            self.wait_for_workers(len(self.cluster.workers), deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        return self

    def start_worker(self, spec: WorkerSpec, wait: bool = True, timeout: float = 30.0) -> Process:
        args = ["--worker-id", spec.id, "--port", str(spec.port), "--executor", spec.executor,
                *(["--gpu-type", spec.gpu_type] if spec.gpu_type else []), "--device", spec.device,
                "--dtype", spec.dtype, "--torch-threads", str(spec.torch_threads), "--model", spec.model,
                "--engine-policy", self.cluster.engine_policy, "--engine-options", json.dumps(self.cluster.engine_options),
                "--balancer-address", self.balancer_address, "--profiler-address", self.profiler_address,
                "--kv-blocks", str(spec.kv_blocks), "--max-num-seqs", str(spec.max_num_seqs),
                # vLLM picks its own block size (on CPU a multiple of 32) unless the cluster file sets one
                *(["--block-size", str(spec.block_size)]
                  if spec.executor != "vllm" or "block_size" in spec.model_fields_set else []),
                "--max-num-batched-tokens", str(spec.max_num_batched_tokens), "--time-scale", str(spec.time_scale),
                "--prefix-caching" if spec.prefix_caching else "--no-prefix-caching"]
        name = f"worker-{spec.id}"
        python = worker_python(spec)
        if wait:
            return self._launch(name, args, time.monotonic() + timeout, python)
        return self._spawn(name, args, python)

    def wait_for_workers(self, count: int, timeout: float = 30.0) -> list[balancer_pb2.WorkerStatus]:
        deadline = time.monotonic() + timeout
        with self.channel(self.balancer_address) as channel:
            stub = balancer_pb2_grpc.BalancerStub(channel)
            while True:
                workers = list(stub.ListWorkers(balancer_pb2.ListWorkersRequest(), timeout=5).workers)
                if len(workers) >= count:
                    return workers
                if time.monotonic() > deadline:
                    raise StackError(f"only {len(workers)} of {count} workers registered in time")
                time.sleep(0.05)

    def supervise(self, now: float | None = None, ready_timeout_s: float = 30.0) -> list[SupervisorEvent]:
        """One look at every process under the cluster's restart policy: a process that died is started again
        after a backoff (on the same port, so every other service's address for it stays right; a worker
        registers again by itself), or left down when the policy says so. Call it periodically."""
        now = time.monotonic() if now is None else now
        policy, events = self.cluster, []
        for name, process in self.processes.items():
            code = process.popen.poll()
            if process.starting_until is not None:                    # restarted: READY yet?
                address = self._ready_line(process)
                if address:
                    process.address, process.starting_until = address, None
                    events.append(SupervisorEvent(name, "restarted", f"on {address} (restart {process.restarts})"))
                    continue
                if code is None and now < process.starting_until:
                    continue
                if code is None:
                    process.popen.kill()
                    process.popen.wait()
                    code = process.popen.returncode
                process.starting_until = None
                events.append(SupervisorEvent(name, "exited", f"while starting again, code {code}"))
            elif code is None or process.restart_at is not None and now < process.restart_at:
                continue
            elif process.restart_at is None:
                events.append(SupervisorEvent(name, "exited", f"code {code}" if code >= 0 else f"signal {-code}"))
                if policy.restart == "never" or (policy.restart == "on-failure" and code == 0) or \
                        (policy.restart == "on-failure" and process.restarts >= policy.restart_limit):
                    events.append(SupervisorEvent(name, "given up", f"restart policy {policy.restart}, "
                                                  f"{process.restarts} restarts so far"))
                    process.restart_at = float("inf")
                    continue
                delay = min(30.0, policy.restart_backoff_s * 2 ** process.restarts)
                process.restart_at = now + delay
                events.append(SupervisorEvent(name, "restarting", f"in {delay:.1f} s"))
                continue
            if process.restart_at is not None and now >= process.restart_at:
                process.restart_at = None
                self._respawn(process, now + ready_timeout_s)
        if events and self.log_dir is not None:
            with open(self.log_dir / "supervisor.log", "a") as log:
                for event in events:
                    log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {event.name} {event.what}: {event.detail}\n")
        return events

    def _respawn(self, process: Process, ready_by: float) -> None:
        """Start ``process`` again with its flags, on the port it had."""
        args = list(process.args)
        ports = {"--port": process.address.rsplit(":", 1)[-1] if process.address else ""}
        endpoints = process.endpoints()       # its HTTP ports stay too, so printed URLs stay right
        for flag, kind in (("--http-port", "openai"), ("--metrics-port", "metrics")):
            if kind in endpoints:
                ports[flag] = endpoints[kind].split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[-1]
        for flag, port in ports.items():
            if port and flag in args:
                args[args.index(flag) + 1] = port
            elif port:
                args += [flag, port]
        restarts = process.restarts + 1
        fresh = self._spawn(process.name, args, process.python)
        fresh.args, fresh.address, fresh.restarts, fresh.starting_until = process.args, process.address, restarts, ready_by

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes[name]
        process.popen.send_signal(sig)
        process.popen.wait(timeout=30)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM in reverse start order (gateway first), then SIGKILL whatever is left."""
        for name in reversed(list(self.processes)):
            process = self.processes[name].popen
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- internals ---------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], python: str = "") -> Process:
        assert self.log_dir is not None
        service = name.split("-", 1)[0]
        stdout_path, stderr_path = self.log_dir / f"{name}.out", self.log_dir / f"{name}.log"
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        with open(stdout_path, "wb") as out, open(stderr_path, "ab") as err:
            extra = ["--metrics-port", "0"] if self.metrics and "--metrics-port" not in args else []
            popen = subprocess.Popen([python or sys.executable, "-m", "tandem.cli", "serve", service, "--host", self.host,
                                      *extra, *args],
                                     stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        process = self.processes[name] = Process(name, popen, stdout_path, stderr_path, args=list(args), python=python)
        return process

    def _launch(self, name: str, args: list[str], deadline: float, python: str = "") -> Process:
        process = self._spawn(name, args, python)
        process.address = self._ready(name, deadline)
        return process

    @staticmethod
    def _ready_line(process: Process) -> str:
        """The address a service announced on its READY line, or "" before it has."""
        for line in process.stdout_path.read_text(errors="replace").splitlines():
            if line.startswith("READY "):
                return line.split()[2]
        return ""

    def _ready(self, name: str, deadline: float) -> str:
        process = self.processes[name]
        while time.monotonic() < deadline:
            if address := self._ready_line(process):
                return address
            if process.popen.poll() is not None:
                raise StackError(f"{name} exited with code {process.popen.returncode}:\n{process.log_tail()}")
            time.sleep(0.02)
        raise StackError(f"{name} did not become ready in time:\n{process.log_tail()}")
