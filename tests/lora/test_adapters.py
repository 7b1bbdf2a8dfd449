"""Adapter validation (each refusal names the adapter and the reason) and the adapter store's tiers."""
from __future__ import annotations

import json

import pytest
import torch

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.lora.peft_format import load_peft_lora
from loraplex.lora.store import AdapterStore
from loraplex.models.model_config import ModelSpec
from tests.conftest import save_tiny_adapter, tiny_config


@pytest.fixture(scope="module")
def spec():
    return ModelSpec.from_hf_config(tiny_config("llama"))


@pytest.fixture(scope="module")
def good_adapter(tiny_llama_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    save_tiny_adapter(tiny_llama_dir, path, 0, r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"])
    return path


def _edit_config(src, dst, **changes):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, reason", [
    (dict(use_dora=True), "DoRA"), (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="all"), "biases"), (dict(peft_type="IA3"), "not LoRA"),
])
def test_refused_configs_name_adapter_and_reason(good_adapter, tmp_path, spec, changes, reason):
    path = _edit_config(good_adapter, tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=rf"adapter 'bad'.*{reason}"):
        load_peft_lora("bad", path, spec.module_shapes, max_lora_rank=64)


def test_refused_weights(good_adapter, tmp_path, spec):
    pickled = _edit_config(good_adapter, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_peft_lora("pickled", pickled, spec.module_shapes, 64)
    with pytest.raises(ValueError, match="rank 8 > max_lora_rank 4"):
        load_peft_lora("big", good_adapter, spec.module_shapes, 4)
    other = ModelSpec.from_hf_config(tiny_config("qwen3"))  # head_dim 32: q_proj is 64 -> 128
    with pytest.raises(ValueError, match="do not fit the base"):
        load_peft_lora("mismatch", good_adapter, other.module_shapes, 64)
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_peft_lora("empty", tmp_path, spec.module_shapes, 64)


def test_embedding_targets_refused(tiny_llama_dir, tmp_path, spec):
    save_tiny_adapter(tiny_llama_dir, tmp_path, 1, r=4, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ValueError, match="embedding"):
        load_peft_lora("emb", tmp_path, spec.module_shapes, 64)


def test_scale_folded_into_b(good_adapter, spec):
    w = load_peft_lora("good", good_adapter, spec.module_shapes, 64)
    from safetensors.torch import load_file
    raw = load_file(str(good_adapter / "adapter_model.safetensors"))
    b = next(v for k, v in raw.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    torch.testing.assert_close(w.weights[0, "q_proj"][1], b * (16 / 8))
    assert w.rank == 8 and set(m for _, m in w.weights) == {"q_proj", "down_proj"}


def test_store_lru_refcount_and_slots(good_adapter, spec):
    writes = []
    store = AdapterStore(spec.module_shapes, max_loras=2, max_lora_rank=64, max_cpu_loras=2, dtype=torch.float32,
                         write_slot=lambda slot, w: writes.append((slot, w.name)))
    for n in "abc":
        store.register(LoRARequest(n, 0, str(good_adapter)))
    assert len(store.registry) == 3 and not store.host  # the registry holds metadata only
    assert store.activate({"a"}) == {"a": 0} and store.activate({"b"}) == {"b": 1}
    store.hold({"b"})  # b is used by a running request
    store.activate({"a"})  # touch a: b is now least recently used, but pinned by its refcount
    assert store.activate({"c"}) == {"c": 0} and "a" not in store.slots  # a evicted, b kept
    assert writes == [(0, "a"), (1, "b"), (0, "c")] and store.num_evictions == 1
    assert list(store.host) == ["b", "c"]  # host LRU (max_cpu_loras 2) dropped a, which left the slots
    with pytest.raises(RuntimeError, match="in flight"):
        store.unload("b")
    store.release({"b"})
    store.unload("b")
    assert "b" not in store.registry and "b" not in store.slots
    with pytest.raises(ValueError, match="already loaded from"):
        store.register(LoRARequest("c", 0, "/elsewhere"))


def test_store_pinning(good_adapter, spec):
    writes = []
    store = AdapterStore(spec.module_shapes, max_loras=3, max_lora_rank=64, max_cpu_loras=3, dtype=torch.float32,
                         write_slot=lambda slot, w: writes.append((slot, w.name)))
    for n in "abcde":
        store.register(LoRARequest(n, 0, str(good_adapter)))
    store.pin("a")
    assert store.slots == {"a": 0} and store.describe()[0]["pinned"]
    store.pin("b")
    with pytest.raises(ValueError, match="max_loras"):  # a third pin would leave no slot for other adapters
        store.pin("c")
    for n in "cde":  # c, d, e take turns in the one unpinned slot; a and b are never evicted
        store.activate({n})
        assert set(store.slots) == {"a", "b", n}
    store.unpin("b")
    store.activate({"c"})
    assert set(store.slots) == {"a", "c", "e"}  # unpinned, b was the least recently used
    store.unload("a")
    assert "a" not in store.pinned and "a" not in store.slots
    with pytest.raises(KeyError):
        store.pin("a")


def test_prefetch_reads_queued_adapters_into_free_slots(tiny_llama_dir, good_adapter):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", enable_lora=True, max_loras=2, max_cpu_loras=4)
    engine, store = llm.llm_engine, llm.llm_engine.lora_store
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for n in "abcd":
        engine.add_request([1, 2, 3], params, lora_request=LoRARequest(n, 0, str(good_adapter)))
    engine.step()  # a and b run; c and d wait, and their weights are read in the background
    store._io.shutdown(wait=True)
    store._io = None
    engine.step()
    assert {r["name"]: r["tier"] for r in engine.list_loras()} == {"a": "device", "b": "device",
                                                                  "c": "host", "d": "host"}
    while engine.has_unfinished_requests():
        engine.step()
    engine.pin_lora("c")
    assert store.slots["c"] in (0, 1) and engine.list_loras()[2]["pinned"]


def test_bad_lora_request_fails_alone(tiny_llama_dir, good_adapter, tmp_path):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", enable_lora=True, max_loras=2)
    engine = llm.llm_engine
    ok = engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True),
                            lora_request=LoRARequest("good", 1, str(good_adapter)))
    with pytest.raises(ValueError, match="adapter 'missing'"):
        engine.add_request([5, 6, 7], SamplingParams(), lora_request=LoRARequest("missing", 2, str(tmp_path)))
    done = [o for _ in range(10) for o in engine.step() if o.finished]
    assert [o.request_id for o in done] == [ok] and len(done[0].outputs[0].token_ids) == 3
    base_only = LLM(model=str(tiny_llama_dir), dtype="float32")
    with pytest.raises(ValueError, match="enable_lora"):
        base_only.generate(prompt_token_ids=[[1, 2]], lora_request=LoRARequest("good", 1, str(good_adapter)))


def test_lora_request_vllm_forms():
    r = LoRARequest("self_adapter_v1", 1, lora_local_path="out_v1/")
    assert (r.lora_name, r.lora_int_id, r.lora_path) == ("self_adapter_v1", 1, "out_v1/")
    assert LoRARequest("x", lora_path="p").lora_int_id > 0


def test_engine_load_list_unload_at_run_time(tiny_llama_dir, good_adapter):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", enable_lora=True, max_loras=2)
    engine = llm.llm_engine
    assert engine.add_lora(LoRARequest("g", 7, str(good_adapter)))
    [row] = engine.list_loras()
    assert (row["name"], row["lora_int_id"], row["rank"], row["in_flight"], row["pinned"]) == ("g", 7, 8, 0, False)
    # add_lora starts reading it in the background; once read, the next prefetch (every step) copies it into a
    # free device slot without any request asking for it
    pending = engine.lora_store._pending.get("g")
    if pending is not None:
        pending.result()
    engine.lora_store.prefetch(["g"])
    assert engine.list_loras()[0]["tier"] == "device" and engine.lora_store.loads["g"] == 1
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True),
                             lora_request=LoRARequest("g", 7, str(good_adapter)))
    engine.step()
    assert engine.list_loras()[0]["tier"] == "device" and engine.list_loras()[0]["in_flight"] == 1
    with pytest.raises(RuntimeError, match="in flight"):
        engine.remove_lora("g")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.remove_lora("g") and engine.list_loras() == []
    with pytest.raises(KeyError):
        engine.remove_lora("g")
    assert engine.outputs.parents == {} and rid not in engine.scheduler.requests


def test_unreadable_adapter_fails_only_its_requests(tiny_llama_dir, good_adapter, tmp_path):
    import shutil

    broken = tmp_path / "soon-gone"
    shutil.copytree(good_adapter, broken)
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", enable_lora=True, max_loras=2)
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    base = engine.add_request([1, 2, 3], params)
    other = engine.add_request([4, 5, 6], params, lora_request=LoRARequest("good", 1, str(good_adapter)))
    bad = engine.add_request([7, 8, 9], SamplingParams(max_tokens=4, ignore_eos=True, n=2),
                             lora_request=LoRARequest("gone", 2, str(broken)))  # registered: header was fine
    engine.lora_store._pending.clear()
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")  # damaged after registration
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert "could not be read" in done[bad].error and done[bad].outputs[0].finish_reason == "abort"
    assert all(done[r].error is None and len(done[r].outputs[0].token_ids) == 4 for r in (base, other))
    sched = engine.scheduler
    assert not sched.requests and sched.kv.num_free_blocks == sched.kv.pool.num_blocks
