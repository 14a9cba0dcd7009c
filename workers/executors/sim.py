"""The sim executor: step time from the latency model, deterministic placeholder tokens.

On a real clock it sleeps for the predicted step time, like a GPU would keep the engine busy. The simulator
runs the same engine and asks ``step_time`` and ``sample`` directly, in virtual time: one step-time expression
for both. ``step_overhead_s`` and ``seq_overhead_s`` (each further sequence in the batch) add the serving loop's
own work around a forward pass, which a calibrated forward-pass fit cannot see; they are 0 on a live worker,
whose loop spends them for real.
"""

from __future__ import annotations

import zlib

from services.latency import BatchShape, LatencyModel
from workers.clock import Clock
from workers.scheduler import SchedulerOutput
from workers.tokenizer import SimTokenizer
from workers.true_lengths import TrueLengths


class SimExecutor:
    name = "sim"

    def __init__(self, latency: LatencyModel, clock: Clock, *, time_scale: float = 1.0, step_overhead_s: float = 0.0,
                 seq_overhead_s: float = 0.0) -> None:
        self.latency = latency
        self.clock = clock
        self.time_scale = time_scale
        self.step_overhead_s, self.seq_overhead_s = step_overhead_s, seq_overhead_s
        self.true_lengths = TrueLengths()
        self._seeds: dict[str, int] = {}
        self.tokenizer = SimTokenizer(latency.vocab_size)
        self.max_model_len = latency.max_model_len

    def bind_blocks(self, blocks: object) -> None:
        """No cache to size: the sim executor only counts blocks through the scheduler."""

    def step_time(self, batch: SchedulerOutput) -> float:
        scheduled = batch.scheduled
        shape = BatchShape(tuple([s.num_new_tokens for s in scheduled]), tuple([s.context_before for s in scheduled]))
        overhead = self.step_overhead_s + self.seq_overhead_s * (len(scheduled) - 1)
        return self.latency.step_time(shape) * self.time_scale + overhead

    async def execute(self, batch: SchedulerOutput) -> dict[str, int]:
        await self.clock.sleep(self.step_time(batch))
        return self.sample(batch)

    def sample(self, batch: SchedulerOutput) -> dict[str, int]:
        """Placeholder tokens; a replayed answer that reaches its true length ends with EOS."""
        sampled: dict[str, int] = {}
        placeholder, seeds = self.tokenizer.placeholder_token, self._seeds
        for item in batch.scheduled:
            if item.samples:
                request = item.request
                rid = request.request_id
                seed = seeds.get(rid)
                if seed is None:
                    seed = seeds[rid] = request.sampling.seed if request.sampling.seed is not None else \
                        zlib.crc32(rid.encode())
                sampled[rid] = placeholder(seed, len(request.output_token_ids))
        self.true_lengths.end_answers(batch, sampled, self.tokenizer.eos_token_id)
        return sampled

    def release(self, request_id: str) -> None:
        self.true_lengths.forget(request_id)
        self._seeds.pop(request_id, None)
