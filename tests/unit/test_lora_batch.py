"""``build_lora_batch``: which form serves which tokens, from the step's rows and the adapters' slots alone."""
from __future__ import annotations

import torch

from loraplex.engine.lora_batch import DENSE_LORA_TOKENS_PER_ADAPTER, build_lora_batch
from loraplex.ops.lora_batch import Bgmv, Dense, DenseWeighted, Segment
from loraplex.sampling_params import SamplingParams
from loraplex.scheduler.output import ScheduledRequest, XLoRAPhase

ZERO = 8  # the all-zero slot (max_loras = 8)
SLOTS = {"a": 0, "b": 3, "c": 5, "x/0": 6, "x/1": 7}


def row(n_tokens: int, lora: str | None = None, mix=(), xlora: str | None = None) -> ScheduledRequest:
    experts = ("x/0", "x/1") if xlora else ()
    return ScheduledRequest("r", [1] * n_tokens, 4, [0], True, SamplingParams(), None, [1], [],
                            lora_name=lora, lora_mix=tuple(mix), xlora=xlora, xlora_experts=experts,
                            xlora_phase=XLoRAPhase.REAL if xlora else None)


def test_base_only_step_has_no_batch():
    assert build_lora_batch([row(1), row(5)], SLOTS, ZERO) is None


def test_one_adapter_everywhere_is_one_segment():
    n = DENSE_LORA_TOKENS_PER_ADAPTER
    b = build_lora_batch([row(1, "a")] * n + [row(3, "a"), row(2, "a")], SLOTS, ZERO)
    assert b.decodes is None and b.segments == (Segment(0, n + 5, 0),) and b.used_slots == {0}


def test_one_adapter_on_fewer_decodes_than_the_dense_ratio_gathers_per_token():
    b = build_lora_batch([row(1, "a"), row(1, "a"), row(3, "a")], SLOTS, ZERO)  # 2 decodes < the ratio (4)
    assert isinstance(b.decodes, Bgmv) and b.decodes.slots.tolist() == [[0], [0]]
    assert b.segments == (Segment(2, 5, 0),)
    one = build_lora_batch([row(1, "a")], SLOTS, ZERO, dense_ratio=float("inf"))  # one user: the BGMV kernel
    assert isinstance(one.decodes, Bgmv) and not one.segments
    many = build_lora_batch([row(1, "a")] * 17, SLOTS, ZERO, dense_ratio=float("inf"))  # past what was measured
    assert many.decodes is None and many.segments == (Segment(0, 17, 0),)


def test_steps_the_fused_decode_step_takes_keep_bgmv():
    """Up to ``fused_decodes`` decodes and nothing else: BGMV whatever the dense ratio says (the fused step takes
    only that form); a prefill in the step, or more decodes, and the ratio decides again."""
    lone = [row(1, "a")] * 32
    fused = build_lora_batch(lone, SLOTS, ZERO, dense_ratio=4, fused_decodes=32)
    assert isinstance(fused.decodes, Bgmv) and fused.decodes.slots.tolist() == [[0]] * 32 and not fused.segments
    assert build_lora_batch(lone, SLOTS, ZERO, dense_ratio=4, fused_decodes=16).segments == (Segment(0, 32, 0),)
    with_prefill = build_lora_batch(lone + [row(3, "a")], SLOTS, ZERO, dense_ratio=4, fused_decodes=64)
    assert with_prefill.decodes is None and with_prefill.segments == (Segment(0, 35, 0),)
    two = [row(1, n) for n in ["a", "b"] * 8]
    assert isinstance(build_lora_batch(two, SLOTS, ZERO, dense_ratio=4, fused_decodes=16).decodes, Bgmv)
    assert isinstance(build_lora_batch(two, SLOTS, ZERO, dense_ratio=4).decodes, Dense)
    mix = [row(1, mix=[("a", 0.5), ("b", 0.5)])] * 8
    assert isinstance(build_lora_batch(mix, SLOTS, ZERO, dense_ratio=2, fused_decodes=8).decodes, Bgmv)
    assert isinstance(build_lora_batch(mix, SLOTS, ZERO, dense_ratio=2).decodes, DenseWeighted)


def test_few_decodes_over_distinct_adapters_gather_per_token():
    b = build_lora_batch([row(1, "a"), row(1), row(1, "b"), row(4, "c")], SLOTS, ZERO)
    assert isinstance(b.decodes, Bgmv) and b.decodes.weights is None
    assert b.decodes.slots.tolist() == [[0], [ZERO], [3]]  # the base row points at the zero slot
    assert b.num_decodes == 3 and b.segments == (Segment(3, 7, 5),) and b.used_slots == {0, 3, 5}


def test_many_decodes_per_adapter_take_the_dense_form():
    names = ["a", "b"] * DENSE_LORA_TOKENS_PER_ADAPTER
    b = build_lora_batch([row(1, n) for n in names], SLOTS, ZERO)
    assert isinstance(b.decodes, Dense) and b.decodes.slots.tolist() == [0, 3]
    assert b.decodes.index.tolist() == [0, 1] * DENSE_LORA_TOKENS_PER_ADAPTER and not b.segments


def test_mixtures_weighted_gather_or_weighted_dense():
    mix = [("a", 0.7), ("b", 0.3)]
    b = build_lora_batch([row(1, mix=mix), row(1, "c"), row(3, mix=mix)], SLOTS, ZERO)
    assert isinstance(b.decodes, Bgmv)
    assert b.decodes.slots.tolist() == [[0, 3], [5, ZERO]]  # padded with the zero slot at weight 0
    torch.testing.assert_close(b.decodes.weights, torch.tensor([[0.7, 0.3], [1.0, 0.0]]))
    assert b.segments == (Segment(2, 5, 0, 0.7), Segment(2, 5, 3, 0.3))  # the chunk once per adapter
    many = build_lora_batch([row(1, mix=mix)] * (2 * DENSE_LORA_TOKENS_PER_ADAPTER), SLOTS, ZERO)
    assert isinstance(many.decodes, DenseWeighted) and many.decodes.slots.tolist() == [0, 3]
    torch.testing.assert_close(many.decodes.weights, torch.tensor([[0.7, 0.3]] * 2 * DENSE_LORA_TOKENS_PER_ADAPTER))


def test_xlora_rows_add_only_their_experts_slots():
    b = build_lora_batch([row(1, "a"), row(1, xlora="x"), row(2, xlora="x")], SLOTS, ZERO)
    assert isinstance(b.decodes, Bgmv) and b.decodes.slots.tolist() == [[0], [ZERO]]
    assert not b.segments and b.used_slots == {0, 6, 7} and b.xlora == ()


def test_the_measured_dense_ratio_decides_the_form():
    names = ["a", "b"] * 4  # 4 tokens per adapter
    rows = [row(1, n) for n in names]
    assert isinstance(build_lora_batch(rows, SLOTS, ZERO, dense_ratio=4).decodes, Dense)
    assert isinstance(build_lora_batch(rows, SLOTS, ZERO, dense_ratio=8).decodes, Bgmv)
    assert isinstance(build_lora_batch(rows, SLOTS, ZERO, dense_ratio=float("inf")).decodes, Bgmv)
    mix = [("a", 0.7), ("b", 0.3)]
    assert isinstance(build_lora_batch([row(1, mix=mix)] * 4, SLOTS, ZERO, dense_ratio=2).decodes, DenseWeighted)
    assert isinstance(build_lora_batch([row(1, mix=mix)] * 4, SLOTS, ZERO, dense_ratio=4).decodes, Bgmv)
