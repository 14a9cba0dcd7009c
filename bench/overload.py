"""Overload: a sustained open-loop load at several times the cluster's capacity on a live local stack.

``python -m bench.overload`` (or ``tandem bench overload``) starts the default cluster (``services/data/
default_cluster.yaml``: three sim workers, ``token_aware/sage``; ``--cluster`` names another file) with
``tandem.launcher.LocalStack`` and checks the overload claim:

    a 60 s overload at 5x the cluster's capacity: memory of every process stays bounded (peak RSS), sheddable work
    is refused with a retry hint, admitted interactive work keeps >= 90% SLO attainment, and the stack serves
    normally within 5 s after.

Steps, all on one stack:

1. *Capacity* (skipped with ``--capacity``): a short ramp of the same mix, Poisson arrivals at a rising rate
   (``--ramp-step`` seconds each, x1.5 a step, then one step between the last pass and the first miss), each step
   run to completion; the capacity is the highest rate whose overall SLO attainment (met / sent, every class) is
   >= 90%: DESIGN.md's goodput, measured live on this machine. On a small shared machine that is set by the CPU the
   stack's processes get as much as by the simulated GPUs, and it moves with the machine's other load; the roofline
   bound of the three simulated GPUs for the mix's lengths is printed beside it for scale.
2. *Overload*: ``--factor`` x capacity for ``--duration`` seconds, open loop (arrivals never wait for answers). The
   mix, by requests: ``interactive`` 50% (Azure conversation lengths), ``code`` 25% (Azure code lengths),
   ``batch`` 25% (ShareGPT lengths; the only sheddable class of ``services.slo.DEFAULT_SLO_CLASSES``). Lengths are
   hidden: each request sends a client cap (2,048, clipped to the window) and the true length only in the
   benchmark-only ``replay_truth``. Every prompt starts with a word of its own, so no two share a cached prefix.
   Requests carry no client deadline by default (a streaming client waits while tokens come; ``--deadline`` sets
   one), so nothing but the stack itself bounds its backlog. Meanwhile every stack process's VmRSS is sampled each
   second; VmHWM (peak RSS) is read at the end.
3. *Recovery*: from the moment the last overload request is sent, one fresh interactive probe (512-token prompt,
   64-token answer) every 0.25 s for ``--probe-window`` seconds, while the overload's backlog is still in the
   stack. Recovery time: the send time (after the load stopped) of the first probe from which every later probe
   met its SLO; it must be <= 5 s. Then the client waits up to ``--drain`` seconds (60) for the overload's requests
   still running and gives up on the rest (cancels them: the gateway aborts them on the workers); they are reported
   as UNFINISHED, admitted and not met.

Reported per class: sent, OK, SLO met among OK, SLO met among the admitted (sent less refused: an admitted
request that failed or was still unfinished at the end counts as missed), refused (RESOURCE_EXHAUSTED, by the
balancer or by an engine's triage) and how many of those carried ``retry-after-ms`` trailing metadata, every other
status, and which target the misses missed. Per process: RSS at the start, 10 s in, the middle and the end of the
overload, VmHWM, and CPU cores used; "bounded" is RSS growing less than 10% (or 20 MiB) over the load's second half.
The client (one ``grpc.aio`` channel, one asyncio loop) shares the machine with the stack; its CPU share, the
machine's load average and any worker the balancer dropped for missed load reports (a sign the machine's other
load starved the stack) are printed. JSON (per-request rows included) goes to ``bench/results/overload.json``.

Measured (2-core shared machine, capacity 17.5 requests/s from the ramp, 87.5/s for 60 s): the current default
(``sage`` engines, balancer binding at once, no admission control) refuses nothing; RSS grows all along (gateway
83 -> 426 MiB, a100 worker 86 -> 343 MiB), 8% of interactive requests meet their SLO, 1,963 of 2,569 are still
unfinished a minute after the load, and recovery takes 6.5 s. See ``/tmp/overload_fix.diff`` (balancer admission
control, engine option ``refuse_late``) for the change that meets every target there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import grpc
from rich.console import Console
from rich.table import Table

from bench.replay import DEFAULT_MAX_TOKENS, clip_to_window, unique_prompt
from bench.report import write_json
from services.rpc import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.cluster import ClusterSpec, load_cluster
from services.slo import DEFAULT_SLO_CLASSES, SloClass, met
from tandem.launcher import LocalStack, StackError

CLASSES = ("interactive", "code", "batch")
MIX = {"interactive": 0.5, "code": 0.25, "batch": 0.25}       # share of requests
TRACE_OF = {"interactive": "conv", "code": "code", "batch": "sharegpt"}
WINDOW = 4096                        # llama-2-7b's context, the default cluster's model
PROBE_PROMPT, PROBE_ANSWER = 512, 64
RECOVERY_TARGET_S = 5.0
ATTAINMENT_TARGET = 0.9


# ----- workload --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    arrival_s: float
    slo_class: str
    input_tokens: int
    output_tokens: int                 # the true length: reaches only the sim executor's stop rule
    cap: int                           # max_tokens, what the schedulers see
    tenant: str = ""
    tag: str = "load"                  # "load", "probe", "ramp"


class Lengths:
    """(prompt, true answer, cap) samples per class from the shared traces, fitted to the model's window."""

    def __init__(self, window: int = WINDOW, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        from bench.traces import default_trace_path, load_azure, load_sharegpt_lengths

        self.rows: dict[str, list[tuple[int, int]]] = {}
        for cls, trace in TRACE_OF.items():
            if trace == "sharegpt":
                pairs = load_sharegpt_lengths()
            else:
                rows = load_azure(default_trace_path(trace), duration_s=600)
                pairs = [(r.input_tokens, r.output_tokens) for r in rows]
            self.rows[cls] = [clip_to_window(i, o, window, max_tokens) for i, o in pairs]

    def sample(self, rng: random.Random, cls: str) -> tuple[int, int, int]:
        return rng.choice(self.rows[cls])

    def mean(self, cls: str) -> tuple[float, float]:
        rows = self.rows[cls]
        return statistics.fmean(r[0] for r in rows), statistics.fmean(r[1] for r in rows)


def poisson(rate: float, duration_s: float, seed: int | str, mix: Mapping[str, float], lengths: Lengths,
            tenant: str = "", tag: str = "load") -> list[Item]:
    """Poisson arrivals at ``rate`` requests/s for ``duration_s``; each request's class drawn from ``mix``."""
    rng = random.Random(f"{seed}")
    names, weights = list(mix), list(mix.values())
    items, t = [], 0.0
    if rate <= 0:
        return items
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return items
        cls = rng.choices(names, weights)[0]
        n_in, n_out, cap = lengths.sample(rng, cls)
        items.append(Item(t, cls, n_in, n_out, cap, tenant, tag))


# ----- the client ------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    item: Item
    sent: float                        # perf_counter at send
    code: str = ""                     # "OK" or the gRPC status name
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    retry_after_ms: str | None = None  # the trailing hint of a refusal
    detail: str = ""
    worker_id: str = ""

    def slo_met(self, classes: Mapping[str, SloClass]) -> bool:
        if self.code != "OK" or self.first is None:
            return False
        tpot = (self.last - self.first) / (self.tokens - 1) * 1000 if self.tokens > 1 else None
        return met(classes[self.item.slo_class], (self.first - self.sent) * 1000, tpot, (self.last - self.sent) * 1000)

    @property
    def refused(self) -> bool:
        return self.code == "RESOURCE_EXHAUSTED"


class Client:
    """One grpc.aio channel to the gateway; requests sent open loop, each timed on the client."""

    def __init__(self, channel: grpc.aio.Channel, deadline_s: float | None = None) -> None:
        self.stub = gateway_pb2_grpc.GatewayStub(channel)
        self.deadline_s = deadline_s
        self.in_flight = 0

    async def send(self, item: Item) -> Outcome:
        request = gateway_pb2.GenerateRequest(
            prompt=unique_prompt(item.input_tokens), max_tokens=item.cap, slo_class=item.slo_class, temperature=0.0,
            tenant=item.tenant, replay_truth=common_pb2.ReplayTruth(output_tokens=item.output_tokens))
        out = Outcome(item, time.perf_counter())
        self.in_flight += 1
        call = self.stub.Generate(request, timeout=self.deadline_s)
        try:
            async for reply in call:
                n = len(reply.token_ids)
                if n:
                    now = time.perf_counter()
                    if out.first is None:
                        out.first = now
                    out.last = now
                    out.tokens += n
                if reply.finish_reason:
                    out.worker_id = reply.metrics.worker_id
            out.code = "OK"
        except grpc.aio.AioRpcError as e:
            out.code, out.detail = e.code().name, (e.details() or "")[:200]
            for key, value in (e.trailing_metadata() or ()):
                if key == "retry-after-ms":
                    out.retry_after_ms = value if isinstance(value, str) else value.decode()
        except asyncio.CancelledError:       # the bench gave up on it (``finish``): an outcome, not an error
            call.cancel()
            out.code = "UNFINISHED"
        finally:
            self.in_flight -= 1
        return out

    async def run(self, items: Sequence[Item], start: float | None = None,
                  on_sent: Callable[[], None] | None = None) -> tuple[list[asyncio.Task], float]:
        """Send each item at ``start + arrival_s`` (open loop); returns the tasks (not awaited) and the time the
        last one was sent."""
        start = time.perf_counter() if start is None else start
        tasks = []
        for item in sorted(items, key=lambda i: i.arrival_s):
            delay = start + item.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.send(item)))
            if on_sent is not None:
                on_sent()
        return tasks, time.perf_counter()


async def finish(tasks: Sequence[asyncio.Task], limit_s: float) -> list[Outcome]:
    """Every task's outcome, waiting at most ``limit_s`` for the last ones; those still running are cancelled
    (the client gives up) and come back UNFINISHED."""
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=limit_s)
        for task in pending:
            task.cancel()
    return list(await asyncio.gather(*tasks))


async def run_all(client: Client, items: Sequence[Item], limit_s: float = 120.0) -> list[Outcome]:
    tasks, _ = await client.run(items)
    return await finish(tasks, limit_s)


# ----- per-process memory and CPU --------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process in KiB ({} once it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def proc_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class MemorySampler:
    """VmRSS of every named process, once a ``period_s``, on a thread of its own (off the client's loop)."""

    def __init__(self, pids: Mapping[str, int], period_s: float = 1.0) -> None:
        self.pids = dict(pids)
        self.period_s = period_s
        self.samples: list[tuple[float, dict[str, int]]] = []      # (perf_counter, name -> KiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period_s)

    def sample(self) -> None:
        self.samples.append((time.perf_counter(), {n: proc_status(p).get("VmRSS", 0) for n, p in self.pids.items()}))

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, t: float) -> dict[str, int]:
        """The sample nearest to ``t`` (perf_counter)."""
        return min(self.samples, key=lambda s: abs(s[0] - t))[1] if self.samples else {}

    def peak(self, t0: float, t1: float) -> dict[str, int]:
        window = [s for ts, s in self.samples if t0 <= ts <= t1]
        return {n: max(s.get(n, 0) for s in window) for n in self.pids} if window else {}


def stack_pids(stack: object) -> dict[str, int]:
    pids = {name: p.popen.pid for name, p in stack.processes.items()}
    pids["client"] = os.getpid()
    return pids


def worker_drops(stack: object) -> int:
    """How often the balancer took a worker out of rotation so far (its load reports stopped: on a contended
    machine, a process that got no CPU for over 1.5 s); > 0 marks a run the machine's other load disturbed."""
    try:
        text = stack.processes["balancer"].stderr_path.read_text(errors="replace")
    except (OSError, KeyError):
        return 0
    return text.count('"worker removed"')


def cpu_snapshot(pids: Mapping[str, int]) -> dict[str, float | None]:
    cpu = {n: proc_cpu_s(p) for n, p in pids.items() if n != "client"}
    cpu["client"] = time.process_time()
    return cpu


def cpu_cores(before: Mapping[str, float | None], after: Mapping[str, float | None], wall: float) -> dict:
    return {n: (after[n] - before[n]) / wall if before.get(n) is not None and after.get(n) is not None else None
            for n in before}


# ----- summaries -------------------------------------------------------------------------------------------
def class_rows(outcomes: Sequence[Outcome], classes: Mapping[str, SloClass],
               key: Callable[[Outcome], str] = lambda o: o.item.slo_class) -> dict[str, dict]:
    """Per group (class by default) and ``all``: sent, OK, met, refused (with a hint), other statuses."""
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(key(o), []).append(o)
    groups["all"] = list(outcomes)
    rows = {}
    for name, os_ in groups.items():
        ok = [o for o in os_ if o.code == "OK"]
        n_met = sum(o.slo_met(classes) for o in ok)
        refused = [o for o in os_ if o.refused]
        other: dict[str, int] = {}
        for o in os_:
            if o.code not in ("OK", "RESOURCE_EXHAUSTED"):
                other[o.code] = other.get(o.code, 0) + 1
        admitted = len(os_) - len(refused)
        ttfts = [(o.first - o.sent) * 1000 for o in ok if o.first is not None]
        rows[name] = {
            "sent": len(os_), "ok": len(ok), "met": n_met, "refused": len(refused),
            "refused_with_retry_hint": sum(1 for o in refused if o.retry_after_ms is not None),
            "retry_after_ms_median": statistics.median([int(o.retry_after_ms) for o in refused
                                                        if o.retry_after_ms and o.retry_after_ms.isdigit()] or [0]),
            "other": other, "admitted": admitted,
            "met_among_ok": n_met / len(ok) if ok else float("nan"),
            "met_among_admitted": n_met / admitted if admitted else float("nan"),
            "met_among_sent": n_met / len(os_) if os_ else float("nan"),
            "ttft_ms_p50": statistics.median(ttfts) if ttfts else float("nan"),
            "ttft_ms_p90": _quantile(ttfts, 0.9),
            "output_tokens": sum(o.tokens for o in os_),
            "missed_by": _missed_by(ok, classes),
            "refusal_reasons": _reasons(refused)}
    return rows


def _missed_by(ok: Sequence[Outcome], classes: Mapping[str, SloClass]) -> dict[str, int]:
    """Answers that missed, by the target they missed (TTFT, TPOT, E2E; one answer may miss two)."""
    out = {"ttft": 0, "tpot": 0, "e2e": 0}
    for o in ok:
        if o.first is None or o.slo_met(classes):
            continue
        slo = classes[o.item.slo_class]
        if slo.e2e_ms:
            out["e2e"] += 1
            continue
        if (o.first - o.sent) * 1000 > slo.ttft_ms:
            out["ttft"] += 1
        if o.tokens > 1 and slo.tpot_ms and (o.last - o.first) / (o.tokens - 1) * 1000 > slo.tpot_ms:
            out["tpot"] += 1
    return out


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, int(q * len(ranked)))]


def _reasons(refused: Sequence[Outcome]) -> dict[str, int]:
    """Where refusals came from: the balancer's queue, an engine's triage, or elsewhere."""
    out: dict[str, int] = {}
    for o in refused:
        d = o.detail
        where = "balancer" if d.startswith("balancer") else "worker triage" if "refused" in d else d[:60] or "?"
        out[where] = out.get(where, 0) + 1
    return out


def pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1%}"


def mib(kib: int | None) -> str:
    return "-" if not kib else f"{kib / 1024:,.0f}"


def outcome_table(rows: Mapping[str, dict], title: str, first_col: str = "class") -> Table:
    table = Table(title=title)
    for col in (first_col, "sent", "OK", "met/OK", "met/admitted", "met/sent", "refused", "w/ retry hint",
                "hint p50 ms", "other statuses", "missed TTFT/TPOT/E2E", "TTFT p50/p90 ms"):
        table.add_column(col, justify="left" if col in (first_col, "other statuses") else "right", no_wrap=True)
    for name in sorted(rows, key=lambda n: (n == "all", n)):
        r = rows[name]
        table.add_row(name, str(r["sent"]), str(r["ok"]), pct(r["met_among_ok"]), pct(r["met_among_admitted"]),
                      pct(r["met_among_sent"]), str(r["refused"]), str(r["refused_with_retry_hint"]),
                      f"{r['retry_after_ms_median']:,.0f}" if r["refused"] else "-",
                      ", ".join(f"{k} {v}" for k, v in sorted(r["other"].items())) or "-",
                      "/".join(str(r["missed_by"][k]) for k in ("ttft", "tpot", "e2e")),
                      f"{r['ttft_ms_p50']:,.0f} / {r['ttft_ms_p90']:,.0f}" if r["ok"] else "-",
                      end_section=name == sorted(rows, key=lambda n: (n == "all", n))[-2] if len(rows) > 1 else False)
    return table


# ----- capacity --------------------------------------------------------------------------------------------
def roofline_capacity(cluster: object, mix: Mapping[str, float], lengths: Lengths) -> float:
    """Requests/s the simulated GPUs could serve at saturation for the mix's mean lengths (a roofline bound)."""
    from services.latency import LatencyModel, gpu, model

    total = sum(mix.values())
    mean_in = sum(w * lengths.mean(c)[0] for c, w in mix.items()) / total
    mean_out = sum(w * lengths.mean(c)[1] for c, w in mix.items()) / total
    tok_s = 0.0
    for spec in cluster.workers:
        if spec.executor != "sim":
            return float("nan")
        lm = LatencyModel(gpu(spec.gpu_type), model(spec.model))
        tok_s += lm.saturated_throughput(mean_in, mean_out, spec.max_num_seqs) / spec.time_scale
    return tok_s / mean_out


def ramp(address: str, mix: Mapping[str, float], lengths: Lengths, classes: Mapping[str, SloClass],
         start_rate: float, step_s: float, deadline_s: float | None, seed: int, console: Console,
         growth: float = 1.5, max_steps: int = 10) -> tuple[float, list[dict]]:
    """The highest rate of the mix with overall attainment (met / sent) >= 90%: steps at rising rates, each run to
    completion, then one step between the last pass and the first miss."""
    steps: list[dict] = []

    def step(rate: float) -> bool:
        items = poisson(rate, step_s, f"{seed}:ramp:{rate:.4f}", mix, lengths, tag="ramp")
        if not items:
            return True

        async def go() -> list[Outcome]:
            async with grpc.aio.insecure_channel(address) as channel:
                return await run_all(Client(channel, deadline_s), items, limit_s=60.0)

        with console.status(f"capacity ramp: {rate:.2f} requests/s for {step_s:g} s ..."):
            t0 = time.perf_counter()
            outcomes = asyncio.run(go())
        rows = class_rows(outcomes, classes)
        ok = rows["all"]["met_among_sent"] >= ATTAINMENT_TARGET
        steps.append({"rate": rate, "wall_s": time.perf_counter() - t0, "pass": ok,
                      "attainment": rows["all"]["met_among_sent"],
                      "by_class": {c: rows[c]["met_among_sent"] for c in rows if c != "all"}})
        by_class = ", ".join(f"{c} {rows[c]['met_among_sent']:.0%}" for c in CLASSES if c in rows)
        console.print(f"  ramp {rate:6.2f}/s: {len(items)} requests, {rows['all']['met_among_sent']:.1%} met "
                      f"({by_class}) -> {'pass' if ok else 'miss'}")
        return ok

    rate, passed, failed = start_rate, 0.0, None
    for _ in range(max_steps):
        if step(rate):
            passed, rate = rate, rate * growth
        else:
            failed = rate
            break
    if failed is not None and passed > 0:
        middle = math.sqrt(passed * failed)
        if step(middle):
            passed = middle
    elif failed is not None:        # even the first step missed: halve until one passes
        rate = failed
        for _ in range(4):
            rate /= 2
            if step(rate):
                passed = rate
                break
    return passed, steps


# ----- recovery --------------------------------------------------------------------------------------------
def recovery(probes: Sequence[Outcome], stop: float, classes: Mapping[str, SloClass]) -> dict:
    """Probe results against the time the load stopped: the first probe that met its SLO, and the first from which
    every later one did (recovered), in seconds after ``stop``."""
    ordered = sorted(probes, key=lambda o: o.sent)
    flags = [o.slo_met(classes) for o in ordered]
    first = next((o.sent - stop for o, f in zip(ordered, flags) if f), None)
    recovered = None
    for k in range(len(ordered) - 1, -1, -1):
        if not flags[k]:
            break
        recovered = ordered[k].sent - stop
    return {"probes": len(ordered), "met": sum(flags), "first_met_s": first, "recovered_s": recovered,
            "timeline": [{"sent_s": round(o.sent - stop, 3), "code": o.code, "met": f,
                          "ttft_ms": round((o.first - o.sent) * 1000, 1) if o.first else None,
                          "tpot_ms": round((o.last - o.first) / (o.tokens - 1) * 1000, 1)
                          if o.first and o.tokens > 1 else None} for o, f in zip(ordered, flags)]}


# ----- the run ---------------------------------------------------------------------------------------------
@dataclass
class Settings:
    duration_s: float = 60.0
    factor: float = 5.0
    capacity: float | None = None          # requests/s; None: measure it with the ramp
    ramp_step_s: float = 15.0
    ramp_start: float | None = None        # None: half the roofline bound
    deadline_s: float | None = None        # client deadline per request; None: none
    drain_s: float = 60.0                  # after the probes, how long the client waits for the load's last answers
    probe_window_s: float = 10.0
    probe_every_s: float = 0.25
    seed: int = 0
    cluster: str | None = None             # a cluster file; None: the default cluster
    mix: dict[str, float] = field(default_factory=lambda: dict(MIX))


def run(s: Settings, out: Path | None = Path("bench/results/overload.json"), console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    if not console.is_terminal:
        console.width = max(console.width, 180)
    started = time.perf_counter()
    cluster = load_cluster(s.cluster)
    classes = dict(cluster.slo_classes or DEFAULT_SLO_CLASSES)
    missing = [c for c in s.mix if c not in classes]
    if missing:
        raise ValueError(f"the mix names classes the cluster does not define: {missing}")
    with console.status("reading the traces ..."):
        lengths = Lengths()
    roofline = roofline_capacity(cluster, s.mix, lengths)
    with started_stack(cluster, s.cluster, "tandem-overload-", console) as (stack, log_root):
        return _run_on(stack, s, cluster, classes, lengths, roofline, log_root, started, out, console)


@contextlib.contextmanager
def started_stack(cluster: ClusterSpec, name: str | None, prefix: str, console: Console
                  ) -> Iterator[tuple[LocalStack, Path]]:
    """A live stack of ``cluster`` (said on the console, logs in a fresh folder), stopped at the end."""
    log_root = Path(tempfile.mkdtemp(prefix=prefix))
    console.print(f"cluster: {name or 'default'} ({cluster.routing_policy}/{cluster.engine_policy}, "
                  f"engine options {cluster.engine_options or '{}'}, "
                  f"routing options {cluster.routing_options or '{}'}, "
                  f"queue {cluster.queue_limit}/{cluster.shed_at:g}/{cluster.queue_order}); "
                  f"{len(cluster.workers)} workers; logs under {log_root}")
    try:
        with console.status("starting the stack ..."):
            stack = LocalStack(cluster, gateway_port=0, log_dir=log_root).start()
    except StackError as e:
        raise RuntimeError(f"the stack failed to start: {e}") from e
    try:
        yield stack, log_root
    finally:
        with console.status("stopping the stack ..."):
            stack.stop()


def _run_on(stack: object, s: Settings, cluster: object, classes: dict[str, SloClass], lengths: Lengths,
            roofline: float, log_root: Path, started: float, out: Path | None, console: Console) -> dict:
    address = stack.gateway_address
    # warm: a few requests of each class (the length predictor's history, the channels)
    asyncio.run(_warm(address, lengths, s.mix, s.seed))
    steps: list[dict] = []
    if s.capacity is None:
        start = s.ramp_start or max(0.5, roofline / 2 if math.isfinite(roofline) else 2.0)
        console.print(f"measuring capacity: ramp from {start:.2f} requests/s, {s.ramp_step_s:g} s a step "
                      f"(roofline bound of the simulated GPUs: {roofline:.1f} requests/s)")
        capacity, steps = ramp(address, s.mix, lengths, classes, start, s.ramp_step_s, s.deadline_s,
                               s.seed, console)
        if capacity <= 0:
            raise RuntimeError("the stack met 90% of SLOs at no rate of the ramp; pass --capacity")
    else:
        capacity = s.capacity
    rate = capacity * s.factor
    items = poisson(rate, s.duration_s, f"{s.seed}:load", s.mix, lengths)
    console.print(f"capacity {capacity:.2f} requests/s -> overload at x{s.factor:g}: {rate:.1f} requests/s for "
                  f"{s.duration_s:g} s ({len(items)} requests; {_deadline(s)})")

    pids = stack_pids(stack)
    hwm_before = {n: proc_status(p).get("VmHWM", 0) for n, p in pids.items()}
    drops0, load0 = worker_drops(stack), _loadavg()
    result = asyncio.run(_overload(address, items, s, pids, console))
    drops = worker_drops(stack) - drops0
    sampler, t_start, t_stop, t_end = result["sampler"], result["t_start"], result["t_stop"], result["t_end"]
    hwm = {n: proc_status(p).get("VmHWM", 0) for n, p in pids.items()}
    load_rows = class_rows(result["load"], classes)
    rec = recovery(result["probes"], t_stop, classes)

    # memory: RSS at 10 s, at the middle, at the end of the load, and after; the load's peak; VmHWM (lifetime)
    marks = {"start": t_start, "10s": t_start + min(10.0, s.duration_s / 2), "mid": t_start + s.duration_s / 2,
             "end": t_stop, "after": t_end}
    rss = {k: sampler.at(t) for k, t in marks.items()}
    peak = sampler.peak(t_start, t_end)
    memory = {}
    for name in pids:
        first, mid, end = rss["10s"].get(name, 0), rss["mid"].get(name, 0), rss["end"].get(name, 0)
        memory[name] = {"rss_kib": {k: v.get(name, 0) for k, v in rss.items()}, "peak_rss_kib": peak.get(name, 0),
                        "vmhwm_kib": hwm.get(name, 0), "vmhwm_before_kib": hwm_before.get(name, 0),
                        "growth_second_half_kib": end - mid, "growth_10s_to_end_kib": end - first}
    cores = result["cpu_cores"]
    bounded = {n: m["growth_second_half_kib"] <= max(0.1 * m["rss_kib"]["mid"], 20 * 1024) for n, m in memory.items()}

    inter = load_rows.get("interactive", {})
    batch = load_rows.get("batch", {})
    checks = {
        "memory_bounded (RSS grows < 10% or 20 MiB over the load's second half, every process)": all(bounded.values()),
        "sheddable refused with a retry hint": bool(batch.get("refused")) and
        batch.get("refused_with_retry_hint") == batch.get("refused"),
        "admitted interactive >= 90% SLO met": (inter.get("met_among_admitted") or 0) >= ATTAINMENT_TARGET,
        f"recovered within {RECOVERY_TARGET_S:g} s": rec["recovered_s"] is not None
        and rec["recovered_s"] <= RECOVERY_TARGET_S}

    title = (f"overload x{s.factor:g}: {rate:.1f} requests/s for {s.duration_s:g} s on {cluster.routing_policy}/"
             f"{cluster.engine_policy} (capacity {capacity:.2f}/s; mix "
             + ", ".join(f"{c} {w:.0%}" for c, w in s.mix.items()) + f"; {_deadline(s)})")
    console.print(outcome_table(load_rows, title))
    console.print(memory_table(memory, cores, bounded))
    console.print(f"recovery: {rec['met']}/{rec['probes']} probes met their SLO; first met "
                  f"{_s(rec['first_met_s'])} after the load stopped, every probe met from {_s(rec['recovered_s'])}")
    console.print(f"client (load generator) CPU: {cores.get('client', 0):.2f} cores over the load; stack: "
                  f"{sum(v for n, v in cores.items() if n != 'client' and v):.2f} cores; machine load average "
                  f"{load0} before, {_loadavg()} after")
    if drops:
        console.print(f"[yellow]the balancer dropped a worker {drops} time(s) for missed load reports during the run: "
                      "the machine's other load starved the stack; its figures are disturbed[/yellow]")
    for name, ok in checks.items():
        console.print(f"  {'[green]PASS[/green]' if ok else '[red]MISS[/red]'} {name}")
    wall = time.perf_counter() - started
    payload = {"settings": asdict(s), "cluster": cluster.model_dump(), "slo_classes": {k: v.model_dump() for k, v in
                                                                                     classes.items()},
               "capacity_rps": capacity, "roofline_capacity_rps": roofline, "ramp": steps, "rate_rps": rate,
               "requests": len(items), "load": load_rows, "load_by_worker": _by_worker(result["load"], classes),
               "memory": memory, "memory_bounded": bounded, "cpu_cores": cores,
               "rss_timeline": [{"t_s": round(ts - t_start, 2), **v} for ts, v in sampler.samples],
               "recovery": rec, "checks": checks,
               "request_columns": ["sent_s", "class", "tenant", "prompt", "answer", "status", "tokens", "ttft_ms",
                                   "tpot_ms", "met", "worker", "detail"],
               "requests_log": request_rows(result["load"], t_start, classes), "send_lag_s": result["send_lag_s"],
               "load_wall_s": t_stop - t_start, "wall_s": wall, "load_average": {"before": load0, "after": _loadavg()},
               "worker_drops": drops, "logs": str(log_root)}
    console.print(f"wall time {wall:.0f} s")
    if out is not None:
        console.print(f"results: {write_json(out, payload)}")
    return payload


def _deadline(s: Settings) -> str:
    return (f"client deadline {s.deadline_s:g} s" if s.deadline_s else "no client deadline") + \
        f", unfinished {s.drain_s:g} s after the probes: given up"


def _s(v: float | None) -> str:
    return "never" if v is None else f"{v:.2f} s"


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def request_rows(outcomes: Sequence[Outcome], t0: float, classes: Mapping[str, SloClass]) -> list[list]:
    """One compact row per request, for analysis: [sent s, class, tenant, prompt, true answer, status, tokens, TTFT ms,
    TPOT ms, met, worker, status detail]."""
    rows = []
    for o in sorted(outcomes, key=lambda o: o.sent):
        ttft = round((o.first - o.sent) * 1000, 1) if o.first is not None else None
        tpot = round((o.last - o.first) / (o.tokens - 1) * 1000, 1) if o.first is not None and o.tokens > 1 else None
        rows.append([round(o.sent - t0, 3), o.item.slo_class, o.item.tenant, o.item.input_tokens, o.item.output_tokens,
                     o.code, o.tokens, ttft, tpot, o.slo_met(classes), o.worker_id, o.detail[:120]])
    return rows


def _by_worker(outcomes: Sequence[Outcome], classes: Mapping[str, SloClass]) -> dict[str, dict]:
    """Answered requests per worker and class, and how many met their SLO there."""
    out: dict[str, dict] = {}
    for o in outcomes:
        if o.code == "OK":
            row = out.setdefault(o.worker_id or "-", {}).setdefault(o.item.slo_class, {"ok": 0, "met": 0})
            row["ok"] += 1
            row["met"] += o.slo_met(classes)
    return dict(sorted(out.items()))


def memory_table(memory: Mapping[str, dict], cores: Mapping[str, float | None], bounded: Mapping[str, bool]) -> Table:
    table = Table(title="memory (MiB) and CPU per process: RSS sampled each second during the load; VmHWM = peak RSS "
                        "over the process's life")
    for col in ("process", "RSS start", "RSS 10 s", "RSS mid", "RSS end", "RSS after", "peak (load)", "VmHWM",
                "2nd-half growth", "bounded", "CPU cores"):
        table.add_column(col, justify="left" if col == "process" else "right", no_wrap=True)
    for name, m in memory.items():
        r = m["rss_kib"]
        table.add_row(name, mib(r["start"]), mib(r["10s"]), mib(r["mid"]), mib(r["end"]), mib(r["after"]),
                      mib(m["peak_rss_kib"]), mib(m["vmhwm_kib"]), f"{m['growth_second_half_kib'] / 1024:+,.1f}",
                      "yes" if bounded[name] else "NO",
                      f"{cores[name]:.2f}" if cores.get(name) is not None else "-")
    return table


async def _warm(address: str, lengths: Lengths, mix: Mapping[str, float], seed: int) -> None:
    items = [Item(0.05 * k, cls, *lengths.sample(random.Random(f"{seed}:warm:{k}"), cls), tag="warm")
             for k, cls in enumerate([c for c in mix for _ in range(3)])]
    async with grpc.aio.insecure_channel(address) as channel:
        await run_all(Client(channel, 60.0), items)


async def _overload(address: str, items: Sequence[Item], s: Settings, pids: Mapping[str, int],
                    console: Console) -> dict:
    probes = [Item(k * s.probe_every_s, "interactive", PROBE_PROMPT, PROBE_ANSWER, DEFAULT_MAX_TOKENS, tag="probe")
              for k in range(int(s.probe_window_s / s.probe_every_s))]
    async with grpc.aio.insecure_channel(address) as channel:
        client = Client(channel, s.deadline_s)
        with MemorySampler(pids) as sampler:
            cpu0, t_start = cpu_snapshot(pids), time.perf_counter()
            with console.status(f"overload: {len(items)} requests over {s.duration_s:g} s ...") as status:
                ticker = asyncio.create_task(_tick(status, client, t_start, s.duration_s))
                load_tasks, last_sent = await client.run(items, t_start)
                t_stop = time.perf_counter()
                cpu1 = cpu_snapshot(pids)
                ticker.cancel()
                status.update(f"recovery probes for {s.probe_window_s:g} s ({client.in_flight} load requests in "
                              f"flight) ...")
                probe_tasks, _ = await client.run(probes, t_stop)
                probe_outcomes = await finish(probe_tasks, 30.0)
                status.update(f"waiting for the load's last requests ({client.in_flight} in flight; at most "
                              f"{s.drain_s:g} s) ...")
                load_outcomes = await finish(load_tasks, s.drain_s)
            t_end = time.perf_counter()
            sampler.sample()
    send_lag = [o.sent - (t_start + o.item.arrival_s) for o in load_outcomes]
    return {"load": load_outcomes, "probes": probe_outcomes, "sampler": sampler, "t_start": t_start, "t_stop": t_stop,
            "t_end": t_end, "cpu_cores": cpu_cores(cpu0, cpu1, t_stop - t_start),
            "send_lag_s": {"p50": statistics.median(send_lag) if send_lag else 0.0,
                           "max": max(send_lag) if send_lag else 0.0}}


async def _tick(status: object, client: Client, t0: float, duration_s: float) -> None:
    while True:
        await asyncio.sleep(1.0)
        status.update(f"overload: {time.perf_counter() - t0:.0f}/{duration_s:g} s, {client.in_flight} in flight ...")


def main(argv: Sequence[str] | None = None) -> dict:
    d = Settings()
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=d.duration_s, help=f"seconds of overload ({d.duration_s:g})")
    parser.add_argument("--factor", type=float, default=d.factor, help=f"times the capacity ({d.factor:g})")
    parser.add_argument("--capacity", type=float, default=None,
                        help="the cluster's capacity in requests/s of the mix; default: measure it with a ramp")
    parser.add_argument("--ramp-step", type=float, default=d.ramp_step_s, help="seconds per ramp step")
    parser.add_argument("--ramp-start", type=float, default=None, help="first ramp rate (requests/s)")
    parser.add_argument("--deadline", type=float, default=None, help="client deadline per request, seconds "
                        "(default: none)")
    parser.add_argument("--drain", type=float, default=d.drain_s,
                        help=f"seconds to wait for the load's last answers after the probes ({d.drain_s:g})")
    parser.add_argument("--probe-window", type=float, default=d.probe_window_s,
                        help="seconds of recovery probes after the load stops")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--cluster", type=str, default=None, help="cluster file; default: the embedded default")
    parser.add_argument("--json", type=Path, default=Path("bench/results/overload.json"), help="where to write JSON")
    args = parser.parse_args(argv)
    settings = Settings(duration_s=args.duration, factor=args.factor, capacity=args.capacity,
                        ramp_step_s=args.ramp_step, ramp_start=args.ramp_start, deadline_s=args.deadline,
                        drain_s=args.drain,
                        probe_window_s=args.probe_window, seed=args.seed, cluster=args.cluster)
    try:
        return run(settings, args.json)
    except (RuntimeError, ValueError) as e:
        Console(stderr=True).print(f"[red]overload: {e}[/red]")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
