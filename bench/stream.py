"""Streaming overhead of the gateway hop: the same worker, called directly and through the gateway, same run.

Closed loop: each of C concurrent streams sends requests back to back. Direct and gateway runs alternate so
drift on this shared machine hits both alike; the figures that matter are ratios. Prints a table and writes
JSON. ``python -m bench.stream`` or ``tandem bench stream``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from bench.report import write_json
from services.cluster import ClusterSpec, WorkerSpec
from tandem.launcher import LocalStack
from services.rpc import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc


@dataclass
class PathResult:
    path: str
    streams: int
    tokens: int
    wall_s: float
    ttft_ms: list[float]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def ttft_p50(self) -> float:
        return statistics.median(self.ttft_ms)


async def _drive(path: str, address: str, streams: int, requests_per_stream: int, prompt_tokens: int,
                 max_tokens: int) -> PathResult:
    prompt = " ".join(["tok"] * prompt_tokens)
    async with grpc.aio.insecure_channel(address) as channel:
        if path == "direct":
            stub = worker_pb2_grpc.WorkerStub(channel)
            sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, ignore_eos=True)

            def call(i: int):
                return stub.Generate(worker_pb2.WorkerGenerateRequest(request_id=f"d{streams}-{i}-{time.time_ns()}",
                                                                      prompt=prompt, sampling=sampling))
        else:
            stub = gateway_pb2_grpc.GatewayStub(channel)

            def call(i: int):
                return stub.Generate(gateway_pb2.GenerateRequest(prompt=prompt, max_tokens=max_tokens,
                                                                 temperature=0.0, ignore_eos=True))
        ttfts: list[float] = []
        tokens = 0

        async def one_stream(s: int) -> None:
            nonlocal tokens
            for k in range(requests_per_stream):
                started = time.perf_counter()
                first = None
                async for reply in call(s * requests_per_stream + k):
                    if first is None and reply.token_ids:
                        first = time.perf_counter()
                        ttfts.append((first - started) * 1000)
                    tokens += len(reply.token_ids)

        start = time.perf_counter()
        await asyncio.gather(*(one_stream(s) for s in range(streams)))
        return PathResult(path, streams, tokens, time.perf_counter() - start, ttfts)


def run(gpu_type: str = "A100-80G", time_scale: float = 1.0, concurrency: tuple[int, ...] = (1, 64),
        repeats: int = 2, requests_per_stream: int = 4, prompt_tokens: int = 32, max_tokens: int = 128,
        out: Path | None = Path("bench/results/stream.json"), console: Console | None = None,
        stream_interval_ms: float = 0.0) -> dict:
    console = console or Console(stderr=True)
    spec = ClusterSpec(workers=[WorkerSpec(id="bench-0", gpu_type=gpu_type, time_scale=time_scale)])
    rows = []
    with console.status("starting the stack ..."):
        stack = LocalStack(spec, gateway_port=0, env={"TANDEM_STREAM_INTERVAL_MS": str(stream_interval_ms)}).start()
    try:
        targets = {"direct": stack.worker_address("bench-0"), "gateway": stack.gateway_address}
        asyncio.run(_drive("gateway", targets["gateway"], 4, 1, prompt_tokens, 8))        # warm both paths
        asyncio.run(_drive("direct", targets["direct"], 4, 1, prompt_tokens, 8))
        for streams in concurrency:
            results: dict[str, list[PathResult]] = {"direct": [], "gateway": []}
            for rep in range(repeats):
                for path in (("direct", "gateway") if rep % 2 == 0 else ("gateway", "direct")):
                    with console.status(f"{streams} streams, {path}, repeat {rep + 1}/{repeats} ..."):
                        results[path].append(asyncio.run(_drive(path, targets[path], streams, requests_per_stream,
                                                                prompt_tokens, max_tokens)))
            d_tok = statistics.median(r.tok_s for r in results["direct"])
            g_tok = statistics.median(r.tok_s for r in results["gateway"])
            d_ttft = statistics.median(r.ttft_p50 for r in results["direct"])
            g_ttft = statistics.median(r.ttft_p50 for r in results["gateway"])
            rows.append({"streams": streams, "direct_tok_s": d_tok, "gateway_tok_s": g_tok, "ratio": g_tok / d_tok,
                         "direct_ttft_p50_ms": d_ttft, "gateway_ttft_p50_ms": g_ttft,
                         "added_ttft_p50_ms": g_ttft - d_ttft,
                         "runs": {p: [asdict(r) | {"tok_s": r.tok_s} for r in rs] for p, rs in results.items()}})
    finally:
        stack.stop()
    table = Table(title=f"gateway hop vs direct: sim {gpu_type} worker, time scale {time_scale:g}, "
                        f"stream interval {stream_interval_ms:g} ms, "
                        f"{prompt_tokens}-token prompts, {max_tokens} tokens each, median of {repeats}")
    for col in ("streams", "direct tok/s", "gateway tok/s", "gateway/direct", "TTFT p50 direct ms",
                "TTFT p50 gateway ms", "added TTFT p50 ms"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["streams"]), f"{r['direct_tok_s']:,.0f}", f"{r['gateway_tok_s']:,.0f}",
                      f"{r['ratio']:.2f}x", f"{r['direct_ttft_p50_ms']:.2f}", f"{r['gateway_ttft_p50_ms']:.2f}",
                      f"{r['added_ttft_p50_ms']:.2f}")
    console.print(table)
    payload = {"gpu_type": gpu_type, "time_scale": time_scale, "stream_interval_ms": stream_interval_ms,
               "prompt_tokens": prompt_tokens,
               "max_tokens": max_tokens, "repeats": repeats, "rows": rows}
    if out is not None:
        console.print(f"results: {write_json(out, payload)}")
    return payload


if __name__ == "__main__":
    run()
