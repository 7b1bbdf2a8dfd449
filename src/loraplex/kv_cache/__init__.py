"""Paged KV cache: block bookkeeping (pure Python) and the per-layer cache tensors."""
from loraplex.kv_cache.block_manager import BlockManager, BlockPool

__all__ = ["BlockManager", "BlockPool"]
