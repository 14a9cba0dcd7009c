"""Calibration probes: time synthetic batches through the engine's own executor, between iterations.

A prefill probe is one sequence of P new tokens; a decode probe is b sequences that each have C tokens
cached and compute one more. The probe requests take real KV blocks from the engine's block manager (the
cached contents are whatever is there, which does not change the time) and give them back afterwards.
"""

from __future__ import annotations

import statistics
import time

from services.fit import Probe
from workers.engine import Engine
from workers.request import Request, RequestStatus, SamplingParams
from workers.scheduler import ScheduledRequest, SchedulerOutput


class ProbeError(ValueError):
    pass


def _batch(engine: Engine, probe: Probe, tag: str) -> tuple[SchedulerOutput, list[Request]]:
    blocks = engine.scheduler.blocks
    out, requests = SchedulerOutput(), []
    if probe.is_prefill:
        shapes = [(probe.prefill_tokens, 0)]
    else:
        shapes = [(1, probe.context)] * probe.batch
    for i, (new, cached) in enumerate(shapes):
        r = Request(f"probe-{tag}-{i}", [1] * (cached + new), SamplingParams(max_tokens=1, temperature=0.0), 0.0)
        r.status = RequestStatus.RUNNING
        if not blocks.can_allocate(r, cached + new):
            for done in requests:
                blocks.free(done)
            raise ProbeError(f"not enough free KV blocks for probe {probe}")
        blocks.allocate(r, cached + new)
        r.num_computed_tokens = cached
        requests.append(r)
        out.scheduled.append(ScheduledRequest(r, new))
    return out, requests


async def run_probes(engine: Engine, probes: list[Probe], repeats: int = 5) -> list[float]:
    """Median step seconds of each probe, holding the engine's step lock.

    One untimed pass over every probe first (a new batch shape pays one-time kernel set-up), then ``repeats``
    passes over the whole list, so slow moments of a shared machine spread over all probes alike.
    """
    limit = engine.executor.max_model_len
    if hasattr(engine, "time_probes"):        # an engine that runs its own batches (vLLM): timed from outside
        for p in probes:
            if (p.prefill_tokens if p.is_prefill else p.context + 17) >= limit:
                raise ProbeError(f"probe {p} does not fit this worker (context window {limit})")
        return await engine.time_probes(probes, repeats)
    for p in probes:
        if (p.prefill_tokens if p.is_prefill else p.context + 1) >= limit or (not p.is_prefill and p.batch <= 0):
            raise ProbeError(f"probe {p} does not fit this worker (context window {limit})")
    times: list[list[float]] = [[] for _ in probes]
    async with engine.step_lock:
        for rep in range(repeats + 1):
            for k, probe in enumerate(probes):
                batch, requests = _batch(engine, probe, f"{k}-{rep}")
                try:
                    start = time.perf_counter()
                    await engine.executor.execute(batch)
                    elapsed = time.perf_counter() - start
                finally:
                    for r in requests:
                        engine.scheduler.blocks.free(r)
                        engine.executor.release(r.request_id)
                if rep:
                    times[k].append(elapsed)
    return [statistics.median(t) for t in times]
