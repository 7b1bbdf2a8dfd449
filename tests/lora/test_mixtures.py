"""Per-request adapter mixtures: Σ w_i · scale_i · B_i A_i x inside the batched ops, against PEFT's
``add_weighted_adapter(..., combination_type="cat")`` (the same formula), in a batch with single-adapter and base rows."""
from __future__ import annotations

import pytest
import torch

from loraplex import LLM, LoRARequest, SamplingParams
from tests.conftest import FAMILIES, hf_greedy, save_tiny_adapter

N_NEW = 10
PROMPTS = [[5, 17, 33, 9, 120, 64], [200, 3, 3, 71], [250, 1, 99, 42, 7, 7, 180], [11, 12, 13]]
MIXES = [[("a", 0.7), ("b", 0.3)], [("a", 0.5), ("b", -0.8), ("c", 1.2)]]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def family_dirs(request, tmp_path_factory):
    from tests.conftest import save_tiny_model

    assert request.param in FAMILIES
    root = tmp_path_factory.mktemp(f"mix-{request.param}")
    save_tiny_model(request.param, root / "base")
    kinds = {"a": dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
             "b": dict(r=8, lora_alpha=32, target_modules="all-linear"),
             "c": dict(r=16, lora_alpha=8, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"])}
    for seed, (name, kw) in enumerate(kinds.items()):
        save_tiny_adapter(root / "base", root / name, seed=40 + seed, **kw)
    return root


def peft_mix(root, mix):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    (first, _), *rest = mix
    model = PeftModel.from_pretrained(base, root / first, adapter_name=first)
    for name, _ in rest:
        model.load_adapter(root / name, adapter_name=name)
    model.add_weighted_adapter([n for n, _ in mix], [w for _, w in mix], "mix", combination_type="cat")
    model.set_adapter("mix")
    return model.eval()


@torch.no_grad()
def test_mixture_rows_match_peft_cat_in_a_mixed_batch(family_dirs):
    root = family_dirs
    reqs = {n: LoRARequest(n, i + 1, str(root / n)) for i, n in enumerate("abc")}
    llm = LLM(model=str(root / "base"), dtype="float32", enable_lora=True, max_loras=3, max_num_batched_tokens=5)
    loras = [[(reqs[n], w) for n, w in MIXES[0]], None, reqs["b"], [(reqs[n], w) for n, w in MIXES[1]]]
    params = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, logprobs=2)
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, lora_request=loras, use_tqdm=False)
    single_b = peft_mix(root, [("b", 1.0)])
    for prompt, out, mix in [(PROMPTS[0], outs[0], MIXES[0]), (PROMPTS[3], outs[3], MIXES[1])]:
        ref_ids, ref_lp = hf_greedy(peft_mix(root, mix), prompt, N_NEW)
        assert out.outputs[0].token_ids == ref_ids, mix
        assert ref_ids != hf_greedy(single_b, prompt, N_NEW)[0]  # the mixture is not just one of its adapters
        for step, entry in enumerate(out.outputs[0].logprobs):
            for tid, lp in entry.items():
                assert abs(lp.logprob - ref_lp[step, tid].item()) < 1e-3
    assert outs[2].outputs[0].token_ids == hf_greedy(single_b, PROMPTS[2], N_NEW)[0]


def test_mixture_validation(family_dirs):
    root = family_dirs
    llm = LLM(model=str(root / "base"), dtype="float32", enable_lora=True, max_loras=2)
    a, b, c = (LoRARequest(n, lora_path=str(root / n)) for n in "abc")
    with pytest.raises(ValueError, match="max_loras"):
        llm.generate("hi", lora_request=[(a, 0.5), (b, 0.5), (c, 0.5)], use_tqdm=False)
    with pytest.raises(ValueError, match="twice"):
        llm.generate("hi", lora_request=[(a, 0.5), (a, 0.5)], use_tqdm=False)
    with pytest.raises(TypeError, match="lora_request"):
        llm.generate(["hi"], lora_request=[[(a, "heavy")]], use_tqdm=False)
    # a lone pair of weight 1 is just that adapter
    one = llm.generate("hi", SamplingParams(temperature=0, max_tokens=4), lora_request=[(a, 1.0)], use_tqdm=False)
    plain = llm.generate("hi", SamplingParams(temperature=0, max_tokens=4), lora_request=a, use_tqdm=False)
    assert one[0].outputs[0].token_ids == plain[0].outputs[0].token_ids


@torch.no_grad()
def test_many_rows_of_one_mixture_take_the_dense_form(family_dirs, monkeypatch):
    """8 decode rows over the same 2 adapters: the weighted dense form (each adapter read once) serves them when
    the measured ratio says so (here forced: 4 tokens per adapter)."""
    from loraplex.engine import model_runner
    from loraplex.engine.kernel_choice import KernelChoice
    from loraplex.ops.lora_batch import DenseWeighted

    monkeypatch.setattr(model_runner, "kernel_choice", lambda *args: KernelChoice(dense_lora_ratio=4))
    root = family_dirs
    reqs = {n: LoRARequest(n, i + 1, str(root / n)) for i, n in enumerate("ab")}
    llm = LLM(model=str(root / "base"), dtype="float32", enable_lora=True, max_loras=2)
    mix = [(reqs[n], w) for n, w in MIXES[0]]
    prompts = [PROMPTS[i % 4] + [i + 1] for i in range(8)]
    seen = []
    original = model_runner.ModelRunner.lora_batch

    def spy(self, rows, adapters):
        batch, to_score = original(self, rows, adapters)
        seen.append(batch is not None and isinstance(batch.decodes, DenseWeighted))
        return batch, to_score

    monkeypatch.setattr(model_runner.ModelRunner, "lora_batch", spy)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=0, max_tokens=N_NEW,
                        ignore_eos=True), lora_request=mix, use_tqdm=False)
    assert any(seen)
    ref = peft_mix(root, MIXES[0])
    for prompt, out in list(zip(prompts, outs))[:3]:
        assert out.outputs[0].token_ids == hf_greedy(ref, prompt, N_NEW)[0]
