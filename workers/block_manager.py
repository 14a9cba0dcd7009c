"""Paged KV memory: fixed-size blocks from a budget, with an admission watermark and automatic prefix caching.

Blocks are real ids from a free list, so an executor with a paged cache (torch) can index its KV tensors by
the block table, and the scheduler can prove that nothing leaks (``num_used_blocks == 0`` when idle).

Prefix caching (``caching=True``): once a block is full of computed tokens it is registered under a key chained
over every token up to its end, so two prompts share a block exactly when they agree on everything before and
in it. Blocks are reference-counted; a freed registered block keeps its contents and waits in an LRU pool,
still counted free, until an allocation needs it (plain free blocks go first). A new request takes the longest
run of its leading full blocks from the cache and prefills only the rest. The key is Python's tuple hash; a
block also keeps its parent key and tokens, and a match checks them, so a hash collision costs a miss, never
wrong output.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Sequence

from workers.request import Request


class OutOfBlocks(RuntimeError):
    pass


BlockContent = tuple[int, tuple[int, ...]]      # (the previous block's key, this block's tokens)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.01, caching: bool = False) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self.caching = caching
        self._free: deque[int] = deque(range(num_blocks))     # free and holding nothing worth keeping
        self._tables: dict[str, list[int]] = {}
        # prefix cache
        self._refs = [0] * num_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()   # free, registered; least recently freed first
        self._by_key: dict[int, int] = {}                         # key -> block
        self._key_of: dict[int, int] = {}                         # block -> key
        self._content: dict[int, BlockContent] = {}               # block -> what its key stands for
        self._committed: dict[str, int] = {}                      # request -> leading table blocks registered
        self.hit_tokens = 0          # prompt tokens admissions took from the cache
        self.queried_tokens = 0      # tokens admissions looked up

    # ----- counts ------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, in use or waiting to be evicted."""
        return len(self._by_key)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    # ----- allocation --------------------------------------------------------------------------------
    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """Extra blocks ``request`` needs to hold its computed tokens plus ``num_new_tokens``."""
        total = request.num_computed_tokens + num_new_tokens
        needed = -(-total // self.block_size)
        return max(0, needed - len(self._tables.get(request.request_id, ())))

    def can_allocate(self, request: Request, num_new_tokens: int, *, admission: bool = False,
                     hit: Sequence[int] = ()) -> bool:
        """Whether the blocks are there; a new admission must also leave the watermark free. ``hit``: cached
        blocks the request would start from (``match``); those now free leave the free pool too."""
        reserve = self.watermark_blocks if admission else 0
        if not hit:
            return self.blocks_needed(request, num_new_tokens) <= self.num_free_blocks - reserve
        total = len(hit) * self.block_size + num_new_tokens
        need = -(-total // self.block_size) - len(hit) + sum(1 for b in hit if not self._refs[b])
        return need <= self.num_free_blocks - reserve

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
        if need > len(self._free) + len(self._evictable):
            return False
        table.extend(self._take(need))
        return True

    def allocate(self, request: Request, num_new_tokens: int) -> list[int]:
        n = self.blocks_needed(request, num_new_tokens)
        if n > self.num_free_blocks:
            raise OutOfBlocks(f"{request.request_id} needs {n} blocks, {self.num_free_blocks} free")
        new = self._take(n)
        self._tables.setdefault(request.request_id, []).extend(new)
        return new

    def free(self, request: Request) -> int:
        """Give back every block of ``request`` at once; returns how many. Registered blocks nobody else holds
        stay cached, the request's last block first in line for eviction (its prefix is the more shared)."""
        blocks = self._tables.pop(request.request_id, [])
        self._committed.pop(request.request_id, None)
        refs = self._refs
        for block in reversed(blocks):
            refs[block] -= 1
            if refs[block]:
                continue
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.append(block)
        return len(blocks)

    def _take(self, n: int) -> list[int]:
        """``n`` blocks for a request: plain free ones first, then the least recently freed cached ones."""
        free, refs = self._free, self._refs
        out = []
        for _ in range(n):
            if free:
                block = free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._forget(block)
            refs[block] = 1
            out.append(block)
        return out

    def _forget(self, block: int) -> None:
        key = self._key_of.pop(block)
        del self._by_key[key]
        del self._content[block]

    # ----- prefix cache ------------------------------------------------------------------------------
    def _block_tokens(self, request: Request, i: int) -> tuple[int, ...]:
        return tuple(request.token_ids(i * self.block_size, (i + 1) * self.block_size))

    def _keys(self, request: Request, n_blocks: int) -> list[int]:
        """The chained keys of the request's first ``n_blocks`` full blocks (kept on the request)."""
        keys = request.block_hashes
        if len(keys) < n_blocks:
            parent = keys[-1] if keys else 0
            for i in range(len(keys), n_blocks):
                parent = hash((parent, self._block_tokens(request, i)))
                keys.append(parent)
        return keys

    def match(self, request: Request) -> list[int]:
        """Cached blocks holding the request's longest run of leading full blocks; at least one token is left
        to compute, since its logits are what the step samples from (and nobody writes a shared block)."""
        if not self.caching or request.num_computed_tokens:
            return []
        bs = self.block_size
        n = (request.num_tokens - 1) // bs
        if n <= 0:
            return []
        keys = self._keys(request, n)
        out: list[int] = []
        parent = 0
        for i in range(n):
            block = self._by_key.get(keys[i])
            if block is None or self._content[block] != (parent, self._block_tokens(request, i)):
                break
            out.append(block)
            parent = keys[i]
        return out

    def attach(self, request: Request, hit: Sequence[int]) -> None:
        """Start ``request``'s table from the cached blocks ``hit`` (from ``match``): they count as computed."""
        self.queried_tokens += request.num_tokens
        if not hit:
            return
        refs = self._refs
        for block in hit:
            if not refs[block]:
                del self._evictable[block]
            refs[block] += 1
        self._tables.setdefault(request.request_id, []).extend(hit)
        self._committed[request.request_id] = len(hit)
        cached = len(hit) * self.block_size
        request.num_computed_tokens = cached
        self.hit_tokens += cached

    def commit(self, request: Request) -> None:
        """Register the request's blocks that are now full of computed tokens (no-op without caching)."""
        if not self.caching:
            return
        rid = request.request_id
        full = request.num_computed_tokens // self.block_size
        done = self._committed.get(rid, 0)
        if full <= done:
            return
        table = self._tables[rid]
        keys = self._keys(request, full)
        for i in range(done, full):
            key, block = keys[i], table[i]
            if key in self._by_key or block in self._key_of:
                continue          # computed twice at once (the other copy is cached), or already registered
            self._by_key[key] = block
            self._key_of[block] = key
            self._content[block] = (keys[i - 1] if i else 0, self._block_tokens(request, i))
        self._committed[rid] = full

    def reset_cache(self) -> int:
        """Drop every cached block nobody holds (an operator's flush; a benchmark's cold start). Returns how many."""
        n = len(self._evictable)
        for block in self._evictable:
            self._forget(block)
            self._free.append(block)
        self._evictable.clear()
        return n
