"""The ``tandem`` command: run the stack, talk to it, and measure it."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Tandem: SLO-aware LLM serving on heterogeneous GPU clusters.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
# rich falls back to 80 columns off a terminal, which crushes the result tables in logs and CI
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
SERVICES = ("gateway", "balancer", "worker", "profiler")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def serve(ctx: typer.Context, service: str = typer.Argument(..., help="gateway, balancer, worker or profiler")) -> None:
    """Run one service in the foreground; flags after the name are its settings (--help lists them)."""
    if service not in SERVICES:
        raise typer.BadParameter(f"unknown service {service!r}; choose from {', '.join(SERVICES)}")
    argv = list(ctx.args)
    try:
        if service == "gateway":
            from gateway.service import main
        elif service == "balancer":
            from balancer.service import main
        elif service == "worker":
            from workers.service import main
        else:
            from profiler.service import main
        main(argv)
    except ValueError as e:     # unknown policy, GPU type or model: one clear line, not a traceback
        console.print(f"[red]{service}: {e}[/red]")
        raise typer.Exit(2) from None


def _policy_pair(policy: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    if not policy:
        return None, None
    route, _, engine = policy.partition("/")
    return route or None, engine or None


def _stack(cluster: Optional[Path], port: int, policy: Optional[str], log_dir: Optional[Path],
           executor: Optional[str] = None, model: Optional[str] = None):
    from balancer.routing import policy_names as routing_names
    from services.cluster import ClusterFileError, ClusterSpec, WorkerSpec, load_cluster
    from tandem.launcher import LocalStack
    from workers.policies import policy_names as engine_names

    try:
        if executor and executor != "sim":
            if cluster is not None:
                raise typer.BadParameter("use either --cluster or --executor/--model")
            if not model or not Path(model).is_dir():
                raise typer.BadParameter(f"--executor {executor} needs --model PATH, a checkpoint folder")
            if executor not in ("torch", "vllm"):
                raise typer.BadParameter(f"--executor {executor!r}: sim, torch or vllm")
            spec = ClusterSpec(workers=[WorkerSpec(id=f"{executor}-0", executor=executor, model=str(Path(model).resolve()))])
            if executor == "vllm":
                spec.engine_policy = "fcfs"      # vLLM's own scheduler: fcfs, or priority with --policy

        else:
            spec = load_cluster(cluster)
    except ClusterFileError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    route, engine = _policy_pair(policy)
    if route:
        if route not in routing_names():
            raise typer.BadParameter(f"unknown routing policy {route!r}; known: {', '.join(routing_names())}")
        spec.routing_policy = route
    if engine:
        if engine not in engine_names():
            raise typer.BadParameter(f"unknown engine policy {engine!r}; known: {', '.join(engine_names())}")
        spec.engine_policy = engine
    return LocalStack(spec, gateway_port=port, log_dir=log_dir)


@app.command()
def up(cluster: Optional[Path] = typer.Option(None, help="cluster file (YAML); default: three sim workers"),
       port: int = typer.Option(50051, help="gateway port"),
       policy: Optional[str] = typer.Option(None, help="ROUTE/ENGINE policies, e.g. least_outstanding/fcfs"),
       log_dir: Optional[Path] = typer.Option(None, help="where service logs go (default: a temp folder)"),
       executor: Optional[str] = typer.Option(None, help="torch or vllm: one worker running --model instead of a "
                                              "cluster"),
       model: Optional[str] = typer.Option(None, help="with --executor torch or vllm: a Hugging Face checkpoint folder"),
       http_port: int = typer.Option(8000, help="the OpenAI-compatible HTTP API's port (0: a free one; -1: off)"),
       metrics: bool = typer.Option(True, help="every service serves Prometheus /metrics on a free port")
       ) -> None:
    """Start the whole local stack on 127.0.0.1 in the foreground; Ctrl-C or SIGTERM stops it cleanly."""
    stack = _stack(cluster, port, policy, log_dir, executor, model)
    stack.http_port = http_port if http_port >= 0 else None
    stack.metrics = metrics
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        with console.status("starting the stack ..."):
            stack.start()
    except Exception as e:    # a service that failed to start says why in its log tail
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    table = Table(title="Tandem stack", show_lines=False)
    for col in ("service", "address", "pid", "metrics"):
        table.add_column(col)
    for name, proc in stack.processes.items():
        table.add_row(name, proc.address, str(proc.popen.pid), proc.endpoints().get("metrics", ""))
    console.print(table)
    if stack.openai_url:
        console.print(f"OpenAI-compatible API on [bold]{stack.openai_url}[/bold]")
    console.print(f"gateway on [bold]{stack.gateway_address}[/bold]; logs in {stack.log_dir}; Ctrl-C to stop")
    spec = stack.cluster
    console.print(f"restart policy: {spec.restart}" + (f" (at most {spec.restart_limit} times each)"
                                                        if spec.restart == "on-failure" else ""))
    colour = {"exited": "red", "given up": "red", "restarting": "yellow", "restarted": "green"}
    try:
        while not stop.wait(0.25):
            for event in stack.supervise():
                console.print(f"[{colour[event.what]}]{event.name} {event.what}: {event.detail}[/]")
    finally:
        with console.status("stopping ..."):
            stack.stop()
    console.print("stopped")


@app.command()
def generate(prompt: str = typer.Argument(..., help="the prompt"),
             max_tokens: Optional[int] = typer.Option(None, help="tokens to generate"),
             slo_class: str = typer.Option("interactive", help="interactive, code, batch or a configured class"),
             temperature: Optional[float] = typer.Option(None), seed: Optional[int] = typer.Option(None),
             priority: int = typer.Option(0), tenant: str = typer.Option(""),
             address: str = typer.Option("127.0.0.1:50051", help="gateway address"),
             timeout: Optional[float] = typer.Option(None, help="deadline in seconds")) -> None:
    """Stream one answer to stdout, then print its metrics."""
    import grpc

    from services.rpc import gateway_pb2, gateway_pb2_grpc

    async def run() -> gateway_pb2.GenerateResponse:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            req = gateway_pb2.GenerateRequest(prompt=prompt, slo_class=slo_class, priority=priority, tenant=tenant,
                                              max_tokens=max_tokens, temperature=temperature, seed=seed)
            last = None
            async for reply in stub.Generate(req, timeout=timeout):
                sys.stdout.write(reply.text)
                sys.stdout.flush()
                last = reply
            sys.stdout.write("\n")
            return last

    try:
        last = asyncio.run(run())
    except grpc.aio.AioRpcError as e:
        console.print(f"[red]{e.code().name}: {e.details()}[/red]")
        raise typer.Exit(1) from None
    m = last.metrics
    table = Table(title=f"finish: {last.finish_reason}")
    for col in ("worker", "prompt", "completion", "queue ms", "TTFT ms", "TPOT ms", "E2E ms", "preemptions"):
        table.add_column(col)
    table.add_row(m.worker_id, str(m.prompt_tokens), str(m.completion_tokens), f"{m.queue_ms:.1f}",
                  f"{m.ttft_ms:.1f}", f"{m.tpot_ms:.1f}", f"{m.e2e_ms:.1f}", str(m.preemptions))
    console.print(table)


@app.command()
def status(address: str = typer.Option("127.0.0.1:50051", help="gateway address")) -> None:
    """Print the cluster table: workers, GPU type, load and health."""
    import grpc

    from services.rpc import gateway_pb2, gateway_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            reply = gateway_pb2_grpc.GatewayStub(channel).ClusterStatus(gateway_pb2.ClusterStatusRequest(), timeout=5)
    except grpc.RpcError as e:
        console.print(f"[red]{e.code().name}: {e.details()}[/red]")
        raise typer.Exit(1) from None
    table = Table(title=f"{len(reply.workers)} workers, routing: {reply.routing_policy}, queue "
                        f"{reply.queue_length}/{reply.queue_limit}, shed {reply.shed_total}")
    for col in ("worker", "address", "GPU", "model", "executor", "capacity tok/s", "running", "waiting",
                "in flight", "KV used", "prefix cache", "step ms", "report age s", "state"):
        table.add_column(col)
    for w in reply.workers:
        i, load = w.info, w.load
        capacity = f"{w.capacity_tok_s:,.0f} ({w.profile_source})" if w.capacity_tok_s else "unknown"
        hit = f"{load.prefix_hit_tokens / load.prefix_queried_tokens:.0%} hit" if load.prefix_queried_tokens else "-"
        table.add_row(i.worker_id, i.address, i.gpu_type, i.model, i.executor, capacity, str(load.running),
                      str(load.waiting), str(w.outstanding), f"{load.kv_blocks_used}/{i.kv_blocks_total}",
                      f"{load.kv_blocks_cached} blocks, {hit}", f"{load.step_time_ms:.1f}",
                      f"{w.last_report_age_s:.2f}", w.state)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@app.command()
def health(address: str = typer.Argument(..., help="host:port of any Tandem service"),
           service: str = typer.Option("", help="a service name; empty asks about the whole server")) -> None:
    """Exit 0 when the service answers SERVING to the standard gRPC health check (for compose and probes)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
    except grpc.RpcError as e:
        console.print(f"[red]{address}: {e.code().name}[/red]")
        raise typer.Exit(1) from None
    status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    typer.echo(status_name)
    raise typer.Exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)


@app.command()
def demo(cluster: Optional[Path] = typer.Option(None, help="cluster file; default: three sim workers"),
         trace: str = typer.Option("conv", help="Azure trace: conv or code"),
         trace_file: Optional[Path] = typer.Option(None, help="a trace CSV of your own (Azure format)"),
         start: float = typer.Option(0.0, help="window start, seconds into the trace"),
         duration: float = typer.Option(30.0, help="window length in seconds"),
         rate_scale: float = typer.Option(1.0, help="speed the arrivals up (>1) or down (<1)"),
         policy: Optional[str] = typer.Option(None, help="ROUTE/ENGINE policies"),
         out: Path = typer.Option(Path(".tandem/demo-results.json"), help="where the JSON results go")) -> None:
    """Start a local stack, replay a slice of a real trace through it, print the result table."""
    from bench.demo import run_demo
    from bench.traces import TraceError

    stack = _stack(cluster, 0, policy, None)
    try:
        run_demo(stack.cluster, trace=trace, trace_path=trace_file, start_s=start, duration_s=duration,
                 rate_scale=rate_scale, out=out, console=console)
    except TraceError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


@app.command()
def calibrate(worker: str = typer.Argument(..., help="host:port of the worker to profile (idle is best)"),
              profiler: str = typer.Option(..., help="host:port of the Profiler"),
              repeats: int = typer.Option(5, min=1)) -> None:
    """Profile a worker with probe batches, fit its latency model and store it in the Profiler."""
    import grpc

    from services.rpc import profiler_pb2, profiler_pb2_grpc

    try:
        with grpc.insecure_channel(profiler) as channel, console.status(f"profiling {worker} ..."):
            reply = profiler_pb2_grpc.ProfilerStub(channel).Calibrate(
                profiler_pb2.CalibrateRequest(worker_address=worker, repeats=repeats), timeout=1800)
    except grpc.RpcError as e:
        console.print(f"[red]{e.code().name}: {e.details()}[/red]")
        raise typer.Exit(1) from None
    p = reply.profile
    console.print(f"{p.model} on {p.gpu_type} ({p.executor}): {reply.probes} probes\n"
                  f"  prefill(P) = {p.prefill_a0:.3f} + {p.prefill_a1:.5f}*P + {p.prefill_a2:.3g}*P^2 ms   (median error "
                  f"{reply.prefill_median_error:.1%})\n"
                  f"  decode(b, C) = {p.decode_c0:.3f} + {p.decode_c1:.4f}*b + {p.decode_c2:.6f}*C ms   "
                  f"(median error {reply.decode_median_error:.1%})")


@app.command()
def plan(inventory: Path = typer.Option(..., help="YAML: machines (name, gpu_type, count), mean_input/output"),
         model: str = typer.Option("llama-2-7b", help="a model the latency model knows"),
         out: Optional[Path] = typer.Option(None, help="also write the full search as JSON")) -> None:
    """Best tensor-parallel degree, instances and batch limit per machine, by exhaustive search."""
    from rich.progress import Progress

    from profiler.planner import as_dict, load_inventory
    from profiler.planner import plan as make_plan

    try:
        inv = load_inventory(inventory)
        from services.catalog import model as model_spec
        model_spec(model)
    except (ValueError, KeyError) as e:
        console.print(f"[red]{e.args[0] if isinstance(e, KeyError) else e}[/red]")
        raise typer.Exit(2) from None
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("searching configurations", total=None)
        results = make_plan(inv, model, lambda done, total: progress.update(task, completed=done, total=total))
    table = Table(title=f"deployment plan for {model}, mix {inv.mean_input} in / {inv.mean_output} out tokens")
    for col in ("machine", "GPUs", "tensor parallel", "instances", "batch limit", "predicted tok/s",
                "next best"):
        table.add_column(col, justify="right" if col != "machine" else "left")
    total = 0.0
    for machine in inv.machines:
        configs = results[machine.name]
        if not configs:
            table.add_row(machine.name, f"{machine.count} x {machine.gpu_type}", "-", "-", "-", "does not fit", "")
            continue
        best = configs[0]
        total += best.tok_s
        runner = next((c for c in configs[1:] if c.tp != best.tp), None)
        table.add_row(machine.name, f"{machine.count} x {machine.gpu_type}", str(best.tp), str(best.instances),
                      str(best.batch_limit), f"{best.tok_s:,.0f}",
                      f"tp {runner.tp}: {runner.tok_s:,.0f}" if runner else "")
    console.print(table)
    console.print(f"cluster: {total:,.0f} tok/s predicted")
    if out is not None:
        from bench.report import write_json

        console.print(f"search: {write_json(out, {'model': model, 'inventory': inv.model_dump(), 'plan': as_dict(results)})}")


@app.command("make-checkpoint")
def make_checkpoint(path: Path = typer.Argument(..., help="folder to write"),
                    hidden_size: int = typer.Option(64), layers: int = typer.Option(2), heads: int = typer.Option(4),
                    kv_heads: int = typer.Option(2), vocab_size: int = typer.Option(512),
                    max_position_embeddings: int = typer.Option(1024), seed: int = typer.Option(0)) -> None:
    """Write a tiny randomly initialised Llama checkpoint with a tokenizer (Hugging Face format)."""
    try:
        from workers.executors.checkpoint import make_tiny_llama
    except ImportError as e:
        console.print(f"[red]needs the torch extra: {e}[/red]")
        raise typer.Exit(2) from None
    with console.status(f"writing {path} ..."):
        make_tiny_llama(path, hidden_size=hidden_size, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                        vocab_size=vocab_size, max_position_embeddings=max_position_embeddings, seed=seed)
    console.print(f"wrote {path}: try `tandem up --executor torch --model {path}`")


bench_app = typer.Typer(help="Benchmarks: each prints a table and writes JSON.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("stream")
def bench_stream(gpu_type: str = typer.Option("A100-80G", help="the sim worker's GPU type"),
                 time_scale: float = typer.Option(1.0, help="scale its step times (<1: a faster GPU)"),
                 repeats: int = typer.Option(2, min=1), requests_per_stream: int = typer.Option(4, min=1),
                 max_tokens: int = typer.Option(128, min=1),
                 stream_interval_ms: float = typer.Option(0.0, min=0, help="the worker's --stream-interval-ms"),
                 out: Path = typer.Option(Path("bench/results/stream.json"))) -> None:
    """Tokens/s and added TTFT through the gateway vs straight from a worker, at 1 and 64 streams."""
    from bench.stream import run

    run(gpu_type=gpu_type, time_scale=time_scale, repeats=repeats, requests_per_stream=requests_per_stream,
        max_tokens=max_tokens, out=out, console=console, stream_interval_ms=stream_interval_ms)


@bench_app.command("engine")
def bench_engine(requests: int = typer.Option(256, min=1), kv_tokens: int = typer.Option(131072, min=1024),
                 vllm: Optional[bool] = typer.Option(None, help="a vLLM worker too (default: when .venv-vllm is "
                                                     "there; --vllm insists, --no-vllm skips)"),
                 out: Path = typer.Option(Path("bench/results/engine.json"))) -> None:
    """Torch worker and vLLM worker against transformers' static batching on ShareGPT lengths; peak memory;
    schedule() time."""
    from bench.engine import run
    from tandem.launcher import StackError

    try:
        run(n_requests=requests, kv_tokens=kv_tokens, out=out, vllm=vllm)
    except StackError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


@bench_app.command("loop")
def bench_loop(torch_threads: int = typer.Option(0, min=0, help="the worker's intra-op threads (0: torch's default)"),
              out: Path = typer.Option(Path("bench/results/loop.json"))) -> None:
    """A burst of 64 greedy requests on a tiny checkpoint through the gateway against transformers' static batches
    of 32, and the engine loop's own time per step at batch 64 (the forward pass timed apart)."""
    from bench.loop import run

    run(out=out, console=console, torch_threads=torch_threads)


@bench_app.command("cluster")
def bench_cluster(policies: str = typer.Option("round_robin,llmd,capacity,token_aware", help="comma-separated"),
                  time_scale: float = typer.Option(2.0, help="slow the sim GPUs so 2 cores keep up"),
                  clients: int = typer.Option(160, min=1), warmup: float = typer.Option(20.0),
                  window: float = typer.Option(30.0),
                  out: Path = typer.Option(Path("bench/results/cluster.json"))) -> None:
    """Routing policies on 1 A100 + 2 A10 + 3 T4 at saturation, against the cluster's capacity bound."""
    from bench.cluster import run

    run(policies=tuple(p.strip() for p in policies.split(",") if p.strip()), time_scale=time_scale, clients=clients,
        warmup_s=warmup, window_s=window, out=out)


@bench_app.command("predictor")
def bench_predictor(out: Path = typer.Option(Path("bench/results/predictor.json"))) -> None:
    """Output-length predictor calibration (pinball loss, 10-90% coverage) on held-out Azure traces."""
    from bench.predictor import run

    run(out=out)


@bench_app.command("simulate")
def bench_simulate(cluster: Optional[Path] = typer.Option(None, help="cluster file; default: 12 mixed GPUs"),
                   scenario: Optional[Path] = typer.Option(None, help="scenario file; default: multi-SLO Azure mix"),
                   policy: list[str] = typer.Option([], help="ROUTE/ENGINE, repeatable; default: baselines and ours"),
                   rate_scale: Optional[float] = typer.Option(None, help="override the scenario's rate scale"),
                   report_interval_s: Optional[float] = typer.Option(
                       None, min=0, help="load report interval; default the cluster file's (live: 0.2); 0 = instant"),
                   out: Path = typer.Option(Path("bench/results/simulate.json"))) -> None:
    """Discrete-event simulation with the real policies and engine; prints the result table per policy."""
    from bench.simulate import DEFAULT_POLICIES, run_simulate
    from bench.traces import TraceError
    from services.cluster import ClusterFileError

    try:
        run_simulate(cluster, scenario, policy or DEFAULT_POLICIES, rate_scale, out, console, report_interval_s)
    except (TraceError, ClusterFileError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


@bench_app.command("replay")
def bench_replay(scenario: Optional[Path] = typer.Option(None, help="scenario file; default: multi-SLO Azure mix"),
                 address: Optional[str] = typer.Option(None, help="a running gateway; default: start a local stack"),
                 cluster: Optional[Path] = typer.Option(None, help="cluster for the local stack; default: 3 sim GPUs"),
                 rate_scale: Optional[float] = typer.Option(None, help="override the scenario's rate scale"),
                 out: Path = typer.Option(Path("bench/results/replay.json"))) -> None:
    """Replay a scenario against the live stack with the trace's real timing (open loop)."""
    from bench.simulate import run_replay
    from bench.traces import TraceError
    from services.cluster import ClusterFileError

    try:
        run_replay(address, scenario, cluster, rate_scale, out, console)
    except (TraceError, ClusterFileError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


@bench_app.command("results")
def bench_results(out: Path = typer.Option(Path("docs"), help="folder for results.md and img/")) -> None:
    """Regenerate docs/results.md: the headline table on the default multi-SLO scenario, hidden lengths, peers."""
    from bench.results_doc import generate

    generate(out, console)


@bench_app.command("goodput")
def bench_goodput(cluster: Optional[Path] = typer.Option(None), scenario: Optional[Path] = typer.Option(None),
                  policy: list[str] = typer.Option([], help="ROUTE/ENGINE, repeatable"),
                  out: Path = typer.Option(Path("bench/results/goodput.json"))) -> None:
    """Highest rate scale with >= 90% SLO attainment per policy, by bisection in the simulator."""
    from bench.simulate import DEFAULT_POLICIES, run_goodput

    run_goodput(cluster, scenario, policy or DEFAULT_POLICIES, out, console)


@bench_app.command("slo")
def bench_slo(scenario: Optional[Path] = typer.Option(None, help="scenario file; default: multi-SLO Azure mix "
                                                                   "(bench/data/sharegpt_poisson.yaml is the second)"),
              cluster: Optional[Path] = typer.Option(None, help="cluster file; default: 12 mixed GPUs"),
              out: Path = typer.Option(Path("bench/results/slo.json"))) -> None:
    """The SLO-aware pairs against llm-d, round robin, rtc and orca: attainment, satisfaction, goodput, E2E,
    clairvoyant twins and preemptions, each figure checked against its target."""
    from bench.slo_showdown import run

    run(scenario, cluster, out, console)


@bench_app.command("live-slo")
def bench_live_slo(rate: float = typer.Option(24.0, min=0.1, help="requests/s of the overload run"),
                   duration: float = typer.Option(60.0, min=1.0, help="seconds of arrivals"),
                   light_rate: float = typer.Option(4.0, min=0.0, help="light-load reference run, requests/s (0: skip)"),
                   seed: int = typer.Option(0),
                   simulator: bool = typer.Option(True, help="calibrate the workers and print the simulator's "
                                                             "prediction beside the live figures"),
                   out: Path = typer.Option(Path("bench/results/live_slo.json"))) -> None:
    """token_aware/sage against token_aware/fcfs and llmd/fcfs on a live stack of three CPU torch workers under
    overload, beside the simulator's prediction for the same requests."""
    from bench.live_slo import Settings, run
    from bench.traces import TraceError

    try:
        run(Settings(rate=rate, duration_s=duration, light_rate=light_rate, seed=seed, calibrate=simulator), out,
            console)
    except (RuntimeError, ValueError, TraceError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


@bench_app.command("overload")
def bench_overload(duration: float = typer.Option(60.0, min=1.0, help="seconds of overload"),
                   factor: float = typer.Option(5.0, min=0.1, help="times the cluster's capacity"),
                   capacity: Optional[float] = typer.Option(
                       None, min=0.01, help="requests/s of the mix the cluster serves; default: measure it (ramp)"),
                   cluster: Optional[Path] = typer.Option(None, help="cluster file; default: three sim workers"),
                   json_out: Path = typer.Option(Path("bench/results/overload.json"), "--json",
                                                 help="where to write JSON")) -> None:
    """x5 the cluster's capacity for 60 s on a live stack: peak RSS per process, sheddable work refused with a retry
    hint, admitted interactive SLO attainment, recovery time after the load."""
    from bench.overload import Settings, run

    try:
        run(Settings(duration_s=duration, factor=factor, capacity=capacity,
                     cluster=str(cluster) if cluster else None), json_out, console)
    except (RuntimeError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


@bench_app.command("tenant-flood")
def bench_tenant_flood(duration: float = typer.Option(30.0, min=1.0, help="seconds per phase"),
                       factor: float = typer.Option(10.0, min=0.1, help="tenant B's rate, times its share"),
                       a_load: float = typer.Option(0.5, min=0.01, help="tenant A's rate, times its share"),
                       b_mix: str = typer.Option("interactive", help="B's requests: interactive or mixed"),
                       capacity: Optional[float] = typer.Option(
                           None, min=0.01, help="interactive requests/s the cluster serves; default: measure it"),
                       cluster: Optional[Path] = typer.Option(None, help="cluster file; default: three sim workers"),
                       json_out: Path = typer.Option(Path("bench/results/tenant_flood.json"), "--json",
                                                     help="where to write JSON")) -> None:
    """One tenant flooding at x10 its share against a well-behaved one: the other's interactive SLO attainment with
    and without the flood, refusals per tenant."""
    from bench.tenant_flood import Settings, run

    try:
        run(Settings(duration_s=duration, factor=factor, a_load=a_load, b_mix=b_mix, capacity=capacity,
                     cluster=str(cluster) if cluster else None), json_out, console)
    except (RuntimeError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


@bench_app.command("prefix")
def bench_prefix(part: str = typer.Option("both", help="sim, live or both"),
                 trace: Optional[Path] = typer.Option(None, help="a JSONL trace with hash_ids (Mooncake's scheme) "
                                                      "instead of the synthetic multi-turn chats"),
                 live_workers: int = typer.Option(2, min=1, help="CPU torch workers of the live part"),
                 json_out: Path = typer.Option(Path("bench/results/prefix.json"), "--json",
                                               help="where to write JSON")) -> None:
    """Prefix caching on a multi-turn workload: TTFT p50 and throughput with the engines' cache off and on, and
    cache-aware routing against capacity, llm-d and round robin; in the simulator and on a live CPU stack."""
    from bench.prefix import Settings, run

    if part not in ("sim", "live", "both"):
        console.print(f"[red]--part: {part!r} is not sim, live or both[/red]")
        raise typer.Exit(2)
    if trace is not None and not trace.is_file():
        console.print(f"[red]--trace: {trace} is not a file[/red]")
        raise typer.Exit(2)
    try:
        run(Settings(sim=part != "live", live=part != "sim", trace=trace, live_workers=live_workers), json_out, console)
    except (RuntimeError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


@bench_app.command("schedule")
def bench_schedule(out: Path = typer.Option(Path("bench/results/schedule.json"))) -> None:
    """schedule() time with 256 running and 1,000 waiting requests, per engine policy."""
    from bench.schedule import run

    run(out=out)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
