"""Routing on a heterogeneous cluster at saturation: throughput per routing policy against the capacity bound.

A live stack of sim workers (default 1 A100-80G, 2 A10, 3 T4 serving Llama-2-7B) is driven closed loop by
enough concurrent clients to saturate every worker; output tokens are counted over a window after a warm-up.
The capacity bound is the sum of each worker's saturated throughput for the same length mix, profiled by
running the real engine alone in virtual time on the latency model the sim workers use (a lone live A100
worker measured 865 tok/s against its profiled 822 at time scale 2); the roofline bound is shown too. A time scale > 1 slows the sim GPUs so the 2-core host is not the
bottleneck; the bound is scaled the same way. ``python -m bench.cluster`` prints a table and writes JSON.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from bench.replay import unique_prompt
from bench.report import write_json
from bench.traces import default_trace_path, load_azure
from services.cluster import ClusterSpec, WorkerSpec
from tandem.launcher import LocalStack
from profiler.capacity import engine_saturated_throughput
from services.latency import LatencyModel
from services.rpc import common_pb2, gateway_pb2, gateway_pb2_grpc

DEFAULT_GPUS = ("A100-80G", "A10", "A10", "T4", "T4", "T4")


def length_mix(n: int = 2000, max_input: int = 1024, max_output: int = 512, seed: int = 0) -> list[tuple[int, int]]:
    """(input, output) pairs from the Azure conversation trace, clipped to keep every request servable."""
    rows = load_azure(default_trace_path("conv"), limit=n)
    rng = random.Random(seed)
    rng.shuffle(rows)
    return [(max(1, min(r.input_tokens, max_input)), max(1, min(r.output_tokens, max_output))) for r in rows]


def capacity_bound(gpus: tuple[str, ...], model: str, mix: list[tuple[int, int]], time_scale: float) -> dict:
    mean_in = sum(i for i, _ in mix) / len(mix)
    mean_out = sum(o for _, o in mix) / len(mix)
    profiled = {g: engine_saturated_throughput(LatencyModel.from_names(g, model), mix) / time_scale for g in set(gpus)}
    roofline = {g: LatencyModel.from_names(g, model).saturated_throughput(mean_in, mean_out) / time_scale
                for g in set(gpus)}
    return {"total_tok_s": sum(profiled[g] for g in gpus), "per_worker_tok_s": [profiled[g] for g in gpus],
            "roofline_tok_s": sum(roofline[g] for g in gpus), "mean_input": mean_in, "mean_output": mean_out}


async def saturate(address: str, mix: list[tuple[int, int]], clients: int, warmup_s: float, window_s: float,
                   max_tokens: int = 512) -> dict:
    """Closed-loop clients; each request sends the mix's cap as ``max_tokens`` (not its own length, which only the
    executor's stop rule learns, through the benchmark-only ``replay_truth``)."""
    deliveries: list[tuple[float, int]] = []
    errors: dict[str, int] = {}
    stop_at = time.perf_counter() + warmup_s + window_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def client(c: int) -> None:
            k = c
            while time.perf_counter() < stop_at:
                n_in, n_out = mix[k % len(mix)]
                k += clients
                req = gateway_pb2.GenerateRequest(prompt=unique_prompt(n_in), max_tokens=max_tokens,
                                                  temperature=0.0, slo_class="batch",
                                                  replay_truth=common_pb2.ReplayTruth(output_tokens=n_out))
                try:
                    async for reply in stub.Generate(req, timeout=stop_at - time.perf_counter() + 1):
                        deliveries.append((time.perf_counter(), len(reply.token_ids)))
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                        errors[e.code().name] = errors.get(e.code().name, 0) + 1
                        await asyncio.sleep(0.05)

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
    lo, hi = start + warmup_s, start + warmup_s + window_s
    tokens = sum(n for t, n in deliveries if lo <= t < hi)
    return {"tok_s": tokens / window_s, "tokens": tokens, "errors": errors}


def run(policies: tuple[str, ...] = ("round_robin", "llmd", "capacity", "token_aware"), gpus: tuple[str, ...] = DEFAULT_GPUS,
        model: str = "llama-2-7b", time_scale: float = 2.0, clients: int = 160, warmup_s: float = 20.0,
        window_s: float = 30.0, out: Path | None = Path("bench/results/cluster.json")) -> dict:
    console = Console(stderr=True)
    mix = length_mix()
    bound = capacity_bound(gpus, model, mix, time_scale)
    rows = {}
    for policy in policies:
        spec = ClusterSpec(routing_policy=policy, queue_limit=4096, workers=[
            WorkerSpec(id=f"{g.lower()}-{i}", gpu_type=g, model=model, time_scale=time_scale)
            for i, g in enumerate(gpus)])
        with console.status(f"{policy}: starting {len(gpus)} workers ..."):
            stack = LocalStack(spec, gateway_port=0).start()
        try:
            with console.status(f"{policy}: {clients} clients, {warmup_s:.0f} s warm-up + {window_s:.0f} s ..."):
                rows[policy] = asyncio.run(saturate(stack.gateway_address, mix, clients, warmup_s, window_s,
                                                    max_tokens=max(o for _, o in mix)))
        finally:
            stack.stop()
        console.print(f"{policy}: {rows[policy]['tok_s']:,.0f} tok/s")
    base = rows.get("round_robin", {}).get("tok_s") or 0.0
    table = Table(title=f"{len(gpus)} sim workers ({', '.join(gpus)}), {model}, time scale {time_scale:g}, "
                        f"{clients} closed-loop clients; mix in {bound['mean_input']:.0f} / out "
                        f"{bound['mean_output']:.0f} tokens")
    for col in ("routing", "tok/s", "vs round robin", "of capacity bound", "errors"):
        table.add_column(col, justify="right")
    for policy, r in rows.items():
        table.add_row(policy, f"{r['tok_s']:,.0f}", f"{r['tok_s'] / base:.2f}x" if base else "-",
                      f"{r['tok_s'] / bound['total_tok_s']:.0%}", str(r["errors"] or "-"))
    table.add_row("capacity bound (engine-profiled)", f"{bound['total_tok_s']:,.0f}", "", "100%", "")
    table.add_row("roofline bound", f"{bound['roofline_tok_s']:,.0f}", "", "", "")
    console.print(table)
    payload = {"gpus": gpus, "model": model, "time_scale": time_scale, "clients": clients, "warmup_s": warmup_s,
               "window_s": window_s, "bound": bound, "policies": rows}
    if out is not None:
        console.print(f"results: {write_json(out, payload)}")
    return payload


if __name__ == "__main__":
    run()
