"""The batched LoRA op against its per-token reference: ranks, dtypes, adapter popularity, mixtures."""
from __future__ import annotations

import pytest
import torch

from loraplex import ops
from loraplex.ops.lora_torch import add_lora_reference


def _slot_pattern(kind: str, t: int, s: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "distinct":
        return torch.arange(t) % s
    if kind == "identical":
        return torch.full((t,), 2)
    if kind == "zipf":
        p = 1.0 / torch.arange(1, s + 1).float()
        return torch.multinomial(p / p.sum(), t, replacement=True, generator=g)
    return torch.randint(0, s, (t,), generator=g)


@pytest.mark.parametrize("kind", ["distinct", "identical", "zipf", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 8, 16])
def test_add_lora_matches_reference(kind, dtype, rank):
    torch.manual_seed(rank)
    t, n_in, sizes, s = 13, 48, [40, 24], 5
    a = torch.randn(s, 2 * rank, n_in, dtype=dtype)
    bs = [torch.randn(s, n, rank, dtype=dtype) for n in sizes]
    a[-1], bs[0][-1], bs[1][-1] = 0, 0, 0  # the zero slot
    x = torch.randn(t, n_in, dtype=dtype)
    slots = _slot_pattern(kind, t, s).unsqueeze(1)
    w = torch.ones(t, 1, dtype=dtype)
    y = torch.randn(t, sum(sizes), dtype=dtype)
    expected = y.clone()
    add_lora_reference(expected[:, :40], x, a[:, :rank], bs[0], slots, w)
    add_lora_reference(expected[:, 40:], x, a[:, rank:], bs[1], slots, w)
    ops.add_lora_bgmv(y, x, a, bs, [(0, 40), (40, 24)], slots, w)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(y, expected, atol=tol * rank, rtol=tol)


def test_weighted_mixture_per_row():
    torch.manual_seed(0)
    a, b = torch.randn(4, 8, 16), torch.randn(4, 12, 8)
    x = torch.randn(6, 16)
    slots = torch.tensor([[0, 1], [2, 3], [1, 1], [3, 0], [2, 2], [0, 3]])
    w = torch.rand(6, 2)
    y = torch.zeros(6, 12)
    ops.add_lora_bgmv(y, x, a, [b], [(0, 12)], slots, w)
    expected = torch.zeros(6, 12)
    add_lora_reference(expected, x, a, b, slots, w)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


def test_step_dispatch_bgmv_decodes_and_sgmv_segments():
    from loraplex.ops.lora_batch import Bgmv, LoRABatch, Segment

    torch.manual_seed(3)
    s, r, n_in, n_out = 4, 8, 32, 20
    a, b = torch.randn(s, r, n_in), torch.randn(s, n_out, r)
    a[-1], b[-1] = 0, 0
    x = torch.randn(12, n_in)
    # 3 decodes (slot 1, zero, a 0.7/0.3 mixture of slots 0 and 2), then prefill chunks: tokens 3-6 slot 2,
    # 7-8 base (absent), 9-11 a mixture of slot 1 (0.6) and slot 0 (-0.4)
    batch = LoRABatch(3, Bgmv(torch.tensor([[1, 3], [3, 3], [0, 2]]), torch.tensor([[1, 0], [1, 0], [0.7, 0.3]])),
                      (Segment(3, 7, 2), Segment(9, 12, 1, 0.6), Segment(9, 12, 0, -0.4)))
    per_token = torch.tensor([[1, 3], [3, 3], [0, 2]] + [[2, 3]] * 4 + [[3, 3]] * 2 + [[1, 0]] * 3)
    weights = torch.tensor([[1, 0], [1, 0], [0.7, 0.3]] + [[1, 0]] * 6 + [[0.6, -0.4]] * 3)
    y = torch.zeros(12, n_out)
    ops.add_lora(y, x, a, [b], [(0, n_out)], batch)
    expected = torch.zeros(12, n_out)
    add_lora_reference(expected, x, a, b, per_token, weights)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["identical", "zipf", "uniform"])
def test_dense_form_matches_reference(kind):
    from loraplex.ops.lora_torch import dense_lora

    torch.manual_seed(5)
    s, r, n_in, sizes, t = 6, 8, 40, [24, 10], 20
    a = torch.randn(s, 2 * r, n_in)
    bs = [torch.randn(s, n, r) for n in sizes]
    x = torch.randn(t, n_in)
    slots = _slot_pattern(kind, t, s)
    unique = torch.unique(slots)
    index = torch.searchsorted(unique, slots)
    y = torch.zeros(t, sum(sizes))
    dense_lora(y, x, a, bs, [(0, 24), (24, 10)], unique, index)
    expected = torch.zeros(t, sum(sizes))
    add_lora_reference(expected[:, :24], x, a[:, :r], bs[0], slots.unsqueeze(1), torch.ones(t, 1))
    add_lora_reference(expected[:, 24:], x, a[:, r:], bs[1], slots.unsqueeze(1), torch.ones(t, 1))
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


def test_weighted_dense_form_matches_reference():
    """Mixtures over few adapters: each token's weights on the D used slots (zeros where unused)."""
    from loraplex.ops.lora_torch import dense_lora_weighted

    torch.manual_seed(6)
    s, r, n_in, sizes, t = 6, 8, 40, [24, 10], 12
    a, bs, x = torch.randn(s, 2 * r, n_in), [torch.randn(s, n, r) for n in sizes], torch.randn(t, n_in)
    slots = torch.tensor([[1, 4]] * 6 + [[4, 2]] * 4 + [[2, 2]] * 2)  # the last rows: one adapter, weight 0 pad
    weights = torch.tensor([[0.7, 0.3]] * 6 + [[-0.5, 1.5]] * 4 + [[1.0, 0.0]] * 2)
    unique = torch.tensor([1, 2, 4])
    dense = torch.zeros(t, 3)
    for i in range(t):
        for k in range(2):
            dense[i, int(torch.searchsorted(unique, slots[i, k]))] += weights[i, k]
    y = torch.zeros(t, sum(sizes))
    dense_lora_weighted(y, x, a, bs, [(0, 24), (24, 10)], unique, dense)
    expected = torch.zeros(t, sum(sizes))
    add_lora_reference(expected[:, :24], x, a[:, :r], bs[0], slots, weights)
    add_lora_reference(expected[:, 24:], x, a[:, r:], bs[1], slots, weights)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


def test_gated_form_matches_reference():
    """X-LoRA: a weight per token, output slice and expert, on a subset of the step's rows (index_add back)."""
    torch.manual_seed(7)
    s, r, n_in, sizes, t = 6, 8, 40, [24, 10, 10], 9
    a, bs, x = torch.randn(s, 3 * r, n_in), [torch.randn(s, n, r) for n in sizes], torch.randn(t, n_in)
    slices = [(0, 24), (24, 10), (34, 10)]
    experts, rows = torch.tensor([5, 0, 3]), torch.tensor([1, 2, 4, 8])
    weights = torch.rand(len(rows), 3, len(experts))  # [Tx, slice, expert]
    y = torch.randn(t, sum(sizes))
    expected = y.clone()
    ops.add_lora_gated(y, x, a, bs, slices, ops.XLoRAGroup(rows, experts, weights), weights)
    for j, row in enumerate(rows.tolist()):
        for i, (start, size) in enumerate(slices):
            add_lora_reference(expected[row:row + 1, start:start + size], x[row:row + 1], a[:, i * r:(i + 1) * r],
                               bs[i], experts.view(1, -1), weights[j, i].view(1, -1))
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


def test_back_to_back_segments_of_one_adapter_merge():
    from loraplex.engine.lora_batch import merge_segments
    from loraplex.ops.lora_batch import Segment

    segs = [Segment(*s) for s in [(0, 3, 2, 1.0), (3, 7, 2, 1.0), (7, 9, 1, 1.0), (9, 12, 1, 0.5), (12, 14, 1, 0.5),
                                  (14, 15, 2, 1.0)]]
    assert merge_segments(segs) == [(0, 7, 2, 1.0), (7, 9, 1, 1.0), (9, 14, 1, 0.5), (14, 15, 2, 1.0)]
    mixture = [Segment(3, 6, 0, 0.7), Segment(3, 6, 1, 0.3)]  # one chunk, two adapters: nothing to merge
    assert merge_segments(mixture) == mixture


def test_one_adapter_decodes_as_a_segment_match_reference():
    from loraplex.ops.lora_batch import LoRABatch, Segment

    torch.manual_seed(4)
    a, b = torch.randn(4, 8, 16), torch.randn(4, 12, 8)
    x = torch.randn(5, 16)
    y = torch.zeros(5, 12)
    ops.add_lora(y, x, a, [b], [(0, 12)], LoRABatch(3, segments=(Segment(0, 3, 2), Segment(3, 5, 1))))
    expected = torch.zeros(5, 12)
    add_lora_reference(expected, x, a, b, torch.tensor([[2], [2], [2], [1], [1]]), torch.ones(5, 1))
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


def test_slot_buffers_grow_to_the_largest_rank_loaded_and_keep_every_slot():
    """A stack is as wide as the largest rank written (not max_lora_rank); widening keeps the slots' results."""
    from loraplex.layers.lora import LoRAStack
    from loraplex.layers.projections import PROJECTIONS, ModuleShapes
    from loraplex.ops.lora_batch import Bgmv, LoRABatch

    torch.manual_seed(0)
    qkv = next(p for p in PROJECTIONS if p.name == "qkv_proj")
    shapes = ModuleShapes.of(1, hidden_size=32, intermediate_size=48, q_size=32, kv_size=16)
    stack = LoRAStack(qkv, shapes, max_loras=3, max_rank=64, dtype=torch.float32, device="cpu")
    x = torch.randn(2, 32)
    batch = LoRABatch(2, Bgmv(torch.tensor([[0], [1]])), used_slots=frozenset({0, 1}))

    def run():
        y = torch.zeros(2, 64)
        stack(y, x, batch)
        return y

    w4 = {"q_proj": (torch.randn(4, 32), torch.randn(32, 4)), "v_proj": (torch.randn(4, 32), torch.randn(16, 4))}
    stack.set_slot(0, w4)
    assert stack.rank == 4 and stack.lora_a.shape == (4, 3 * 4, 32)
    before = run()
    assert before[0].abs().sum() > 0 and before[1].abs().sum() == 0
    w16 = {"k_proj": (torch.randn(16, 32), torch.randn(16, 16))}
    stack.set_slot(1, w16)
    assert stack.rank == 16 and stack.lora_a.shape == (4, 3 * 16, 32) and stack.lora_b[0].shape == (4, 32, 16)
    after = run()
    torch.testing.assert_close(after[0], before[0])  # slot 0 survived the widening
    a, b = w16["k_proj"]
    torch.testing.assert_close(after[1, 32:48], (x[1] @ a.T) @ b.T)
    with pytest.raises(ValueError, match="max_lora_rank"):
        stack.set_slot(2, {"q_proj": (torch.randn(65, 32), torch.randn(32, 65))})


@pytest.mark.parametrize("form", ["bgmv", "dense", "segments", "gated"])
def test_narrowing_to_true_ranks_changes_nothing_but_the_work(form):
    """With ``rank_of`` the torch forms read only each slot's true rank (segments their own, decodes the step's
    largest): the same result as over the zero-padded buffers."""
    from loraplex.ops.lora_batch import Bgmv, Dense, LoRABatch, Segment, XLoRAGroup

    torch.manual_seed(3)
    width, n_in, outs = 32, 24, (20, 12)
    rank_of = [4, 16, 8, 0]
    lora_a = torch.zeros(4, 2 * width, n_in)
    lora_bs = [torch.zeros(4, n, width) for n in outs]
    for s, r in enumerate(rank_of):
        for i in range(2):
            lora_a[s, i * width:i * width + r] = torch.randn(r, n_in)
            lora_bs[i][s, :, :r] = torch.randn(outs[i], r)
    out_slices = [(0, 20), (20, 12)]
    x = torch.randn(9, n_in)
    if form == "bgmv":
        batch = LoRABatch(9, Bgmv(torch.tensor([[0], [1], [2], [3], [0], [2], [1], [1], [3]])),
                          used_slots=frozenset({0, 1, 2}))
    elif form == "dense":
        batch = LoRABatch(9, Dense(torch.tensor([0, 2]), torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 1])),
                          used_slots=frozenset({0, 2}))
    elif form == "segments":
        batch = LoRABatch(0, None, (Segment(0, 4, 0), Segment(4, 7, 1, 0.5), Segment(7, 9, 2)),
                          used_slots=frozenset({0, 1, 2}))
    if form == "gated":
        group = XLoRAGroup(torch.tensor([1, 3, 5]), torch.tensor([0, 2]), torch.rand(3, 2, 2))
        y_full, y_narrow = torch.zeros(9, 32), torch.zeros(9, 32)
        ops.add_lora_gated(y_full, x, lora_a, lora_bs, out_slices, group, group.weights)
        ops.add_lora_gated(y_narrow, x, lora_a, lora_bs, out_slices, group, group.weights, rank_of=rank_of)
    else:
        y_full, y_narrow = torch.zeros(9, 32), torch.zeros(9, 32)
        ops.add_lora(y_full, x, lora_a, lora_bs, out_slices, batch)
        ops.add_lora(y_narrow, x, lora_a, lora_bs, out_slices, batch, rank_of=rank_of)
    assert y_full.abs().sum() > 0
    torch.testing.assert_close(y_narrow, y_full, rtol=1e-5, atol=1e-5)
