"""Block bookkeeping for the paged KV cache (pure Python, testable without a model), with automatic prefix caching.

A block holds ``block_size`` token slots of one sequence. A sequence's ``block_table`` lists its blocks in order,
so token position ``p`` lives in slot ``block_table[p // block_size] * block_size + p % block_size``.

Prefix caching: a full block whose K/V are computed is content-addressed by ``hash((parent block's hash, its token
ids, cache key))`` — the cache key names what computed the K/V (the base, an adapter's content digest, a mixture's
(digest, weight) pairs), so two adapters never share blocks. A new sequence starts from the longest cached chain of
its tokens; blocks are shared by reference count, and a block nobody references stays cached (and reusable) until
the pool needs it for new tokens, least recently freed first.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence


class BlockPool:
    """``num_blocks`` physical blocks: reference counts, the free ones in LRU order (free and never cached first),
    and the cached ones by content hash."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # ref 0, oldest first
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, int] = {}  # block -> its content hash (cached blocks only)
        self.cached: dict[int, int] = {}  # content hash -> block

    @property
    def num_free(self) -> int:
        """Blocks no sequence references (cached or not): what ``take`` can hand out."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def take(self, n: int) -> list[int]:
        """``n`` blocks for new tokens; a cached free block taken loses its cache entry."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            h = self.hash_of.pop(block, None)
            if h is not None:
                del self.cached[h]
            self.refs[block] = 1
            out.append(block)
        return out

    def share(self, block: int) -> None:
        """One more reference to a cached block (out of the free list if nobody held it)."""
        if self.refs[block] == 0:
            del self._free[block]
        self.refs[block] += 1

    def give_back(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each of a sequence's blocks. Unreferenced ones become free: a cached block joins
        the end of the LRU order (a chain's tail before its head, so prefixes outlive their continuations), an
        uncached one the front (nothing is lost by reusing it first)."""
        for block in reversed(blocks):
            assert self.refs[block] > 0, f"block {block} freed twice"
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self._free[block] = None
                if block not in self.hash_of:
                    self._free.move_to_end(block, last=False)

    def register(self, block: int, h: int) -> None:
        """``block`` (full, computed) holds the content ``h``; the first block registered for a content wins."""
        if h not in self.cached and block not in self.hash_of:
            self.cached[h] = block
            self.hash_of[block] = h

    def reset_cache(self) -> bool:
        """Forget every cached block's content; only when no block is referenced (False otherwise)."""
        if any(self.refs):
            return False
        self.cached.clear()
        self.hash_of.clear()
        return True


class BlockManager:
    """Owns each sequence's block table; grows it on demand, frees it when the sequence ends or is preempted, and
    (with ``enable_prefix_caching``) shares the cached blocks of a prefix."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}
        self.enable_prefix_caching = enable_prefix_caching
        self._hashes: dict[str, list[int]] = {}  # sequence -> content hash of each of its committed full blocks

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
            self._hashes.pop(i, None)

    # ---- prefix caching ---------------------------------------------------------------------------------------
    def _chain(self, token_ids: Sequence[int], key: Hashable, n_blocks: int, start: int = 0,
               parent: int | None = None) -> list[int]:
        bs, out = self.block_size, []
        for i in range(start, n_blocks):
            parent = hash((parent, tuple(token_ids[i * bs:(i + 1) * bs]), key))
            out.append(parent)
        return out

    def match_prefix(self, request_id: str, token_ids: Sequence[int], key: Hashable | None) -> int:
        """Start ``request_id`` (no blocks yet) on the longest cached chain of ``token_ids`` computed under ``key``;
        returns how many tokens that covers. The last token is never covered: its logits must be computed."""
        if not self.enable_prefix_caching or key is None or request_id in self.block_tables:
            return 0
        blocks: list[int] = []
        hashes: list[int] = []
        for h in self._chain(token_ids, key, (len(token_ids) - 1) // self.block_size):
            block = self.pool.cached.get(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
        for block in blocks:
            self.pool.share(block)
        if blocks:
            self.block_tables[request_id] = blocks
            self._hashes[request_id] = hashes
        return len(blocks) * self.block_size

    def commit(self, request_id: str, num_computed: int, key: Hashable | None,
               token_ids: Callable[[], Sequence[int]]) -> None:
        """Register the full blocks among the first ``num_computed`` tokens (K/V written) as cached content
        (``token_ids()`` is asked only when a block has just filled up)."""
        if not self.enable_prefix_caching or key is None or request_id not in self.block_tables:
            return
        done = self._hashes.setdefault(request_id, [])
        n_full = min(num_computed // self.block_size, len(self.block_tables[request_id]))
        if n_full <= len(done):
            return
        new = self._chain(token_ids(), key, n_full, start=len(done), parent=done[-1] if done else None)
        table = self.block_tables[request_id]
        for i, h in enumerate(new, start=len(done)):
            self.pool.register(table[i], h)
        done.extend(new)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by sequences (cached free blocks count as free)."""
        return 1.0 - self.pool.num_free / max(1, self.pool.num_blocks)
