"""The thread tuner: measures every candidate, then keeps the fastest per step size, re-trying the others rarely."""
from __future__ import annotations

from loraplex.engine.thread_tuner import ThreadTuner


def _drive(tuner: ThreadTuner, cost: dict[int, float], steps: int, tokens: int = 1) -> list[int]:
    chosen = []
    for _ in range(steps):
        c = tuner.choose(tokens)
        tuner.record(tokens, c, cost[c] * tokens)
        chosen.append(c)
    return chosen


def test_measures_each_candidate_then_keeps_the_fastest():
    t = ThreadTuner(2, trials=3, explore_every=16)
    assert t.candidates == [1, 2]
    chosen = _drive(t, {1: 0.030, 2: 0.020}, 200)
    assert chosen[:6].count(1) == 3 and chosen[:6].count(2) == 3
    assert chosen[6:].count(2) > 0.9 * len(chosen[6:])
    assert 0 < chosen[6:].count(1) <= 200 // 16  # re-tried now and then, never more than once per period


def test_follows_a_change_of_load_and_buckets_are_separate():
    t = ThreadTuner(2, trials=2, explore_every=8)
    _drive(t, {1: 0.030, 2: 0.020}, 50)
    _drive(t, {1: 0.002, 2: 0.004}, 50, tokens=64)  # a prefill-sized bucket has its own choice
    late = _drive(t, {1: 0.030, 2: 0.200}, 300)  # a busy neighbour: two threads now 10x slower
    assert late[-100:].count(1) > 95
    assert t.choose(64) == 1
    assert set(t.summary()) == {"<=1", ">32"}


def test_a_much_slower_candidate_is_retried_less_often():
    t = ThreadTuner(2, trials=1, explore_every=8)
    chosen = _drive(t, {1: 0.010, 2: 0.500}, 2000)
    assert chosen.count(2) <= 2000 // (8 * 50) + 2  # at most about once per explore_every x (capped) ratio


def test_one_core_has_one_candidate():
    t = ThreadTuner(1)
    assert t.candidates == [1] and t.choose(1) == 1
