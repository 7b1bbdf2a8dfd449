"""Weights and KV caches moved into huge-page arenas (``ops.hugepages``): same values, same sharing, same tokens."""
import pytest
import torch
from torch import nn

from loraplex.ops import hugepages


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 12)
        self.proj = nn.Linear(12, 7)
        self.head = nn.Linear(12, 50, bias=False)
        self.head.weight = self.embed.weight  # tied: one Parameter in two modules
        self.register_buffer("table", torch.arange(30, dtype=torch.int32).view(5, 6))
        self.proj.register_buffer("scales", torch.rand(7))


def test_move_module_keeps_values_sharing_and_parameters():
    torch.manual_seed(0)
    m = _Tied().to(torch.bfloat16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = dict(m.named_parameters())
    arena = hugepages.move_module(m)
    assert arena is not None
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
        assert arena.holds(v) and v.is_contiguous() and v.data_ptr() % hugepages.ALIGN == 0, k
    assert dict(m.named_parameters()) == params  # the same Parameter objects, their data swapped
    assert m.head.weight is m.embed.weight and m.head.weight.data_ptr() == m.embed.weight.data_ptr()
    assert arena.start % hugepages.HUGE_PAGE == 0
    x = torch.randint(0, 50, (4,))
    m.embed.weight.data[x[0]] += 1  # a write lands in the one tied copy
    assert torch.equal(m.head.weight[x[0]], m.embed.weight[x[0]])


def test_zeros_are_zero_and_separate():
    a, b = hugepages.zeros([(3, 5), (4, 2)], torch.float32)
    assert a.shape == (3, 5) and b.shape == (4, 2) and not a.any() and not b.any()
    a.fill_(1.0)
    assert not b.any()


def test_arena_refuses_overflow():
    arena = hugepages.Arena(128)
    arena.take((16,), torch.float32)
    arena.take((16,), torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        arena.take((1,), torch.float32)


def test_switch_off_by_environment(monkeypatch):
    monkeypatch.setenv("LORAPLEX_NO_HUGEPAGES", "1")
    assert not hugepages.available()


def test_large_tensors_stay_in_place_small_ones_move():
    m = nn.Module()
    m.big = nn.Parameter(torch.randn(hugepages.IN_PLACE_BYTES // 4 + 1000), requires_grad=False)
    m.small = nn.Parameter(torch.randn(100), requires_grad=False)
    big_ptr, big_copy, small_copy = m.big.data_ptr(), m.big.clone(), m.small.clone()
    arena = hugepages.move_module(m)
    assert m.big.data_ptr() == big_ptr and torch.equal(m.big, big_copy)  # collapsed (or not) where it was
    assert arena.holds(m.small) and not arena.holds(m.big) and torch.equal(m.small, small_copy)
