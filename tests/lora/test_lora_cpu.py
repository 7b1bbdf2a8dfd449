"""The C BGMV kernel (``ops.lora_cpu``) against the torch gather form it replaces on CPU: ranks 1–128 (mixed in one
buffer, each slot at its own true rank), fp32 / bf16, adapter popularity, K weighted pairs, the zero slot."""
from __future__ import annotations

import pytest
import torch

from loraplex import ops
from loraplex.layers.lora import LoRAStack
from loraplex.layers.projections import PROJECTIONS, ModuleShapes
from loraplex.ops import lora_cpu
from loraplex.ops.lora_batch import Bgmv, LoRABatch
from tests.lora.test_ops import _slot_pattern

pytestmark = pytest.mark.skipif(not lora_cpu.available(torch.zeros(1)), reason="no C compiler on this machine")


def _buffers(ranks: list[int], n_in: int, sizes: list[int], dtype, width: int):
    """Slot buffers as ``LoRAStack`` holds them (width ``width``, slot s zero past ``ranks[s]``), B also transposed."""
    s = len(ranks)
    a = torch.zeros(s, len(sizes) * width, n_in)
    bs = [torch.zeros(s, n, width) for n in sizes]
    for slot, r in enumerate(ranks):
        for i in range(len(sizes)):
            a[slot, i * width:i * width + r] = torch.randn(r, n_in) / n_in ** 0.5
            bs[i][slot, :, :r] = torch.randn(sizes[i], r) / max(r, 1) ** 0.5
    a, bs = a.to(dtype), [b.to(dtype) for b in bs]
    return a, bs, [b.transpose(1, 2).contiguous() for b in bs], torch.tensor(ranks, dtype=torch.int32)


@pytest.mark.parametrize("kind", ["distinct", "identical", "zipf", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ranks", [[1, 1, 1, 1, 0], [8, 16, 8, 16, 0], [64, 3, 128, 32, 0]])
@pytest.mark.parametrize("sizes", [[40, 24, 8], [136, 64, 8]])  # slices under 64 outputs; blocks of 64 and a tail
def test_kernel_matches_the_torch_gather(kind, dtype, ranks, sizes):
    torch.manual_seed(sum(ranks))
    t, n_in = 19, 72
    width = max(ranks)
    a, bs, bts, rank_t = _buffers(ranks, n_in, sizes, dtype, width)
    slices = [(sum(sizes[:i]), n) for i, n in enumerate(sizes)]
    x = torch.randn(t, n_in).to(dtype)
    slots = _slot_pattern(kind, t, len(ranks)).unsqueeze(1)
    y = torch.randn(t, sum(sizes)).to(dtype)
    expected, got = y.clone(), y.clone()
    ops.add_lora_bgmv(expected, x, a, bs, slices, slots, None)
    lora_cpu.add_lora_bgmv_cpu(got, x, a, bts, slices, slots, None, rank_t)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(got.float(), expected.float(), **tol)
    assert not torch.equal(got, y) or set(slots.flatten().tolist()) == {len(ranks) - 1}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_weighted_pairs_and_zero_weights(k):
    torch.manual_seed(k)
    t, n_in, sizes, ranks = 11, 32, [16, 48], [4, 8, 16, 0]
    a, bs, bts, rank_t = _buffers(ranks, n_in, sizes, torch.float32, 16)
    slots = torch.randint(0, len(ranks), (t, k))
    weights = torch.rand(t, k)
    weights[0] = 0  # a row whose pairs all weigh 0 is left as it was
    x, y = torch.randn(t, n_in), torch.randn(t, 64)
    expected, got = y.clone(), y.clone()
    ops.add_lora_bgmv(expected, x, a, bs, [(0, 16), (16, 48)], slots, weights)
    lora_cpu.add_lora_bgmv_cpu(got, x, a, bts, [(0, 16), (16, 48)], slots, weights, rank_t)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0], y[0])


def test_strided_output_rows_and_an_input_view():
    a, bs, bts, rank_t = _buffers([8, 8, 0], 16, [12], torch.float32, 8)
    x = torch.randn(10, 20)[:, 2:18]  # rows of stride 20
    y = torch.zeros(10, 30)
    slots = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]).unsqueeze(1)
    expected = torch.zeros(10, 12)
    ops.add_lora_bgmv(expected, x, a, bs, [(0, 12)], slots, None)
    lora_cpu.add_lora_bgmv_cpu(y[:, 5:], x, a, bts, [(0, 12)], slots, None, rank_t)
    torch.testing.assert_close(y[:, 5:17], expected, atol=1e-5, rtol=1e-5)
    assert not y[:, :5].any() and not y[:, 17:].any()


def test_lora_stack_stores_b_transposed_and_steps_through_the_kernel():
    shapes = ModuleShapes(1, {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
                              "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)})
    stack = LoRAStack(PROJECTIONS[0], shapes, 4, 16, torch.float32, "cpu")
    assert stack.transposed_b and stack.lora_b[0].data_ptr() == stack.lora_bt[0].data_ptr()
    w = {m: (torch.randn(r, 32), torch.randn(n, r)) for (m, n), r in zip([("q_proj", 32), ("k_proj", 16),
                                                                          ("v_proj", 16)], [8, 8, 8])}
    stack.set_slot(1, w)
    stack.set_slot(2, {m: (torch.randn(16, 32), torch.randn(n, 16)) for m, n in [("q_proj", 32), ("v_proj", 16)]})
    assert stack.rank == 16 and stack.lora_bt[0].shape == (5, 16, 32)  # grown, still transposed storage
    x = torch.randn(3, 32)
    slots = torch.tensor([[1], [2], [4]])  # slot 4: the zero slot
    y = torch.zeros(3, 64)
    stack(y, x, LoRABatch(3, Bgmv(slots), used_slots=frozenset({1, 2})))
    expected = torch.zeros(3, 64)
    ops.add_lora_bgmv(expected, x, stack.lora_a, [b.contiguous() for b in stack.lora_b], stack.out_slices, slots, None)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    q = w["q_proj"]
    torch.testing.assert_close(y[0, :32], x[0] @ q[0].T @ q[1].T, atol=1e-4, rtol=1e-4)
    assert not y[2].any()
