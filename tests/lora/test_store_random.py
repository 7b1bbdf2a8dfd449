"""Randomized: many adapters through small tiers (2 device slots, 2 host entries), requests arriving while others
run, adapters loaded and unloaded at run time. Every request must finish without error and give the tokens it gives
when it runs alone; the store's tiers must keep their invariants after every step."""
from __future__ import annotations

import random

import pytest

from loraplex import LLM, LoRARequest, SamplingParams
from tests.conftest import save_tiny_adapter

N_ADAPTERS = 10
MAX_LORAS = 2


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    targets = [["q_proj", "v_proj"], ["down_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]]
    out = {}
    for i in range(N_ADAPTERS):
        save_tiny_adapter(tiny_llama_dir, root / f"a{i}", 100 + i, r=2 + 2 * (i % 3), lora_alpha=8,
                          target_modules=targets[i % 3])
        out[f"a{i}"] = str(root / f"a{i}")
    return out


def _check_tiers(store) -> None:
    assert len(store.slots) <= store.max_loras and len(set(store.slots.values())) == len(store.slots)
    assert set(store.refcount) <= set(store.host), "a held adapter left the host tier"
    assert set(store.refcount) <= set(store.registry)
    evictable = [n for n in store.host if n not in store.slots and n not in store.refcount and n not in store.pinned]
    assert len(store.host) <= store.max_cpu_loras or not evictable, \
        f"host tier over its cap with evictable entries: host {list(store.host)} slots {dict(store.slots)} " \
        f"held {dict(store.refcount)} pending {list(store._pending)}"


def test_random_load_use_unload_through_small_tiers(tiny_llama_dir, adapters):
    rng = random.Random(0)
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", enable_lora=True, max_loras=MAX_LORAS,
              max_cpu_loras=MAX_LORAS, max_num_seqs=6, max_num_batched_tokens=24)
    engine, store = llm.llm_engine, llm.llm_engine.lora_store
    ids = {name: i + 1 for i, name in enumerate(adapters)}
    loaded: set[str] = set()
    asked: dict[str, tuple[list[int], str | None]] = {}
    done: dict[str, list[int]] = {}
    for step in range(160):
        action = rng.random()
        name = rng.choice(list(adapters))
        if action < 0.12:  # load at run time (vLLM's /v1/load_lora_adapter)
            engine.add_lora(LoRARequest(name, ids[name], adapters[name]))
            loaded.add(name)
        elif action < 0.2 and loaded:  # unload: refused while requests (running or queued) use it
            victim = rng.choice(sorted(loaded))
            users = [r for r, (_, a) in asked.items() if a == victim and r not in done]
            if users:
                with pytest.raises(RuntimeError, match="in flight"):
                    engine.remove_lora(victim)
            else:
                engine.remove_lora(victim)
                loaded.discard(victim)
        elif action < 0.65 and len(asked) - len(done) < 12:  # a request: an adapter (registered on use) or the base
            adapter = None if rng.random() < 0.15 else name
            prompt = [rng.randrange(1, 200) for _ in range(rng.randrange(3, 14))]
            params = SamplingParams(temperature=0, max_tokens=rng.randrange(2, 7), ignore_eos=True)
            lora = LoRARequest(adapter, ids[adapter], adapters[adapter]) if adapter else None
            rid = engine.add_request(prompt, params, lora_request=lora)
            asked[rid] = (prompt, adapter)
            if adapter:
                loaded.add(adapter)
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        _check_tiers(store)
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        _check_tiers(store)
    assert done.keys() == asked.keys() and len(asked) > 40
    assert store.num_evictions > 0  # the tiers really were too small for the adapters in use
    assert not store.refcount
    # the oracle: the same requests in one unhurried batch, every adapter resident (no tier pressure)
    calm = LLM(model=str(tiny_llama_dir), dtype="float32", enable_lora=True, max_loras=N_ADAPTERS)
    rids = list(asked)
    outs = calm.generate(prompt_token_ids=[asked[r][0] for r in rids], use_tqdm=False,
                         lora_request=[LoRARequest(a, ids[a], adapters[a]) if a else None for _, a in asked.values()],
                         sampling_params=[SamplingParams(temperature=0, max_tokens=len(done[r]), ignore_eos=True)
                                          for r in rids])
    assert [done[r] for r in rids] == [o.outputs[0].token_ids for o in outs]
