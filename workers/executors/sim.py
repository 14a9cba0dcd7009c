"""The sim executor: step time from the latency model, deterministic placeholder tokens.

On a real clock it sleeps for the predicted step time, like a GPU would keep the engine busy; on a virtual
clock the same sleep just advances time, which is how the simulator runs the real engine.
"""

from __future__ import annotations

import zlib

from services.latency import BatchShape, LatencyModel
from workers.clock import Clock
from workers.scheduler import SchedulerOutput
from workers.tokenizer import SimTokenizer


class SimExecutor:
    name = "sim"

    def __init__(self, latency: LatencyModel, clock: Clock, *, time_scale: float = 1.0) -> None:
        self.latency = latency
        self.clock = clock
        self.time_scale = time_scale
        self.tokenizer = SimTokenizer(latency.model.vocab_size)
        self.max_model_len = latency.model.max_model_len

    def bind_blocks(self, blocks: object) -> None:
        """No cache to size: the sim executor only counts blocks through the scheduler."""

    def step_time(self, batch: SchedulerOutput) -> float:
        shape = BatchShape.of((s.num_new_tokens, s.context_before) for s in batch.scheduled)
        return self.latency.step_time(shape) * self.time_scale

    async def execute(self, batch: SchedulerOutput) -> dict[str, int]:
        await self.clock.sleep(self.step_time(batch))
        sampled: dict[str, int] = {}
        for item in batch.scheduled:
            if item.samples:
                request = item.request
                seed = request.sampling.seed
                if seed is None:
                    seed = zlib.crc32(request.request_id.encode())
                sampled[request.request_id] = self.tokenizer.placeholder_token(seed, request.num_output_tokens)
        return sampled

    def release(self, request_id: str) -> None:
        pass
