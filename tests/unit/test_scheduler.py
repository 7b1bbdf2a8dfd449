"""Scheduler and block manager driven without a model (fake runner outputs)."""
from __future__ import annotations

import pytest

from loraplex.config import SchedulerConfig
from loraplex.kv_cache import BlockManager
from loraplex.request import Request, RequestStatus
from loraplex.sampling_params import SamplingParams
from loraplex.lora.residency import AdapterUnreadable
from loraplex.scheduler import ModelRunnerOutput, SampledToken, Scheduler
from loraplex.scheduler.output import XLoRAPhase


class Slots:
    """A residency of ``max_loras`` device slots (what the adapter store answers), recording holds."""

    def __init__(self, max_loras: int, pinned=(), unreadable=()) -> None:
        self.max_loras, self.pinned, self.unreadable = max_loras, set(pinned), set(unreadable)
        self.held: dict[str, int] = {}

    def can_hold(self, names) -> bool:
        new = set(names) - self.held.keys()
        return not new or len(self.held.keys() | self.pinned | new) <= self.max_loras

    def hold(self, names) -> None:
        if bad := set(names) & self.unreadable:
            raise AdapterUnreadable(f"adapter {sorted(bad)[0]!r} could not be read")
        for n in names:
            self.held[n] = self.held.get(n, 0) + 1

    def release(self, names) -> None:
        for n in names:
            self.held[n] -= 1
            if not self.held[n]:
                del self.held[n]


def make_request(rid: str, prompt_len: int, max_tokens: int) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def fake_step(sched: Scheduler):
    out = sched.schedule()
    result = ModelRunnerOutput({s.request_id: SampledToken(7) for s in out.scheduled if s.sample})
    sched.update_from_output(out, result)
    return out


def test_block_manager_allocates_and_frees():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.allocate("a", 5) and bm.block_tables["a"] == [0, 1]
    assert bm.blocks_needed("a", 8) == 0 and bm.blocks_needed("a", 9) == 1
    assert not bm.allocate("b", 13)  # needs 4, only 2 free: nothing taken
    assert bm.num_free_blocks == 2 and "b" not in bm.block_tables
    bm.free("a")
    assert bm.num_free_blocks == 4


def test_budget_seqs_and_chunked_prefill():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8, max_model_len=64),
                      BlockManager(64, 4))
    for i, n in enumerate([20, 3, 3]):
        sched.add_request(make_request(f"r{i}", n, 4))
    first = fake_step(sched)
    assert [(s.request_id, s.num_tokens, s.start_pos, s.sample) for s in first.scheduled] == [("r0", 8, 0, False)]
    second = fake_step(sched)  # r0 continues its prefill; r1 fills the budget left
    assert [(s.request_id, s.num_tokens, s.start_pos) for s in second.scheduled] == [("r0", 8, 8)]
    third = fake_step(sched)
    assert [(s.request_id, s.num_tokens) for s in third.scheduled] == [("r0", 4), ("r1", 3)]
    assert third.scheduled[0].sample and len(sched.running) == 2 and len(sched.waiting) == 1  # max_num_seqs
    steps = 0
    while sched.has_unfinished():
        out = fake_step(sched)
        assert out.num_batched_tokens <= 8 and len(out.scheduled) <= 2
        steps += 1
    assert sched.kv.num_free_blocks == 64 and steps < 20


def test_preemption_recomputes_newest_and_everything_finishes():
    # 6 blocks of 4 slots: three 6-token prompts fit (2 blocks each) but cannot all grow to 12 tokens.
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64), BlockManager(6, 4))
    reqs = [make_request(f"r{i}", 6, 6) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    preempted = []
    for _ in range(100):
        if not sched.has_unfinished():
            break
        out = fake_step(sched)
        preempted += out.preempted_req_ids
        used = sum(len(t) for t in sched.kv.block_tables.values())
        assert used + sched.kv.num_free_blocks == 6
    assert not sched.has_unfinished()
    assert preempted and preempted[0] == "r2"  # the newest goes first
    assert all(r.status == RequestStatus.FINISHED_LENGTH and r.output_token_ids == [7] * 6 for r in reqs)
    assert sched.kv.num_free_blocks == 6 and sched.num_preemptions >= 1


def test_abort_frees_every_block():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                      BlockManager(32, 4))
    for i in range(4):
        sched.add_request(make_request(f"r{i}", 10, 20))
    fake_step(sched)
    fake_step(sched)
    assert sched.kv.num_free_blocks < 32
    sched.abort(["r0", "r1", "r2", "r3"])
    assert sched.kv.num_free_blocks == 32 and not sched.has_unfinished()
    assert sched.schedule().finished_req_ids == ["r0", "r1", "r2", "r3"]


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(n=0), "n"), (dict(logprobs=21), "logprobs"), (dict(min_p=2), "min_p"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(repetition_penalty=0), "repetition_penalty"),
])
def test_sampling_params_name_the_bad_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_max_loras_distinct_per_step_and_fcfs_across_adapters():
    slots = Slots(2)
    sched = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256, max_model_len=64),
                      BlockManager(128, 4), slots)
    order = ["a", "b", "c", "a", None, "d", "b"]
    reqs = []
    for i, name in enumerate(order):
        r = make_request(f"r{i}", 4, 3 + i)
        r.lora_name = name
        reqs.append(r)
        sched.add_request(r)
    admitted: list[str] = []
    while sched.has_unfinished():
        out = fake_step(sched)
        names = {s.lora_name for s in out.scheduled if s.lora_name}
        assert len(names) <= 2 and len(slots.held) <= 2
        admitted += [s.request_id for s in out.scheduled if s.start_pos == 0]
    assert admitted == [f"r{i}" for i in range(len(order))]  # nobody overtakes: FCFS across adapters
    assert not slots.held


def test_pinned_adapters_count_against_max_loras():
    slots = Slots(3, pinned={"p"})
    sched = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256, max_model_len=64),
                      BlockManager(128, 4), slots)
    for i, name in enumerate(["a", "b", "c", "p"]):
        r = make_request(f"r{i}", 4, 3)
        r.lora_name = name
        sched.add_request(r)
    out = sched.schedule()
    # the pinned adapter holds a slot of its own: only a and b fit beside it; c waits (and p behind it, FCFS)
    assert [s.lora_name for s in out.scheduled] == ["a", "b"]
    assert sched.waiting_loras(8) == ["c", "p"] and sched.waiting_loras(1) == ["c"]
    while sched.has_unfinished():
        out = fake_step(sched)
        assert len({s.lora_name for s in out.scheduled} | slots.pinned) <= 3


def test_xlora_alternates_scaling_and_real_pass_on_two_kv_tracks():
    """An X-LoRA request: a scaling-pass step on its second KV track (no sample), then a real-pass step over the same
    tokens (samples); a base request beside it advances every step. Preemption resets both; finish frees both."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64),
                      BlockManager(num_blocks=16, block_size=4), Slots(4))
    x = make_request("x", 6, 2)
    x.xlora, x.xlora_experts = "moe", ("moe/0", "moe/1")
    sched.add_request(x)
    sched.add_request(make_request("b", 5, 3))
    phases = []
    while sched.has_unfinished():
        out = sched.schedule()
        row = next((s for s in out.scheduled if s.request_id == "x"), None)
        if row is not None:
            tracks = sched.kv.block_tables
            assert row.block_table is tracks["x/xlora-scaling" if row.xlora_phase is XLoRAPhase.SCALING else "x"]
            phases.append((row.xlora_phase.value, row.num_tokens, row.sample))
        sched.update_from_output(out, ModelRunnerOutput({s.request_id: SampledToken(7) for s in out.scheduled
                                                         if s.sample}))
    assert phases == [("scaling", 6, False), ("real", 6, True), ("scaling", 1, False), ("real", 1, True)]
    assert sched.kv.num_free_blocks == 16 and x.num_output_tokens == 2

    y = make_request("y", 6, 4)
    y.xlora, y.xlora_experts = "moe", ("moe/0",)
    sched.add_request(y)
    fake_step(sched)
    assert y.xlora_scaled == 6 and y.num_computed_tokens == 0
    sched._preempt(y)
    assert y.xlora_scaled == 0 and sched.kv.num_free_blocks == 16


def test_unreadable_adapter_fails_its_request_at_admission_only():
    slots = Slots(4, unreadable={"bad"})
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                      BlockManager(32, 4), slots)
    reqs = [make_request(f"r{i}", 4, 2) for i in range(3)]
    reqs[0].lora_name, reqs[1].lora_name = "good", "bad"
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    assert [(f.request_id, f.parent_id) for f in out.failed] == [("r1", "r1")] and "could not be read" in out.failed[0].error
    assert [s.request_id for s in out.scheduled] == ["r0", "r2"]  # the others are admitted in the same step
    assert reqs[1].status is RequestStatus.FINISHED_ABORTED and "r1" not in sched.requests
    assert slots.held == {"good": 1}
    sched.update_from_output(out, ModelRunnerOutput({s.request_id: SampledToken(7) for s in out.scheduled}))
    while sched.has_unfinished():
        fake_step(sched)
    assert not slots.held and sched.kv.num_free_blocks == 32


def test_base_only_scheduler_refuses_adapter_rows():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                      BlockManager(32, 4))
    r = make_request("r", 4, 2)
    r.lora_name = "a"
    sched.add_request(r)
    assert not sched.schedule().scheduled and sched.num_waiting == 1  # never fits: no slots
