"""Triton LoRA kernels against their torch references, run by Triton's interpreter on CPU tensors (CI has no GPU;
tests/conftest.py sets TRITON_INTERPRET=1 when CUDA is absent): BGMV shrink/expand with K pairs, mixed ranks and the
zero slot, stacked slices, and every SGMV segment of a step (mixture chunks overlapping) in one launch."""
from __future__ import annotations

import os

import pytest
import torch

from loraplex.ops import Segment, add_lora_bgmv, add_lora_segment

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not set", allow_module_level=True)

from loraplex.ops.lora_triton import add_lora_bgmv_triton, add_lora_segments_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def stack(seed: int, n_slices: int, r: int, n_in: int, sizes: list[int], ranks: list[int]):
    """Slot buffers as LoRAStack holds them: slot i of true rank ranks[i] (zero-padded to r); the last slot zero."""
    g = torch.Generator().manual_seed(seed)
    s = len(ranks) + 1
    a = torch.zeros(s, n_slices * r, n_in)
    bs = [torch.zeros(s, n, r) for n in sizes]
    for slot, rank in enumerate(ranks):
        for i in range(n_slices):
            a[slot, i * r:i * r + rank] = torch.randn(rank, n_in, generator=g)
            bs[i][slot, :, :rank] = torch.randn(sizes[i], rank, generator=g) * 0.1
    rank_t = torch.tensor([*ranks, 0], dtype=torch.int32)
    return a.to(DEVICE), [b.to(DEVICE) for b in bs], rank_t.to(DEVICE)


def slices_of(sizes: list[int]) -> list[tuple[int, int]]:
    return [(sum(sizes[:i]), n) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("r,ranks", [(1, [1, 1]), (8, [8, 3, 1]), (16, [16, 5]), (64, [64, 17, 40])])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("sizes", [[24], [32, 8, 8]], ids=["one", "qkv"])
def test_bgmv_matches_torch(r, ranks, k, sizes):
    n_in, t = 40, 7
    a, bs, rank_t = stack(r * 10 + k, len(sizes), r, n_in, sizes, ranks)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(t, n_in, generator=g).to(DEVICE)
    zero = len(ranks)
    slots = torch.randint(0, zero + 1, (t, k), generator=g).to(DEVICE)  # the zero slot included
    weights = None if k == 1 else torch.rand(t, k, generator=g).to(DEVICE)
    y0 = torch.randn(t, sum(sizes), generator=g).to(DEVICE)
    want, got = y0.clone(), y0.clone()
    add_lora_bgmv(want, x, a, bs, slices_of(sizes), slots, weights)
    add_lora_bgmv_triton(got, x, a, bs, slices_of(sizes), slots, weights, rank_t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got2 = y0.clone()
    add_lora_bgmv_triton(got2, x, a, bs, slices_of(sizes), slots, weights)  # no ranks: every slot at r
    torch.testing.assert_close(got2, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r,ranks", [(4, [4, 2]), (16, [16, 7, 1]), (64, [33, 64])])
@pytest.mark.parametrize("sizes", [[24], [20, 20]], ids=["one", "gate_up"])
def test_sgmv_segments_match_torch(r, ranks, sizes):
    n_in = 36
    a, bs, rank_t = stack(r, len(sizes), r, n_in, sizes, ranks)
    g = torch.Generator().manual_seed(r)
    t = 70
    x = torch.randn(t, n_in, generator=g).to(DEVICE)
    # a prefill of 37 tokens, one of 5, and a mixture's chunk of 20 tokens (two overlapping weighted segments)
    segs = [Segment(3, 40, 0), Segment(40, 45, 1 % len(ranks)), Segment(50, 70, 0, 0.3),
            Segment(50, 70, len(ranks) - 1, 0.7)]
    y0 = torch.randn(t, sum(sizes), generator=g).to(DEVICE)
    want, got = y0.clone(), y0.clone()
    for s in segs:
        add_lora_segment(want[s.start:s.end], x[s.start:s.end], a, bs, slices_of(sizes), s.slot, s.weight)
    add_lora_segments_triton(got, x, a, bs, slices_of(sizes), segs, rank_t)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got[:3], y0[:3]) and torch.equal(got[45:50], y0[45:50])  # untouched rows stay


def test_bf16_inputs_accumulate_in_fp32():
    sizes, r = [32], 16
    a, bs, rank_t = stack(5, 1, r, 64, sizes, [16, 9])
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    slots = torch.tensor([[0], [1], [2], [0], [1], [0]]).to(DEVICE)
    want = torch.zeros(6, 32, device=DEVICE)
    add_lora_bgmv(want, x, a, bs, slices_of(sizes), slots, None)
    got = torch.zeros(6, 32, dtype=torch.bfloat16, device=DEVICE)
    add_lora_bgmv_triton(got, x.bfloat16(), a.bfloat16(), [b.bfloat16() for b in bs], slices_of(sizes), slots, None,
                         rank_t)
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)
    seg = torch.zeros(6, 32, dtype=torch.bfloat16, device=DEVICE)
    add_lora_segments_triton(seg, x.bfloat16(), a.bfloat16(), [b.bfloat16() for b in bs], slices_of(sizes),
                             [Segment(0, 6, 1)], rank_t)
    ref = torch.zeros(6, 32, device=DEVICE)
    add_lora_segment(ref, x, a, bs, slices_of(sizes), 1)
    torch.testing.assert_close(seg.float(), ref, rtol=3e-2, atol=3e-2)
