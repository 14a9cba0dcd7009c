"""What the engine needs from an executor."""

from __future__ import annotations

from typing import Protocol

from workers.block_manager import BlockManager
from workers.scheduler import SchedulerOutput
from workers.tokenizer import Tokenizer
from workers.true_lengths import TrueLengths


class Executor(Protocol):
    name: str
    tokenizer: Tokenizer
    max_model_len: int
    true_lengths: TrueLengths          # benchmark-only: replayed answers' lengths, for the stop rule alone

    def bind_blocks(self, blocks: BlockManager) -> None:
        """The engine's block manager: an executor with a paged cache sizes and indexes it by these blocks."""

    async def execute(self, batch: SchedulerOutput) -> dict[str, int]:
        """Run one step; return the sampled token of every request whose pending tokens this step completes."""

    def release(self, request_id: str) -> None:
        """Forget per-request state (the engine calls it when a request ends)."""
