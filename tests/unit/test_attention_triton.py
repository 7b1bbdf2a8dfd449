"""The Triton paged-attention kernel against the semantics (gathered context + softmax), run by Triton's interpreter
on CPU tensors: decodes and prefill chunks (from position 0 and continued) in one launch, shuffled block tables,
block sizes 16/32, GQA, head sizes that are and are not powers of two."""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not set", allow_module_level=True)

from loraplex.ops.attention_triton import paged_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q, k_cache, v_cache, tables, rows, block_size, scale):
    """Per query: softmax over the keys at positions 0 .. its own, read through the block table."""
    out = torch.zeros_like(q)
    group = q.shape[1] // k_cache.shape[1]
    for r, (q_start, q_len, start_pos) in enumerate(rows):
        ctx = start_pos + q_len
        pos = torch.arange(ctx)
        slots = torch.tensor(tables[r])[pos // block_size] * block_size + pos % block_size
        k = k_cache[slots].repeat_interleave(group, dim=1).float()  # [ctx, H, D]
        v = v_cache[slots].repeat_interleave(group, dim=1).float()
        for i in range(q_len):
            p = start_pos + i
            s = torch.einsum("hd,nhd->hn", q[q_start + i].float(), k[:p + 1]) * scale
            out[q_start + i] = torch.einsum("hn,nhd->hd", s.softmax(-1), v[:p + 1]).to(q.dtype)
    return out


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 4, 32), (4, 2, 40), (8, 1, 64)])
def test_paged_attention_matches_the_semantics(block_size, heads, kv_heads, d):
    g = torch.Generator().manual_seed(block_size + heads + d)
    # (q_len, start_pos): decodes at short and long contexts, a fresh prefill, a continued chunk, one of 1 + 70
    shapes = [(1, 0), (1, 37), (1, 100), (23, 0), (17, 40), (5, 70)]
    num_blocks = 64
    perm = torch.randperm(num_blocks, generator=g).tolist()  # blocks scattered over the cache
    tables, rows, t = [], [], 0
    for q_len, start_pos in shapes:
        need = -(-(start_pos + q_len) // block_size)
        tables.append([perm.pop() for _ in range(need)])
        rows.append((t, q_len, start_pos))
        t += q_len
    width = max(len(x) for x in tables)
    k_cache = torch.randn(num_blocks * block_size, kv_heads, d, generator=g)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, d, generator=g)
    q = torch.randn(t, heads, d, generator=g)
    scale = d ** -0.5
    want = reference(q, k_cache, v_cache, tables, rows, block_size, scale)
    bt = torch.tensor([x + [0] * (width - len(x)) for x in tables], dtype=torch.int32)
    cols = [torch.tensor(c, dtype=torch.int32, device=DEVICE) for c in zip(*rows)]
    got = paged_attention_triton(q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), bt.to(DEVICE), *cols,
                                 max(s[0] for s in shapes), block_size, scale)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
