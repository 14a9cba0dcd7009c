"""Prefix caching and cache-aware routing on a multi-turn chat workload: ``tandem bench prefix``.

The workload is synthetic and shaped like chat traffic: a few applications, each with its own system prompt,
and conversations whose every turn resends the whole history (system prompt, earlier questions and answers)
plus a new question. Prompt blocks are named by ids as in the published prefix-sharing traces (Mooncake's
``hash_ids``), so equal ids are equal text on replay and the same tokens in the simulator. A JSONL trace with
``hash_ids`` can be given instead (``--trace``).

Two parts, each pair measured in the same run:

* **simulator** (the 12-GPU mixed cluster, Llama-2-7B): Tandem's capacity routing with the engines' cache off
  and on, the cache-aware router, Tandem's default pair, and what users would pick instead (``llmd/fcfs``,
  ``round_robin/fcfs``), all with the cache on unless named;
* **live**: CPU torch workers on a small random checkpoint behind the real gateway and balancer, the same pairs.

Reported: TTFT p50, output throughput over the run (arrivals to the last answer), SLO attainment, and the share
of prompt tokens the engines took from their caches. ``python -m bench.prefix`` prints the tables and writes JSON.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import grpc
from rich.console import Console
from rich.table import Table

from bench.metrics import summarize
from bench.replay import ReplayItem, replay
from bench.report import write_json
from bench.scenario import Scenario, Source, build_workload
from services.cluster import ClusterSpec, WorkerSpec, load_cluster
from services.catalog import model as model_spec
from services.rpc import worker_pb2, worker_pb2_grpc

CACHE_OFF = ":nocache"      # a pair suffix: the engines run without their prefix cache
SIM_PAIRS = ("round_robin/fcfs", "llmd/fcfs", "capacity/sage" + CACHE_OFF, "capacity/sage", "cache_aware/sage",
             "token_aware/sage")
LIVE_PAIRS = ("round_robin/fcfs", "llmd/fcfs", "capacity/sage" + CACHE_OFF, "capacity/sage", "cache_aware/sage")


@dataclass(frozen=True)
class Chats:
    """The shape of the multi-turn workload (token counts are multiples of ``block_tokens``)."""

    conversations: int = 600
    turns: int = 4
    apps: int = 4                            # distinct system prompts
    system_blocks: int = 32                  # system prompt length, in blocks
    question_blocks: tuple[int, int] = (2, 12)
    answer_blocks: tuple[int, int] = (4, 24)
    think_s: tuple[float, float] = (5.0, 20.0)   # from one turn's arrival to the next's
    rate: float = 8.0                        # conversations started per second (Poisson)
    block_tokens: int = 16
    max_tokens: int = 1024                   # the cap each request sends
    slo_class: str = "interactive"


def multi_turn(shape: Chats, seed: int = 0) -> list[ReplayItem]:
    """Every turn of every conversation as a replay item, in arrival order; turn k's prompt is the system prompt,
    the k earlier questions and answers, and its own question."""
    rng = random.Random(seed)
    ids = itertools.count(1)
    systems = [[next(ids) for _ in range(shape.system_blocks)] for _ in range(shape.apps)]
    items: list[ReplayItem] = []
    start = 0.0
    for _ in range(shape.conversations):
        start += rng.expovariate(shape.rate)
        history = list(rng.choice(systems))
        t = start
        for _turn in range(shape.turns):
            question = [next(ids) for _ in range(rng.randint(*shape.question_blocks))]
            blocks = history + question
            answer = rng.randint(*shape.answer_blocks) * shape.block_tokens
            n_in = len(blocks) * shape.block_tokens
            items.append(ReplayItem(t, n_in, answer, shape.slo_class, max_tokens=shape.max_tokens,
                                    prefix_hashes=tuple(blocks), block_tokens=shape.block_tokens))
            history = blocks + [next(ids) for _ in range(answer // shape.block_tokens)]
            t += rng.uniform(*shape.think_s)
    items.sort(key=lambda i: i.arrival_s)
    return items


def fit_window(items: Sequence[ReplayItem], window: int) -> list[ReplayItem]:
    """The turns whose prompt and answer fit the context window (a long conversation's late turns drop out)."""
    return [i for i in items if i.input_tokens + i.output_tokens < window]


def trace_items(path: Path, window: int, max_tokens: int, block_tokens: int) -> list[ReplayItem]:
    """A JSONL trace with ``hash_ids`` (Mooncake's scheme) as replay items, clipped to the window."""
    scenario = Scenario(name=path.stem, duration_s=1e9, sources=[
        Source(trace=str(path), max_tokens=max_tokens, block_tokens=block_tokens)])
    return build_workload(scenario, window)


# ----- the two parts ---------------------------------------------------------------------------------------
def split_pair(pair: str) -> tuple[str, str, bool]:
    """(routing, engine, prefix caching) of ``route/engine[:nocache]``."""
    caching = not pair.endswith(CACHE_OFF)
    route, _, engine = pair.removesuffix(CACHE_OFF).partition("/")
    return route, engine or "fcfs", caching


def with_caching(cluster: ClusterSpec, route: str, engine: str, caching: bool) -> ClusterSpec:
    return cluster.model_copy(update={
        "routing_policy": route, "engine_policy": engine, "routing_options": {}, "engine_options": {},
        "workers": [w.model_copy(update={"prefix_caching": caching}) for w in cluster.workers]})


def row_of(pair: str, summary: dict, hit: float) -> dict:
    a = summary["all"]
    return {"pair": pair, "requests": int(a["offered"]), "failed": int(a["failed"]), "slo_met": a["slo_attainment"],
            "ttft_p50_ms": a["ttft_ms_p50"], "ttft_p90_ms": a["ttft_ms_p90"], "e2e_p50_ms": a["e2e_ms_p50"],
            "throughput_tok_s": a["throughput_tok_s"], "cache_hit": hit}


def simulate(items: Sequence[ReplayItem], cluster: ClusterSpec, pairs: Sequence[str], console: Console) -> list[dict]:
    from bench.simulator import Simulator

    rows = []
    for pair in pairs:
        route, engine, caching = split_pair(pair)
        with console.status(f"simulating {pair} ..."):
            sim = Simulator(with_caching(cluster, route, engine, caching), route, engine, seed=0)
            result = sim.run(items)
        blocks = [w.engine.scheduler.blocks for w in sim.workers.values()]
        hit = sum(b.hit_tokens for b in blocks) / max(1, sum(b.queried_tokens for b in blocks))
        rows.append(row_of(pair, summarize(result.records, result.duration_s), hit))
    return rows


def one_token_prompts(folder: Path, seed: int) -> Callable[[ReplayItem], str]:
    """Prompts of exactly ``input_tokens`` tokens of the checkpoint's tokenizer: block ``h``'s words are a function
    of ``h`` alone (equal ids, equal tokens, block for block), the rest random per call."""
    from bench.live_slo import one_token_words

    words = one_token_words(folder)
    unique = random.Random(seed)

    def prompt_for(item: ReplayItem) -> str:
        size = item.block_tokens
        blocks = item.prefix_hashes[:-(-item.input_tokens // size)]
        out = [words[hash((h, j)) % len(words)] for h in blocks for j in range(size)]
        # BOS takes the first position: one word less, so the blocks line up with the engine's
        out = out[:item.input_tokens - 1]
        out += [unique.choice(words) for _ in range(item.input_tokens - 1 - len(out))]
        return " " + " ".join(out)
    return prompt_for


def cache_counts(stack: object, cluster: ClusterSpec) -> tuple[int, int]:
    """(hit, queried) prompt tokens, summed over the workers' stats."""
    hit = queried = 0
    for w in cluster.workers:
        with grpc.insecure_channel(stack.worker_address(w.id)) as channel:
            s = worker_pb2_grpc.WorkerStub(channel).GetStats(worker_pb2.GetStatsRequest(), timeout=10)
        hit, queried = hit + s.prefix_hit_tokens, queried + s.prefix_queried_tokens
    return hit, queried


def live(items: Sequence[ReplayItem], cluster: ClusterSpec, pairs: Sequence[str], prompt_for: Callable,
         console: Console) -> list[dict]:
    from bench.live_slo import SLO_CLASSES, warm
    from bench.overload import started_stack

    rows = []
    for pair in pairs:
        route, engine, caching = split_pair(pair)
        spec = with_caching(cluster, route, engine, caching).model_copy(update={"slo_classes": SLO_CLASSES})
        with started_stack(spec, pair, "tandem-prefix-", console) as (stack, _):
            warm(stack, spec)
            with console.status(f"replaying {len(items)} requests through {pair} ..."):
                records, duration = asyncio.run(replay(stack.gateway_address, items, slo_classes=SLO_CLASSES,
                                                       timeout_s=600, prompt_for=prompt_for))
            hit, queried = cache_counts(stack, spec)
        rows.append(row_of(pair, summarize(records, duration), hit / max(1, queried)))
        console.print(f"  {pair}: TTFT p50 {rows[-1]['ttft_p50_ms']:.0f} ms, "
                      f"{rows[-1]['throughput_tok_s']:.0f} tok/s, cache hit {rows[-1]['cache_hit']:.0%}")
    return rows


def table_of(rows: list[dict], title: str, reference: str = "capacity/sage" + CACHE_OFF) -> Table:
    ref = next((r for r in rows if r["pair"] == reference), None)
    table = Table(title=title)
    for col in ("pair", "requests", "failed", "SLO met", "TTFT p50 ms", "TTFT p90 ms", "E2E p50 ms", "tok/s",
                "cache hit", f"TTFT p50 vs {reference}"):
        table.add_column(col, justify="left" if col == "pair" else "right")
    for r in rows:
        ratio = f"{r['ttft_p50_ms'] / ref['ttft_p50_ms']:.2f}x" if ref and ref["ttft_p50_ms"] else ""
        table.add_row(r["pair"], str(r["requests"]), str(r["failed"]), f"{r['slo_met']:.1%}",
                      f"{r['ttft_p50_ms']:,.0f}", f"{r['ttft_p90_ms']:,.0f}", f"{r['e2e_p50_ms']:,.0f}",
                      f"{r['throughput_tok_s']:,.0f}", f"{r['cache_hit']:.0%}", ratio)
    return table


@dataclass
class Settings:
    sim: bool = True
    live: bool = True
    trace: Path | None = None               # a JSONL with hash_ids instead of the synthetic chats
    sim_chats: Chats = Chats()
    live_chats: Chats = Chats(conversations=80, turns=4, apps=2, system_blocks=48, question_blocks=(2, 8),
                              answer_blocks=(2, 6), think_s=(2.0, 6.0), rate=3.0, max_tokens=128)
    live_workers: int = 2
    kv_blocks: int = 1024                   # per live worker, in blocks of 16 tokens
    torch_threads: int = 1
    seed: int = 0


def live_cluster(folder: Path, s: Settings) -> ClusterSpec:
    return ClusterSpec(workers=[WorkerSpec(id=f"cpu-{k}", executor="torch", model=str(folder), kv_blocks=s.kv_blocks,
                                           block_size=16, torch_threads=s.torch_threads)
                                for k in range(s.live_workers)])


def run(s: Settings | None = None, out: Path | None = Path("bench/results/prefix.json"),
        console: Console | None = None) -> dict:
    s = s or Settings()
    console = console or Console(stderr=True)
    started = time.perf_counter()
    payload: dict = {"settings": {k: (asdict(v) if isinstance(v, Chats) else str(v) if isinstance(v, Path) else v)
                                  for k, v in s.__dict__.items()}}
    if s.sim:
        from bench.simulate import default_cluster_path

        cluster = load_cluster(default_cluster_path())
        window = min(model_spec(w.model).max_model_len for w in cluster.workers)
        items = trace_items(s.trace, window, s.sim_chats.max_tokens, s.sim_chats.block_tokens) if s.trace else \
            fit_window(multi_turn(s.sim_chats, s.seed), window)
        rows = simulate(items, cluster, SIM_PAIRS, console)
        console.print(table_of(rows, f"simulator: {len(items)} multi-turn requests on {len(cluster.workers)} "
                                     "workers (llama-2-7b)"))
        payload["simulator"] = {"requests": len(items), "rows": rows}
    if s.live:
        from bench.engine import bench_checkpoint

        folder = bench_checkpoint()
        cluster = live_cluster(folder, s)
        items = trace_items(s.trace, 2048, s.live_chats.max_tokens, s.live_chats.block_tokens) if s.trace else \
            fit_window(multi_turn(s.live_chats, s.seed), 2048)
        rows = live(items, cluster, LIVE_PAIRS, one_token_prompts(folder, s.seed), console)
        console.print(table_of(rows, f"live: {len(items)} multi-turn requests on {s.live_workers} CPU torch workers"))
        payload["live"] = {"requests": len(items), "rows": rows}
    payload["wall_s"] = time.perf_counter() - started
    if out is not None:
        console.print(f"results: {write_json(out, payload)}")
    return payload


def main() -> None:
    run()


if __name__ == "__main__":
    main()

