"""Sampler semantics on synthetic logits: seeds, filters, penalties."""
from __future__ import annotations

import torch

from loraplex.sampling import Sampler
from loraplex.sampling.penalties import apply_penalties
from loraplex.sampling_params import SamplingParams
from loraplex.scheduler import ScheduledRequest


def row(rid: str, sp: SamplingParams, output=()) -> ScheduledRequest:
    return ScheduledRequest(rid, [1], 0, [0], True, sp, sp.seed, [1, 2, 3], list(output))


def draw(sampler, logits, rows, steps=8):
    return [[t.token_id for t in sampler(logits.clone(), rows)] for _ in range(steps)]


def test_seeded_rows_ignore_batch_company():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    sp = SamplingParams(temperature=1.0, seed=123)
    alone = [s[0] for s in draw(Sampler(torch.device("cpu")), logits, [row("a", sp)])]
    crowd_logits = torch.cat([torch.randn(2, 50), logits, torch.randn(1, 50)])
    crowd_rows = [row("x", SamplingParams(temperature=1.0)), row("y", SamplingParams(temperature=0.5, seed=9)),
                  row("a", sp), row("z", SamplingParams(temperature=0))]
    crowd = [s[2] for s in draw(Sampler(torch.device("cpu"), seed=77), crowd_logits, crowd_rows)]
    assert alone == crowd
    assert len(set(alone)) > 1  # it really samples


def test_filters_reduce_to_argmax_and_greedy():
    torch.manual_seed(1)
    logits = torch.randn(3, 100)
    best = logits.argmax(-1).tolist()
    sampler = Sampler(torch.device("cpu"))
    rows = [row("k", SamplingParams(temperature=1.0, top_k=1)), row("p", SamplingParams(temperature=1.0, top_p=1e-6)),
            row("g", SamplingParams(temperature=0))]
    for _ in range(5):
        assert [t.token_id for t in sampler(logits.clone(), rows)] == best


def test_min_p_and_top_k_keep_only_allowed_tokens():
    logits = torch.tensor([[5.0, 4.9, 0.0, -1.0, 4.8, -3.0]])
    sampler = Sampler(torch.device("cpu"))
    seen_k = {t[0] for t in draw(sampler, logits, [row("k", SamplingParams(temperature=1.0, top_k=2))], 50)}
    seen_m = {t[0] for t in draw(sampler, logits, [row("m", SamplingParams(temperature=1.0, min_p=0.5))], 50)}
    assert seen_k == {0, 1} and seen_m == {0, 1, 4}


def test_penalties_formula():
    logits = torch.tensor([2.0, -2.0, 1.0, 1.0, 0.5])
    sp = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, sp, prompt_ids=[0], output_ids=[1, 3, 3])
    expected = torch.tensor([1.0, -4.0 - 0.75, 1.0, 0.5 - 1.0, 0.5])
    torch.testing.assert_close(logits, expected)


def test_logprobs_are_raw_and_ranked():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = Sampler(torch.device("cpu"))(logits.clone(), [row("a", SamplingParams(temperature=0, logprobs=2))])[0]
    lp = torch.log_softmax(logits[0], -1)
    assert out.token_id == 1 and out.rank == 1
    assert [t for t, _ in out.top_logprobs] == [1, 2]
    torch.testing.assert_close(out.logprob, lp[1].item())
