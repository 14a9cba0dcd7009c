"""Open-loop replay of a trace against a gateway: arrivals never wait for completions.

Prompts are made of as many words as the trace has input tokens, which the sim tokenizer counts exactly. Where a
trace names the prompt's blocks (``prefix_hashes``), each block's words follow from its id, so requests that share
ids share prompt text, and the gateway's own text hashes (and every cache behind it) see the trace's sharing.
Each request sends ``max_tokens`` as a client would, a cap (the scenario's), never the answer's length; the
trace's true length travels in the benchmark-only ``replay_truth`` field, which only the worker's executor stop
rule reads. Timings are taken on the client.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import grpc

from bench.metrics import RequestRecord
from bench.traces import TraceRequest
from services.rpc import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.slo import DEFAULT_SLO_CLASSES, SloClass, resolve


@dataclass(frozen=True)
class ReplayItem:
    arrival_s: float
    input_tokens: int
    output_tokens: int                 # the trace's true answer length: for the executor's stop rule alone
    slo_class: str = "interactive"
    priority: int = 0
    tenant: str = ""
    max_tokens: int = 0                # the client's cap, what schedulers see; 0 = the true length (no cap)
    prefix_hashes: tuple[int, ...] = ()   # ids of the prompt's blocks: equal ids, equal prompt blocks
    block_tokens: int = 512               # tokens per prefix_hashes block, as the trace counted them
    slo_scale: float = 1.0                # the request's targets are its class's times this ...
    ttft_ms: float = 0.0                  # ... or these, where set (0: the class's)
    tpot_ms: float = 0.0
    e2e_ms: float = 0.0

    def slo_for(self, classes: Mapping[str, SloClass]) -> SloClass:
        """The targets this request is held to: its class's, overridden as the request says."""
        return resolve(classes[self.slo_class], self.ttft_ms, self.tpot_ms, self.e2e_ms, self.slo_scale)

    @property
    def overrides_slo(self) -> bool:
        """Whether the request has targets of its own, not just its class's."""
        return self.slo_scale != 1.0 or bool(self.ttft_ms or self.tpot_ms or self.e2e_ms)

    @property
    def cap(self) -> int:
        return self.max_tokens or self.output_tokens


DEFAULT_MAX_TOKENS = 2048


def clip_to_window(input_tokens: int, output_tokens: int, max_model_len: int,
                   max_tokens: int | str = DEFAULT_MAX_TOKENS) -> tuple[int, int, int]:
    """(prompt, true output, cap) fitting the model's window, keeping at least one token of each. The true
    output is clipped to a quarter of the window; the cap is ``max_tokens`` (or ``"window"``: all the room the
    prompt leaves), never more than that room."""
    n_out = max(1, min(output_tokens, max_model_len // 4))
    n_in = max(1, min(input_tokens, max_model_len - n_out - 1))
    room = max_model_len - n_in
    return n_in, n_out, room if max_tokens == "window" else min(int(max_tokens), room)


def fit_to_window(items: Sequence[TraceRequest], max_model_len: int, slo_class: str, rate_scale: float = 1.0,
                  max_tokens: int | str = DEFAULT_MAX_TOKENS) -> list[ReplayItem]:
    """Trace rows as replay items that fit the model's window, each capped by ``max_tokens`` as a client would."""
    out = []
    for t in items:
        n_in, n_out, cap = clip_to_window(t.input_tokens, t.output_tokens, max_model_len, max_tokens)
        out.append(ReplayItem(t.arrival_s / rate_scale, n_in, n_out, slo_class, max_tokens=cap))
    return out


def prompt_of(n_tokens: int) -> str:
    return " ".join(["tok"] * n_tokens)


def unique_words(n: int) -> list[str]:
    """``n`` words no other call shares (one token each with the sim tokenizer)."""
    tag = uuid.uuid4().hex[:12]
    return [f"u{tag}w{j}" for j in range(n)]


def unique_prompt(n_tokens: int) -> str:
    """``prompt_of`` with a first word unique to this call: the same length in words and about the same in
    characters (the gateway estimates tokens from them), but it shares no prefix block with any other prompt, as
    unrelated users' prompts don't (``prompt_of``'s would all hit every engine's prefix cache)."""
    return f"u{uuid.uuid4().hex[:12]}" + " tok" * (n_tokens - 1)


def prompt_for_item(item: ReplayItem, block_tokens: int | None = None) -> str:
    """Exactly ``item.input_tokens`` words. Block k's words are ``b{id}w{j}``, a function of its id alone, so equal
    ids give equal text; words past the named blocks are unique to this call, so they share with nothing (nor
    does a prompt without ids). ``block_tokens`` defaults to the item's own (the trace source's)."""
    if not item.prefix_hashes:
        return unique_prompt(item.input_tokens)
    size = block_tokens or item.block_tokens
    blocks = item.prefix_hashes[:-(-item.input_tokens // size)]
    words = [f"b{h}w{j}" for h in blocks for j in range(size)][:item.input_tokens]
    return " ".join(words + unique_words(item.input_tokens - len(words)))


def prompt_token_ids(item: ReplayItem, serial: int) -> list[int]:
    """The simulator's prompt for ``item``: token ids shared exactly where the trace's block ids are (as
    ``prompt_for_item``'s text is), the rest unique to request number ``serial``, so a prefix cache in the
    simulated engines hits where a live one would."""
    blocks = item.prefix_hashes[:-(-item.input_tokens // item.block_tokens)] if item.prefix_hashes else ()
    ids = [(h << 20) + j for h in blocks for j in range(item.block_tokens)][:item.input_tokens]
    tail = (1 << 62) + (serial << 24)
    return ids + list(range(tail + len(ids), tail + item.input_tokens))


def set_slo_targets(request: gateway_pb2.GenerateRequest, slo: SloClass) -> None:
    """The request's own targets on the wire: each one the resolved SloClass has (0: none, the class's)."""
    for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
        if value := getattr(slo, name):
            setattr(request, name, value)


async def replay(address: str, items: Sequence[ReplayItem], *, slo_classes: dict[str, SloClass] | None = None,
                 timeout_s: float = 300.0, on_done: Callable[[RequestRecord], None] | None = None,
                 prompt_for: Callable[[ReplayItem], str] | None = None) -> tuple[list[RequestRecord], float]:
    """Send every item at its arrival time; return the records and the run's duration in seconds. Prompts come
    from ``prompt_for(item)``, by default ``prompt_for_item`` (shared text where the trace shares blocks). An item
    with targets of its own (``overrides_slo``) sends them, resolved against ``slo_classes``, with the request, and
    its record is scored against them."""
    classes = slo_classes or DEFAULT_SLO_CLASSES
    prompt_for = prompt_for or prompt_for_item
    records: list[RequestRecord] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        start = time.perf_counter()

        async def one(item: ReplayItem) -> None:
            delay = start + item.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            slo = item.slo_for(classes)
            record = RequestRecord(uuid.uuid4().hex, item.slo_class, slo, time.perf_counter())
            request = gateway_pb2.GenerateRequest(
                prompt=prompt_for(item), max_tokens=item.cap, slo_class=item.slo_class,
                request_id=record.request_id, temperature=0.0, priority=item.priority, tenant=item.tenant,
                replay_truth=common_pb2.ReplayTruth(output_tokens=item.output_tokens))
            if item.overrides_slo:
                set_slo_targets(request, slo)
            try:
                async for reply in stub.Generate(request, timeout=timeout_s):
                    now = time.perf_counter()
                    record.token_times.extend([now] * len(reply.token_ids))
                    if reply.finish_reason:
                        record.finish_reason = reply.finish_reason
                        m = reply.metrics
                        record.prompt_tokens, record.worker_id = m.prompt_tokens, m.worker_id
                        record.preemptions, record.queue_ms = m.preemptions, m.queue_ms
                record.ok = record.finish_reason in ("stop", "length")
            except grpc.aio.AioRpcError as e:
                record.error = f"{e.code().name}: {e.details()}"
            records.append(record)
            if on_done is not None:
                on_done(record)

        await asyncio.gather(*(one(item) for item in items))
        duration = time.perf_counter() - start
    return records, duration
