"""The engine loop's own cost: a burst of 64 mixed greedy requests on a tiny checkpoint, where the forward pass is
cheap and everything around it shows. ``tandem bench loop`` (or ``python -m bench.loop``).

A random Llama with hidden size 128 and 3 layers. 64 requests (prompts of 5-120 words, ``max_tokens`` 8-192,
seeded; ``ignore_eos`` so every answer is as long as asked) sent at once:

* **through the gateway** of a local stack with one torch worker: streamed output tokens/s;
* **transformers' ``generate``** on left-padded static batches of 32 of the same prompts, each batch running to
  its longest answer: useful tokens/s;
* **in process**, the same prompts through ``Engine`` with 128 tokens each and the forward pass timed apart: the
  loop's own time per step (scheduling, inputs, sampling, update, detokenising, delivery) at batch 64, median
  over the steps that ran 60 or more requests.

Prints a table and writes JSON.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path

import grpc
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.report import write_json
from services.cluster import ClusterSpec, WorkerSpec
from services.rpc import gateway_pb2, gateway_pb2_grpc

CHECKPOINT = Path(".tandem/checkpoints/loop-llama")
N_REQUESTS = 64


def loop_checkpoint(folder: Path = CHECKPOINT) -> Path:
    from bench.engine import bench_checkpoint

    return bench_checkpoint(folder, hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=344,
                            vocab_size=512, max_position_embeddings=1024, seed=3)


def burst(seed: int = 0, n: int = N_REQUESTS) -> list[tuple[str, int]]:
    """(prompt, max_tokens) pairs: 5-120 words from the checkpoint's corpus, 8-192 tokens each."""
    from workers.executors.checkpoint import WORDS

    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120))), rng.randint(8, 192)) for _ in range(n)]


def through_gateway(folder: Path, requests: list[tuple[str, int]], console: Console, threads: int = 0) -> dict:
    from tandem.launcher import LocalStack

    spec = ClusterSpec(workers=[WorkerSpec(id="torch-0", executor="torch", model=str(folder.resolve()),
                                           kv_blocks=4096, max_num_seqs=256, max_num_batched_tokens=2048,
                                           torch_threads=threads)])
    with console.status("starting a stack with one torch worker ..."):
        stack = LocalStack(spec, gateway_port=0).start()
    try:
        async def drive() -> tuple[float, int]:
            async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)

                async def one(prompt: str, max_tokens: int) -> int:
                    n = 0
                    async for reply in stub.Generate(gateway_pb2.GenerateRequest(
                            prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True), timeout=300):
                        n += len(reply.token_ids)
                    return n

                await one("warm up", 4)
                start = time.perf_counter()
                counts = await asyncio.gather(*(one(p, m) for p, m in requests))
                return time.perf_counter() - start, sum(counts)

        with console.status("burst through the gateway ..."):
            wall, tokens = asyncio.run(drive())
    finally:
        stack.stop()
    assert tokens == sum(m for _, m in requests), "the stack lost tokens"
    return {"wall_s": wall, "output_tokens": tokens, "tok_s": tokens / wall}


def static_batches(folder: Path, requests: list[tuple[str, int]], console: Console, batch_size: int = 32) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    start = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("transformers static batches", total=len(requests))
        for b in range(0, len(requests), batch_size):
            batch = requests[b:b + batch_size]
            enc = tok([p for p, _ in batch], return_tensors="pt", padding=True)
            longest = max(m for _, m in batch)
            with torch.inference_mode():
                model.generate(**enc, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                               pad_token_id=tok.eos_token_id)
            progress.advance(task, len(batch))
    wall = time.perf_counter() - start
    useful = sum(m for _, m in requests)
    return {"wall_s": wall, "output_tokens": useful, "tok_s": useful / wall, "batch_size": batch_size}


def loop_cost(folder: Path, requests: list[tuple[str, int]], answer: int = 128) -> dict:
    """The burst's prompts, each asking for ``answer`` tokens (so about that many steps run all 64), through an
    in-process engine; each iteration's wall time (end to end, from the previous one's end) minus its forward
    pass, at the steps that ran 60 or more requests."""
    requests = [(p, answer) for p, _ in requests]
    from services.settings import WorkerSettings
    from workers.build import build_engine
    from workers.clock import RealClock
    from workers.request import Request, SamplingParams

    cfg = WorkerSettings(executor="torch", model=str(folder), kv_blocks=4096, max_num_batched_tokens=2048)
    forward_s: list[float] = []
    rows: list[tuple[int, float, float]] = []       # (batch, iteration wall s, forward s)

    async def main() -> None:
        clock = RealClock()
        engine = build_engine(cfg, clock)
        model = engine.executor.model
        inner = model.forward

        def timed(step):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return inner(step)
            finally:
                forward_s.append(time.perf_counter() - t)

        model.forward = timed
        last = [0.0]

        def on_iteration(stats, out) -> None:  # type: ignore[no-untyped-def]
            now = time.perf_counter()
            if last[0]:
                rows.append((stats.batch_size, now - last[0], forward_s[-1]))
            last[0] = now

        engine.on_iteration = on_iteration
        task = asyncio.create_task(engine.run())
        tok = engine.executor.tokenizer

        async def one(i: int, prompt: str, max_tokens: int) -> None:
            stream = engine.add_request(Request(f"r{i}", tok.encode(prompt), SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True), clock.now(), eos_token_id=tok.eos_token_id))
            while not (await stream.next_chunk()).finished:
                pass

        await asyncio.gather(*(one(i, p, m) for i, (p, m) in enumerate(requests)))
        engine.stop()
        await task

    asyncio.run(main())
    full = [(wall, fwd) for batch, wall, fwd in rows if batch >= 60]
    if not full:
        raise RuntimeError("no step ran 60 or more requests; the burst did not fill the batch")
    return {"steps_at_batch_64": len(full), "iteration_ms_p50": statistics.median(w for w, _ in full) * 1000,
            "forward_ms_p50": statistics.median(f for _, f in full) * 1000,
            "loop_ms_per_step_p50": statistics.median(w - f for w, f in full) * 1000}


def run(out: Path | None = Path("bench/results/loop.json"), console: Console | None = None,
        torch_threads: int = 0) -> dict:
    """``torch_threads``: the worker's intra-op threads (0: torch's default, all cores)."""
    console = console or Console(stderr=True)
    folder = loop_checkpoint()
    requests = burst()
    with console.status("the burst in process, forward timed apart ..."):
        cost = loop_cost(folder, requests)
    gateway = through_gateway(folder, requests, console, torch_threads)
    static = static_batches(folder, requests, console)
    ratio = gateway["tok_s"] / static["tok_s"]
    table = Table(title=f"{len(requests)} greedy requests at once, random Llama (hidden 128, 3 layers), CPU, "
                        f"worker torch threads {torch_threads or 'default'}")
    for col in ("engine", "output tokens", "wall s", "tok/s", "vs static"):
        table.add_column(col, justify="right")
    table.add_row("Tandem torch worker, through the gateway", f"{gateway['output_tokens']:,}",
                  f"{gateway['wall_s']:.2f}", f"{gateway['tok_s']:,.0f}", f"{ratio:.2f}x")
    table.add_row("transformers generate, static batches of 32", f"{static['output_tokens']:,}",
                  f"{static['wall_s']:.2f}", f"{static['tok_s']:,.0f}", "1.00x")
    console.print(table)
    console.print(f"in process, batch 64 ({cost['steps_at_batch_64']} steps): iteration p50 "
                  f"{cost['iteration_ms_p50']:.2f} ms = forward {cost['forward_ms_p50']:.2f} ms + loop "
                  f"{cost['loop_ms_per_step_p50']:.2f} ms")
    payload = {"requests": requests, "torch_threads": torch_threads, "gateway": gateway, "static": static, "ratio": ratio, "loop": cost,
               "checkpoint": str(folder)}
    if out is not None:
        console.print(f"results: {write_json(out, payload)}")
    return payload


if __name__ == "__main__":
    run()
