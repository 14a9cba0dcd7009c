"""Engine throughput: Tandem's torch worker (continuous batching over paged KV) against transformers' static
batching (``generate`` on left-padded batches of 32), same checkpoint, same requests, same run.

256 requests with (input, output) lengths drawn from the ShareGPT length file, scaled to the checkpoint's
context window. Both sides generate exactly each request's output length worth of useful tokens; a static
batch runs until its longest member is done, which is the waste continuous batching removes. The worker runs
as its own process, driven over gRPC; its peak resident memory is read from /proc. Also reports schedule()
time (bench.schedule). ``python -m bench.engine`` prints a table and writes JSON.
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

from bench import schedule as schedule_bench
from bench.report import write_json
from bench.traces import load_sharegpt_lengths
from services.cluster import ClusterSpec, WorkerSpec
from tandem.launcher import LocalStack
from services.rpc import common_pb2, worker_pb2, worker_pb2_grpc

CHECKPOINT = Path(".tandem/checkpoints/bench-llama")
SHAREGPT_CONTEXT = 8192


BENCH_ARCH = dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=688, vocab_size=512,
                  max_position_embeddings=2048, seed=1)


def bench_checkpoint(folder: Path = CHECKPOINT, **arch: int) -> Path:
    """The benchmarks' random checkpoint in ``folder``, made once (``arch``: its shape, default ``BENCH_ARCH``)."""
    if not (folder / "model.safetensors").exists():
        from workers.executors.checkpoint import make_tiny_llama

        make_tiny_llama(folder, **(arch or BENCH_ARCH))
    return folder


def workload(n: int, context: int, seed: int = 0) -> list[tuple[int, int]]:
    """n (prompt tokens, output tokens) pairs from ShareGPT, scaled from 8k to ``context`` tokens."""
    rng = random.Random(seed)
    pairs = rng.sample(load_sharegpt_lengths(), n)
    f = context / SHAREGPT_CONTEXT
    out = []
    for n_in, n_out in pairs:
        p, o = max(2, round(n_in * f)), max(1, round(n_out * f))
        out.append((min(p, context - o - 1), o))
    return out


def prompt_text(tokens: int, words: list[str] | None = None, seed: int = 0) -> str:
    """A prompt of exactly ``tokens`` tokens with the benchmark tokenizer (BOS + one token per word). Given the
    tokenizer's one-token ``words``, a seeded random draw of them, so that no two requests share a prefix (the
    engines' prefix caches would otherwise serve most of every prompt, which transformers cannot)."""
    if words is None:
        return " ".join(["the"] * (tokens - 1))
    rng = random.Random(seed)
    return " " + " ".join(rng.choice(words) for _ in range(tokens - 1))


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_worker(folder: Path, requests: list[tuple[int, int]], prompts: list[str], console: Console, kv_tokens: int,
               executor: str = "torch") -> dict:
    """The requests straight to one worker of ``executor`` (torch: Tandem's engine; vllm: vLLM's), over gRPC."""
    wid = f"{executor}-0"
    spec = ClusterSpec(engine_policy="fcfs", workers=[WorkerSpec(
        id=wid, executor=executor, model=str(folder.resolve()), kv_blocks=kv_tokens // 16, max_num_seqs=256,
        max_num_batched_tokens=2048)])
    with console.status(f"starting a {executor} worker ..."):
        stack = LocalStack(spec, gateway_port=0).start()
    try:
        pid = stack.processes[f"worker-{wid}"].popen.pid
        rss_idle = peak_rss_mib(pid)

        async def drive() -> tuple[float, int, list[float]]:
            async with grpc.aio.insecure_channel(stack.worker_address(wid)) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                with Progress(console=console, transient=True) as progress:
                    task = progress.add_task(f"{executor} worker", total=len(requests))

                    async def one(i: int, p: int, o: int) -> tuple[int, float]:
                        start = time.perf_counter()
                        first = None
                        n = 0
                        async for reply in stub.Generate(worker_pb2.WorkerGenerateRequest(
                                request_id=f"bench-{i}", prompt=prompts[i], sampling=common_pb2.SamplingParams(
                                    max_tokens=o, temperature=0.0, top_p=1.0, ignore_eos=True))):
                            if first is None and reply.token_ids:
                                first = time.perf_counter() - start
                            n += len(reply.token_ids)
                        progress.advance(task)
                        return n, first or 0.0

                    start = time.perf_counter()
                    results = await asyncio.gather(*(one(i, p, o) for i, (p, o) in enumerate(requests)))
                    wall = time.perf_counter() - start
            return wall, sum(n for n, _ in results), [t for _, t in results]

        wall, tokens, ttfts = asyncio.run(drive())
        assert tokens == sum(o for _, o in requests), "the engine lost tokens"
        return {"wall_s": wall, "output_tokens": tokens, "tok_s": tokens / wall, "peak_rss_mib": peak_rss_mib(pid),
                "idle_rss_mib": rss_idle, "ttft_p50_s": statistics.median(ttfts)}
    finally:
        stack.stop()


def run_static(folder: Path, requests: list[tuple[int, int]], prompts: list[str], console: Console,
               batch_size: int = 32) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    useful = 0
    start = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("transformers static batches", total=len(requests))
        for b in range(0, len(requests), batch_size):
            batch = requests[b:b + batch_size]
            enc = tok(prompts[b:b + batch_size], return_tensors="pt", padding=True)
            longest = max(o for _, o in batch)
            with torch.inference_mode():
                model.generate(**enc, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                               pad_token_id=tok.eos_token_id)
            useful += sum(o for _, o in batch)
            progress.advance(task, len(batch))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "output_tokens": useful, "tok_s": useful / wall, "batch_size": batch_size}


def run(n_requests: int = 256, kv_tokens: int = 131072, out: Path | None = Path("bench/results/engine.json"),
        vllm: bool | None = None) -> dict:
    """Tandem's torch worker, a vLLM worker (when vLLM can be found: ``.venv-vllm``; ``vllm`` True insists, False
    skips) and transformers' static batches, on the same checkpoint and requests."""
    from bench.live_slo import one_token_words
    from tandem.launcher import StackError, worker_python

    console = Console(stderr=True)
    folder = bench_checkpoint()
    import json

    context = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    requests = workload(n_requests, context)
    words = one_token_words(folder)
    prompts = [prompt_text(p, words, seed=i) for i, (p, _) in enumerate(requests)]
    engines = {"tandem torch worker (fcfs)": run_worker(folder, requests, prompts, console, kv_tokens)}
    if vllm is not False:
        try:
            worker_python(WorkerSpec(id="v", executor="vllm", model=str(folder)))
        except StackError as e:
            if vllm:
                raise
            console.print(f"[yellow]no vLLM worker: {e}[/yellow]")
        else:
            engines["vLLM worker (v1 AsyncLLM, fcfs)"] = run_worker(folder, requests, prompts, console, kv_tokens,
                                                                   "vllm")
    static = run_static(folder, requests, prompts, console)
    sched = schedule_bench.measure("fcfs")
    table = Table(title=f"{n_requests} ShareGPT-length requests (scaled to {context} tokens), "
                        f"random Llama {folder.name}, CPU, prompts sharing no prefix")
    for col in ("engine", "output tokens", "wall s", "tok/s", "vs static", "TTFT p50 s", "peak RSS MiB"):
        table.add_column(col, justify="right")
    for name, r in engines.items():
        r["ratio"] = r["tok_s"] / static["tok_s"]
        table.add_row(name, f"{r['output_tokens']:,}", f"{r['wall_s']:.1f}", f"{r['tok_s']:,.0f}",
                      f"{r['ratio']:.2f}x", f"{r['ttft_p50_s']:.2f}", f"{r['peak_rss_mib']:,.0f}")
    table.add_row("transformers generate, batches of 32", f"{static['output_tokens']:,}", f"{static['wall_s']:.1f}",
                  f"{static['tok_s']:,.0f}", "1.00x", "-", "-")
    console.print(table)
    console.print("peak RSS is the worker process's own (vLLM's engine core runs in a child process, not counted)")
    console.print(f"schedule() with 256 running / 1,000 waiting: median {sched['median_ms']:.3f} ms, "
                  f"p90 {sched['p90_ms']:.3f} ms")
    tandem = engines["tandem torch worker (fcfs)"]
    payload = {"requests": requests, "engines": engines, "tandem": tandem, "static": static,
               "ratio": tandem["ratio"], "schedule": sched, "context": context, "checkpoint": str(folder)}
    if out is not None:
        console.print(f"results: {write_json(out, payload)}")
    return payload


if __name__ == "__main__":
    run()
