"""Paged KV memory: fixed-size blocks from a budget, with an admission watermark.

Blocks are real ids from a free list, so an executor with a paged cache (torch) can index its KV tensors by
the block table, and the scheduler can prove that nothing leaks (``num_used_blocks == 0`` when idle).
"""

from __future__ import annotations

from collections import deque

from workers.request import Request


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.01) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """Extra blocks ``request`` needs to hold its computed tokens plus ``num_new_tokens``."""
        total = request.num_computed_tokens + num_new_tokens
        needed = -(-total // self.block_size)
        return max(0, needed - len(self._tables.get(request.request_id, ())))

    def can_allocate(self, request: Request, num_new_tokens: int, *, admission: bool = False) -> bool:
        """Whether the blocks are there; a new admission must also leave the watermark free."""
        reserve = self.watermark_blocks if admission else 0
        return self.blocks_needed(request, num_new_tokens) <= len(self._free) - reserve

    def grow(self, request_id: str, total_tokens: int) -> bool:
        """Make ``request_id``'s table hold ``total_tokens``; False (nothing changed) when blocks are short.

        The scheduler's hot path: one call per running request per step, usually allocating nothing.
        """
        table = self._tables.get(request_id)
        if table is None:
            table = self._tables[request_id] = []
        need = -(-total_tokens // self.block_size) - len(table)
        if need <= 0:
            return True
        free = self._free
        if need > len(free):
            return False
        table.extend([free.popleft() for _ in range(need)])
        return True

    def allocate(self, request: Request, num_new_tokens: int) -> list[int]:
        n = self.blocks_needed(request, num_new_tokens)
        if n > len(self._free):
            raise OutOfBlocks(f"{request.request_id} needs {n} blocks, {len(self._free)} free")
        new = [self._free.popleft() for _ in range(n)]
        self._tables.setdefault(request.request_id, []).extend(new)
        return new

    def free(self, request: Request) -> int:
        """Return every block of ``request`` to the pool at once; returns how many."""
        blocks = self._tables.pop(request.request_id, [])
        self._free.extend(blocks)
        return len(blocks)
