"""Automatic prefix caching, keyed by adapter: block accounting (pure) and the engine's tokens with it on vs off."""
from __future__ import annotations

import random
import shutil

import pytest

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.kv_cache import BlockManager
from tests.conftest import save_tiny_adapter

BS = 4


def _all_free(bm: BlockManager) -> bool:
    return bm.num_free_blocks == bm.pool.num_blocks and not any(bm.pool.refs) and not bm.block_tables


def test_blocks_are_shared_by_content_and_key():
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    toks = list(range(1, 14))  # 13 tokens: 3 full blocks
    assert bm.match_prefix("a", toks, "base") == 0
    assert bm.allocate("a", 13)
    bm.commit("a", 13, "base", lambda: toks)
    assert bm.pool.num_cached == 3
    assert bm.match_prefix("b", toks, "base") == 12 and bm.block_tables["b"] == bm.block_tables["a"][:3]
    assert bm.match_prefix("c", toks, ("lora", "other")) == 0  # another adapter: nothing shared
    assert bm.match_prefix("d", toks[:12], "base") == 8  # the last token is never covered
    assert bm.match_prefix("e", toks[:5] + [99] * 8, "base") == 4  # the chain stops at the first differing block
    for rid in "abde":
        bm.free(rid)
    assert _all_free(bm) and bm.pool.num_cached == 3  # freed blocks stay cached ...
    assert bm.allocate("f", 4 * 16)  # ... until the pool needs every block: then they are reused
    assert bm.pool.num_cached == 0 and bm.match_prefix("g", toks, "base") == 0
    bm.free("f")
    assert _all_free(bm)


def test_free_cached_blocks_are_evicted_least_recently_freed_first():
    bm = BlockManager(6, BS, enable_prefix_caching=True)
    seqs = {k: [k * 10 + i for i in range(9)] for k in (1, 2)}  # 2 full blocks each
    for k, toks in seqs.items():
        bm.allocate(f"s{k}", 9)
        bm.commit(f"s{k}", 9, "base", lambda t=toks: t)
    bm.free("s1")
    bm.free("s2")
    assert bm.allocate("new", 4 * 2)  # takes the 2 never-cached blocks first (s1/s2's third, partial blocks)
    assert bm.pool.num_cached == 4
    assert bm.allocate("new2", 4 * 2)  # then the least recently freed cached blocks: s1's
    assert bm.match_prefix("x", seqs[1], "base") == 0 and bm.match_prefix("y", seqs[2], "base") == 8


def test_a_referenced_block_is_never_handed_out():
    rng = random.Random(0)
    bm = BlockManager(24, BS, enable_prefix_caching=True)
    live: dict[str, list[int]] = {}
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    for step in range(400):
        if live and rng.random() < 0.4:
            rid = rng.choice(sorted(live))
            bm.free(rid)
            del live[rid]
            continue
        rid = f"r{step}"
        toks = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 9))]
        n = bm.match_prefix(rid, toks, rng.choice(["base", ("lora", "x")]))
        if not bm.allocate(rid, len(toks)):
            bm.free(rid)
            continue
        bm.commit(rid, len(toks), "base", lambda t=toks: t)
        live[rid] = toks
        assert n % BS == 0 and n < len(toks)
        held = [b for t in bm.block_tables.values() for b in t]
        assert all(bm.pool.refs[b] > 0 for b in held) and not set(held) & set(bm.pool._free)
        assert sum(bm.pool.refs) == len(held)
    for rid in list(live):
        bm.free(rid)
    assert _all_free(bm)


@pytest.fixture(scope="module")
def two_adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pc")
    save_tiny_adapter(tiny_llama_dir, root / "p", 31, r=4, target_modules=["q_proj", "k_proj", "v_proj"])
    save_tiny_adapter(tiny_llama_dir, root / "q", 32, r=8, target_modules="all-linear")
    return root


def _run(llm, prompts, loras, max_tokens=6, n=1):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, n=n)
    return llm.generate(prompt_token_ids=prompts, sampling_params=params, lora_request=loras, use_tqdm=False)


def test_same_tokens_with_and_without_caching(tiny_llama_dir, two_adapters):
    system = list(range(30, 30 + 23))  # a shared "system prompt" of 5+ blocks
    prompts = [system + [100 + i, 101 + i] for i in range(8)]
    p, q = (LoRARequest(n, i + 1, str(two_adapters / n)) for i, n in enumerate("pq"))
    loras = [None, p, q, [(p, 0.6), (q, 0.4)]] * 2
    kw = dict(model=str(tiny_llama_dir), dtype="float32", enable_lora=True, max_loras=4, block_size=BS,
              max_num_batched_tokens=16)  # chunked prefills
    off = LLM(enable_prefix_caching=False, **kw)
    on = LLM(**kw)
    want = [o.outputs[0].token_ids for o in _run(off, prompts, loras)]
    first = _run(on, prompts[:4], loras[:4])  # warms the cache: one prompt per key
    assert [o.outputs[0].token_ids for o in first] == want[:4] and all(o.num_cached_tokens == 0 for o in first)
    second = _run(on, prompts[4:], loras[4:])
    assert [o.outputs[0].token_ids for o in second] == want[4:]
    assert all(o.num_cached_tokens == 20 for o in second)  # 5 full blocks of the system prompt, per key
    both = _run(on, prompts, loras, n=2)  # n > 1 siblings, everything cached by now
    assert [[c.token_ids for c in o.outputs] for o in both] == [[w, w] for w in want]
    bm = on.llm_engine.scheduler.kv
    assert bm.num_free_blocks == bm.pool.num_blocks and not any(bm.pool.refs)
    assert bm.pool.num_cached >= 4 * 5  # one chain per key: base, p, q, the mixture never share
    assert on.reset_prefix_cache() and bm.pool.num_cached == 0
    assert _run(on, prompts[:1], loras[:1])[0].num_cached_tokens == 0


def test_reloaded_adapter_with_other_weights_does_not_hit(tiny_llama_dir, two_adapters, tmp_path):
    prompt = list(range(40, 40 + 21))
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", enable_lora=True, max_loras=2, block_size=BS)
    a = LoRARequest("x", 1, str(two_adapters / "p"))
    _run(llm, [prompt], [a])
    llm.llm_engine.remove_lora("x")
    other = tmp_path / "other"
    shutil.copytree(two_adapters / "q", other)
    out = _run(llm, [prompt], [LoRARequest("x", 1, str(other))])[0]  # same name, other path and weights
    assert out.num_cached_tokens == 0
    ref = LLM(model=str(tiny_llama_dir), dtype="float32", enable_lora=True, max_loras=2,
              enable_prefix_caching=False)
    assert out.outputs[0].token_ids == _run(ref, [prompt], [LoRARequest("x", 1, str(other))])[0].outputs[0].token_ids
    same = tmp_path / "same"  # the first weights again, under another path: the same content may hit
    shutil.copytree(two_adapters / "p", same)
    llm.llm_engine.remove_lora("x")
    assert _run(llm, [prompt], [LoRARequest("x", 1, str(same))])[0].num_cached_tokens == 20


def test_preemption_abort_and_prompt_logprobs_with_caching(tiny_llama_dir):
    block_bytes = 2 * 2 * BS * 2 * 16 * 4
    small = LLM(model=str(tiny_llama_dir), dtype="float32", block_size=BS, max_model_len=64,
                kv_cache_memory=20 * block_bytes)
    plain = LLM(model=str(tiny_llama_dir), dtype="float32", enable_prefix_caching=False)
    shared = list(range(60, 72))
    prompts = [shared + list(range(200 + 3 * i, 203 + 3 * i)) for i in range(6)]
    want = [o.outputs[0].token_ids for o in _run(plain, prompts, None, max_tokens=16)]
    got = _run(small, prompts, None, max_tokens=16)
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == want
    engine = small.llm_engine
    rid = engine.add_request(prompts[0], SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    engine.abort_request(rid)
    bm = engine.scheduler.kv
    assert bm.num_free_blocks == bm.pool.num_blocks and not any(bm.pool.refs)
    scored = small.generate(prompt_token_ids=[prompts[1]], use_tqdm=False, sampling_params=SamplingParams(
        temperature=0, max_tokens=2, prompt_logprobs=1))[0]
    assert scored.num_cached_tokens is None and all(e is not None for e in scored.prompt_logprobs[1:])
