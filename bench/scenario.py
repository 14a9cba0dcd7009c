"""Scenario files: traces combined into one multi-SLO workload, with a time window and a rate scale.

    name: multi-slo
    start_s: 0            # window into every trace
    duration_s: 600
    rate_scale: 1.0       # > 1 compresses arrivals (more load)
    seed: 0
    sources:
      - {trace: azure-conv, slo_class: interactive}
      - {trace: azure-code, slo_class: code}
      - {trace: sharegpt, slo_class: batch, arrival: poisson, rate: 0.5}
      - {trace: path/to/own.csv, slo_class: interactive, max_tokens: window}   # Azure-format CSV, or .jsonl
      - {trace: azure-conv, slo_class: interactive, slo_scale: 2}     # twice the class's targets
      - {trace: azure-code, slo_class: code, e2e_ms: 5000}            # its own E2E target, in place of the class's

A JSONL trace has one object a line, either with ``arrival_s``, ``input_tokens`` and ``output_tokens``, or in
the published prefix-sharing traces' scheme (Mooncake's): ``timestamp`` (ms), ``input_length``, ``output_length`` and
``hash_ids``, the ids of the prompt's blocks of ``block_tokens`` tokens (512 there; the last may be partial). Equal ids
become equal prompt text on replay, so prefix caches and prefix-aware routing see the trace's sharing.

``max_tokens`` is what each request of a source sends as its cap, as a real client does: a number (default
2048), or ``window`` for whatever fits the context after the prompt. It is clipped to the window either way.
The trace's true answer length is kept apart (``ReplayItem.output_tokens``), for the executor's stop rule only.

A source's requests are held to their class's SLO targets unless it says otherwise: ``slo_scale`` multiplies every
target of the class (2: twice as loose), and ``ttft_ms``, ``tpot_ms`` or ``e2e_ms`` (> 0) replace the class's own
target outright (``services.slo.resolve``). Replay sends such targets with each request, so the gateway, balancer and
worker schedule against them, and the run is scored against them.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bench.replay import DEFAULT_MAX_TOKENS, ReplayItem, clip_to_window
from bench.traces import TraceError, TraceRequest, default_trace_path, load_azure, load_sharegpt_lengths
from services.yamlfile import load_model

BUILTIN = {"azure-conv": "conv", "azure-code": "code"}


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trace: str
    slo_class: str = "interactive"
    arrival: Literal["trace", "poisson", "gamma"] = "trace"
    rate: float = Field(1.0, gt=0, description="requests/s for poisson or gamma arrivals")
    cv: float = Field(2.0, gt=0, description="coefficient of variation of gamma inter-arrivals")
    priority: int = 0
    tenant: str = ""
    max_tokens: int | Literal["window"] = Field(DEFAULT_MAX_TOKENS, description="the cap each request sends, or 'window'")
    block_tokens: int = Field(512, gt=0, description="tokens per hash_ids block of the trace")
    slo_scale: float = Field(1.0, gt=0, allow_inf_nan=False, description="the class's SLO targets times this")
    ttft_ms: float = Field(0.0, ge=0, allow_inf_nan=False,
                           description="a TTFT target in place of the class's (0: the class's)")
    tpot_ms: float = Field(0.0, ge=0, allow_inf_nan=False,
                           description="a TPOT target in place of the class's (0: the class's)")
    e2e_ms: float = Field(0.0, ge=0, allow_inf_nan=False,
                          description="an E2E target in place of the class's (0: the class's)")

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v <= 0:
            raise ValueError("max_tokens must be positive or 'window'")
        return v


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "scenario"
    start_s: float = Field(0.0, ge=0)
    duration_s: float = Field(600.0, gt=0)
    rate_scale: float = Field(1.0, gt=0)
    seed: int = 0
    sources: list[Source] = Field(min_length=1)


def load_scenario(path: str | Path | None = None) -> Scenario:
    """A scenario file, or the shipped default (Azure conv as interactive, code as code, ShareGPT as batch)."""
    return load_model(Scenario, path, default=("bench.data", "default_scenario.yaml"), error=TraceError,
                      what="scenario")


PLAIN_FIELDS = ("arrival_s", "input_tokens", "output_tokens")
MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


def _jsonl_row(row: object) -> tuple[TraceRequest, bool]:
    """One line as a request, and whether it is in Mooncake's scheme (its times are absolute ms, to re-base)."""
    if not isinstance(row, dict):
        raise TypeError(f"expected a JSON object, got {type(row).__name__}")
    plain, mooncake = [f for f in PLAIN_FIELDS if f in row], [f for f in MOONCAKE_FIELDS if f in row]
    if plain and mooncake:
        raise ValueError(f"mixes field schemes: {plain} with {mooncake}")
    missing = [f for f in (MOONCAKE_FIELDS if mooncake else PLAIN_FIELDS) if f not in row]
    if missing:
        raise ValueError(f"missing fields {missing}")
    if not mooncake:
        return TraceRequest(float(row["arrival_s"]), int(row["input_tokens"]), int(row["output_tokens"])), False
    ids = row["hash_ids"]
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError("hash_ids must be a list of ints")
    return TraceRequest(float(row["timestamp"]) / 1000, int(row["input_length"]), int(row["output_length"]),
                        tuple(ids)), True


def load_jsonl(path: Path) -> list[TraceRequest]:
    """Either scheme, line by line, sorted by arrival. A file with Mooncake lines is re-based to start at 0 like
    the Azure traces (their timestamps need not start there); a plain file's arrivals are kept as written."""
    out, rebase = [], False
    with path.open() as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                request, mooncake = _jsonl_row(json.loads(line))
            except (ValueError, TypeError) as e:
                raise TraceError(f"{path}:{line_no}: {e}") from None
            if request.input_tokens <= 0 or request.output_tokens <= 0 or request.arrival_s < 0:
                raise TraceError(f"{path}:{line_no}: token counts must be positive and arrival times >= 0")
            out.append(request)
            rebase |= mooncake
    out.sort(key=lambda r: r.arrival_s)
    if not out:
        raise TraceError(f"{path}: no requests")
    if rebase:
        t0 = out[0].arrival_s
        out = [replace(r, arrival_s=r.arrival_s - t0) for r in out]
    return out


def _synthetic_arrivals(source: Source, duration: float, rng: random.Random) -> list[float]:
    times, t = [], 0.0
    shape = 1 / (source.cv ** 2)
    while True:
        gap = rng.expovariate(source.rate) if source.arrival == "poisson" else \
            rng.gammavariate(shape, 1 / (shape * source.rate))
        t += gap
        if t >= duration:
            return times
        times.append(t)


def _requests(source: Source, sc: Scenario, rng: random.Random) -> list[TraceRequest]:
    if source.trace == "sharegpt" or source.arrival != "trace":
        if source.arrival == "trace":
            raise TraceError(f"source {source.trace}: has no arrival times; set arrival: poisson or gamma")
        rows = [TraceRequest(0.0, *pair) for pair in load_sharegpt_lengths()] if source.trace == "sharegpt" else \
            _trace_rows(source.trace, 0.0, None)
        return [replace(rng.choice(rows), arrival_s=t) for t in _synthetic_arrivals(source, sc.duration_s, rng)]
    return _trace_rows(source.trace, sc.start_s, sc.duration_s)


def _trace_rows(trace: str, start: float, duration: float | None) -> list[TraceRequest]:
    if trace in BUILTIN:
        return load_azure(default_trace_path(BUILTIN[trace]), start_s=start, duration_s=duration)
    path = Path(trace)
    if path.suffix == ".jsonl":
        return [r for r in load_jsonl(path) if start <= r.arrival_s and (duration is None or r.arrival_s < start + duration)]
    return load_azure(path, start_s=start, duration_s=duration)


def build_workload(sc: Scenario, max_model_len: int) -> list[ReplayItem]:
    """Every source's requests in the window, arrivals divided by the rate scale, merged in time order. A clipped
    prompt keeps only the block ids that still lie within it, so replay never claims a block it does not send."""
    rng = random.Random(sc.seed)
    items: list[ReplayItem] = []
    for source in sc.sources:
        for r in _requests(source, sc, rng):
            n_in, n_out, cap = clip_to_window(r.input_tokens, r.output_tokens, max_model_len, source.max_tokens)
            hashes = r.hash_ids[:-(-n_in // source.block_tokens)]          # ceil: the last block may be partial
            items.append(ReplayItem(r.arrival_s / sc.rate_scale, n_in, n_out, source.slo_class, source.priority,
                                    source.tenant, max_tokens=cap, prefix_hashes=hashes,
                                    block_tokens=source.block_tokens, slo_scale=source.slo_scale,
                                    ttft_ms=source.ttft_ms, tpot_ms=source.tpot_ms, e2e_ms=source.e2e_ms))
    items.sort(key=lambda i: i.arrival_s)
    return items
