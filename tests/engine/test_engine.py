"""Engine behaviour on a tiny random Llama: preemption, abort, seeds, stops, n, bad input."""
from __future__ import annotations

import pytest
import torch

from loraplex import LLM, SamplingParams
from tests.conftest import hf_greedy

PROMPTS = [list(range(10, 10 + n)) for n in (3, 9, 14, 6, 11, 20)]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu")


def assert_idle(llm: LLM):
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.kv.num_free_blocks == engine.config.cache.num_blocks
    assert not engine.outputs.parents


def test_preemption_under_tiny_kv_budget_gives_same_tokens(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    # 64 slots of 4 tokens = 64 token slots for 6 requests that grow to ~30 tokens each: preemption is certain.
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # k+v * layers * block_size * kv_heads * head_dim * fp32
    small = LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu", block_size=4, max_model_len=64,
                kv_cache_memory=16 * block_bytes)
    assert small.llm_engine.config.cache.num_blocks == 16
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = small.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    assert small.llm_engine.scheduler.num_preemptions > 0
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 16)[0]
    assert_idle(small)


def test_abort_frees_every_block(llm):
    engine = llm.llm_engine
    ids = [engine.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True)) for p in PROMPTS]
    for _ in range(3):
        engine.step()
    assert engine.scheduler.kv.num_free_blocks < engine.config.cache.num_blocks
    for rid in ids:
        out = engine.abort_request(rid)
        assert out.outputs[0].finish_reason == "abort"
    assert_idle(llm)


def test_seed_reproducible_whatever_the_batch(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=12, ignore_eos=True)
    alone = llm.generate(prompt_token_ids=[PROMPTS[1]], sampling_params=sp, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=5 + i, ignore_eos=True) for i in range(4)]
    crowd = llm.generate(prompt_token_ids=[PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3], PROMPTS[4]],
                         sampling_params=[others[0], others[1], sp, others[2], others[3]], use_tqdm=False)
    assert crowd[2].outputs[0].token_ids == alone
    greedy = llm.generate(prompt_token_ids=[PROMPTS[1]], use_tqdm=False,
                          sampling_params=SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert greedy[0].outputs[0].token_ids != alone  # it did sample
    assert_idle(llm)


def test_n_completions_and_logprobs(llm):
    sp = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=6, ignore_eos=True, logprobs=3)
    out = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=sp, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert len(c.logprobs) == 6 and all(len(e) >= 3 for e in c.logprobs)
        assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in zip(c.logprobs, c.token_ids)))
    assert_idle(llm)


def test_stop_strings_and_stop_token_ids(llm):
    base = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = llm.generate(prompt_token_ids=[PROMPTS[2]], sampling_params=base, use_tqdm=False)[0].outputs[0]
    assert len(full.text) >= 6
    stop = full.text[3:5]
    cut = llm.generate(prompt_token_ids=[PROMPTS[2]], use_tqdm=False,
                       sampling_params=SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))[0]
    first = full.text.index(stop)
    assert cut.outputs[0].text == full.text[:first]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    tid = full.token_ids[4]
    by_id = llm.generate(prompt_token_ids=[PROMPTS[2]], use_tqdm=False, sampling_params=SamplingParams(
        temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[tid]))[0].outputs[0]
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(tid) + 1] and by_id.stop_reason == tid
    assert_idle(llm)


def test_bad_requests_raise_and_leave_others_alone(llm):
    engine = llm.llm_engine
    good = engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request([5] * engine.max_model_len, SamplingParams())
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.add_request([1, 10**6], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        llm.generate(prompt_token_ids=[PROMPTS[1]], sampling_params=SamplingParams(temperature=-1))
    finished = [o for _ in range(10) for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == [good] and len(finished[0].outputs[0].token_ids) == 4
    assert_idle(llm)


def test_bad_model_and_dtype(tmp_path, tiny_llama_dir):
    with pytest.raises(ValueError, match="model"):
        LLM(model=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="dtype"):
        LLM(model=str(tiny_llama_dir), dtype="int8")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model=str(tiny_llama_dir), max_model_len=10**6)
    with pytest.raises(TypeError, match="not_an_arg"):
        LLM(model=str(tiny_llama_dir), not_an_arg=1)
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture"):
        LLM(model=str(tmp_path))


def test_vllm_only_kwargs_warn(tiny_llama_dir):
    with pytest.warns(UserWarning, match="gpu_memory_utilization"):
        LLM(model=str(tiny_llama_dir), dtype="float32", gpu_memory_utilization=0.9, enforce_eager=True)


def test_prompt_logprobs_match_transformers_across_chunks(tiny_llama_dir, llm):
    """vLLM's ``prompt_logprobs=k``: each prompt token's log-probability given the tokens before it, its rank and
    the k most likely tokens there; the same whether the prompt is prefilled whole or in small chunks."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    chunked = LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu", max_num_batched_tokens=5)
    prompts = PROMPTS[1:4]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=3)
    for llm_ in (llm, chunked):  # whole prefills, and chunks of 5 tokens
        outs = llm_.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        for prompt, out in zip(prompts, outs):
            with torch.no_grad():
                ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)  # [P, V]
            got = out.prompt_logprobs
            assert len(got) == len(prompt) and got[0] is None
            for p in range(1, len(prompt)):
                entry, row = got[p], ref[p - 1]
                tok = prompt[p]
                assert next(iter(entry)) == tok  # the prompt token first
                assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
                assert entry[tok].rank == int((row > row[tok]).sum()) + 1
                top = row.topk(3).indices.tolist()
                assert set(top) <= set(entry) and [entry[t].rank for t in top if t != tok] == \
                    [i + 1 for i, t in enumerate(top) if t != tok]
    plain = chunked.generate(prompt_token_ids=prompts[:1], use_tqdm=False,
                             sampling_params=SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert plain[0].prompt_logprobs is None
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
