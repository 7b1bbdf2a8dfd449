"""Block bookkeeping for the paged KV cache (pure Python, testable without a model).

A block holds ``block_size`` token slots of one sequence. A sequence's ``block_table`` lists its blocks in order,
so token position ``p`` lives in slot ``block_table[p // block_size] * block_size + p % block_size``.
"""
from __future__ import annotations

from collections import deque


class BlockPool:
    """A free list over ``num_blocks`` physical blocks."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def give_back(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


class BlockManager:
    """Owns each request's block table; grows it on demand and frees it when the request ends or is preempted."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """How many more blocks ``request_id`` needs to hold ``num_tokens`` tokens in total."""
        have = len(self.block_tables.get(request_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def allocate(self, request_id: str, num_tokens: int, *more_ids: str) -> bool:
        """Grow the block table to hold ``num_tokens`` tokens; False (and no change) if blocks are short.

        ``more_ids`` grow in the same step, all or none (an X-LoRA request's second KV track)."""
        ids = (request_id, *more_ids)
        if sum(self.blocks_needed(i, num_tokens) for i in ids) > self.pool.num_free:
            return False
        for i in ids:
            self.block_tables.setdefault(i, []).extend(self.pool.take(self.blocks_needed(i, num_tokens)))
        return True

    def free(self, *request_ids: str) -> None:
        for i in request_ids:
            self.pool.give_back(self.block_tables.pop(i, []))

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / max(1, self.pool.num_blocks)
