"""Mixed batches of base rows and adapters of different ranks / targets against PEFT running each adapter alone."""
from __future__ import annotations

import pytest
import torch

from loraplex import LLM, LoRARequest, SamplingParams
from tests.conftest import hf_greedy, save_tiny_adapter

ADAPTERS = {  # name: LoraConfig kwargs
    "r4_attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r8_mlp": dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "r16_all": dict(r=16, lora_alpha=32, target_modules="all-linear"),
    "r64_rslora": dict(r=64, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                       use_rslora=True),
    "pattern": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
                    rank_pattern={"o_proj": 2}, alpha_pattern={"v_proj": 32}, layers_to_transform=[1]),
}
PROMPTS = [[5, 17, 99, 3], list(range(30, 52)), [42, 7], list(range(100, 109)), [9] * 13, [200, 1, 2]]
N_NEW = 10


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, kw) in enumerate(ADAPTERS.items()):
        save_tiny_adapter(tiny_model_dir, root / name, seed, **kw)
    return {name: root / name for name in ADAPTERS}


def test_mixed_batch_matches_peft_per_adapter(tiny_model_dir, adapter_dirs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    llm = LLM(model=str(tiny_model_dir), dtype="float32", device="cpu", enable_lora=True, max_loras=3,
              max_lora_rank=64)
    names = [None, *ADAPTERS]  # six rows: the base and five adapters (more distinct adapters than slots)
    requests = [None if n is None else LoRARequest(n, i + 1, str(adapter_dirs[n])) for i, n in enumerate(names)]
    params = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, logprobs=3)
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, lora_request=requests, use_tqdm=False)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base_ids = hf_greedy(base, PROMPTS[0], N_NEW)[0]
    assert outs[0].outputs[0].token_ids == base_ids
    for name, prompt, out in zip(names[1:], PROMPTS[1:], outs[1:]):
        fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        peft = PeftModel.from_pretrained(fresh, adapter_dirs[name]).eval()
        ref_ids, ref_lp = hf_greedy(peft, prompt, N_NEW)
        assert out.outputs[0].token_ids == ref_ids, name
        assert ref_ids != hf_greedy(base, prompt, N_NEW)[0], f"{name} does not change the output"
        for step, entry in enumerate(out.outputs[0].logprobs):
            for tid, lp in entry.items():
                assert abs(lp.logprob - ref_lp[step, tid].item()) < 1e-3, name
    store = llm.llm_engine.lora_store
    assert store.num_evictions > 0 and not store.refcount  # 5 adapters through 3 slots, nothing left running


@pytest.mark.parametrize("dense_ratio", [4.0, float("inf")], ids=["dense", "bgmv"])
def test_many_rows_on_few_adapters_match_peft(tiny_model_dir, adapter_dirs, monkeypatch, dense_ratio):
    """Twelve decode rows over two adapters and the base, by the dense form (each adapter read once) or by BGMV
    (on CPU the C kernel where it builds), whichever the kernel choice says."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.engine import model_runner
    from loraplex.engine.kernel_choice import KernelChoice
    from loraplex.ops.lora_batch import Bgmv, Dense

    monkeypatch.setattr(model_runner, "kernel_choice", lambda *args: KernelChoice(dense_lora_ratio=dense_ratio))
    forms = []
    original = model_runner.ModelRunner.lora_batch

    def spy(self, rows, adapters):
        batch, to_score = original(self, rows, adapters)
        forms.append(type(batch.decodes) if batch is not None else None)
        return batch, to_score

    monkeypatch.setattr(model_runner.ModelRunner, "lora_batch", spy)
    llm = LLM(model=str(tiny_model_dir), dtype="float32", device="cpu", enable_lora=True, max_loras=2,
              max_lora_rank=64)
    names = ["r16_all", "r4_attn", None] * 4
    prompts = [[3 + i, 40 + 2 * i, 7] for i in range(len(names))]
    requests = [None if n is None else LoRARequest(n, 0, str(adapter_dirs[n])) for n in names]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, lora_request=requests, use_tqdm=False)
    models = {None: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()}
    for n in ("r16_all", "r4_attn"):
        fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        models[n] = PeftModel.from_pretrained(fresh, adapter_dirs[n]).eval()
    for name, prompt, out in zip(names, prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(models[name], prompt, 6)[0], name
    assert (Dense if dense_ratio == 4.0 else Bgmv) in forms


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_decode_step_with_adapters(tiny_model_dir, adapter_dirs, monkeypatch, dtype):
    """Decode steps of base and adapter rows (every rank, target set and rsLoRA above) through the one-call decode
    step: the op-by-op path's tokens and log-probabilities to the bit, and (fp32) PEFT's tokens."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.engine import model_runner
    from loraplex.engine.kernel_choice import KernelChoice
    from loraplex.models.transformer import DecoderLM
    from loraplex.ops import decode_step_cpu, dense_cpu

    if not decode_step_cpu.available(torch.zeros(1)):
        pytest.skip("no C compiler on this machine")
    monkeypatch.setattr(model_runner, "kernel_choice",
                        lambda *args: KernelChoice(c_gemv_tokens=dense_cpu.GEMV_MAX_ROWS,
                                                   dense_lora_ratio=float("inf")))
    with_lora = []
    step = DecoderLM._fused_step
    monkeypatch.setattr(DecoderLM, "_fused_step", lambda self, h, rope, kv, meta, lora:
                        with_lora.append(lora is not None) or step(self, h, rope, kv, meta, lora))
    names = [None, *ADAPTERS]
    params = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, logprobs=3)

    def run() -> list:
        llm = LLM(model=str(tiny_model_dir), dtype=dtype, device="cpu", enable_lora=True, max_loras=len(names),
                  max_lora_rank=64)
        requests = [None if n is None else LoRARequest(n, i + 1, str(adapter_dirs[n])) for i, n in enumerate(names)]
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, lora_request=requests, use_tqdm=False)
        return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in e.items()} for e in o.outputs[0].logprobs])
                for o in outs]

    fused = run()
    assert sum(with_lora) >= N_NEW - 1  # the decode steps of the adapter rows took the fused path
    monkeypatch.setattr(DecoderLM, "_fused_serves", lambda self, h, meta, lora: False)
    assert run() == fused
    if dtype == "float32":
        for name, prompt, (ids, _) in zip(names[1:], PROMPTS[1:], fused[1:]):
            fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
            assert ids == hf_greedy(PeftModel.from_pretrained(fresh, adapter_dirs[name]).eval(), prompt, N_NEW)[0]


def test_fused_decode_step_follows_slot_buffers_that_grow(tiny_model_dir, adapter_dirs, monkeypatch):
    """A rank-64 adapter loaded after a rank-4 one has decoded reallocates every stack's buffers: the fused step's
    table of their addresses is rebuilt (``LoRAStack.generation``), and both adapters still match PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.engine import model_runner
    from loraplex.engine.kernel_choice import KernelChoice
    from loraplex.layers.lora import LoRAStack
    from loraplex.ops import decode_step_cpu, dense_cpu

    if not decode_step_cpu.available(torch.zeros(1)):
        pytest.skip("no C compiler on this machine")
    monkeypatch.setattr(model_runner, "kernel_choice",
                        lambda *args: KernelChoice(c_gemv_tokens=dense_cpu.GEMV_MAX_ROWS,
                                                   dense_lora_ratio=float("inf")))
    llm = LLM(model=str(tiny_model_dir), dtype="float32", device="cpu", enable_lora=True, max_loras=2,
              max_lora_rank=64)
    params = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)
    generations = []
    for i, name in enumerate(("r4_attn", "r64_rslora")):
        generations.append(LoRAStack.generation)
        out = llm.generate(prompt_token_ids=PROMPTS[:2], sampling_params=params, use_tqdm=False,
                           lora_request=LoRARequest(name, i + 1, str(adapter_dirs[name])))
        fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        peft = PeftModel.from_pretrained(fresh, adapter_dirs[name]).eval()
        assert [o.outputs[0].token_ids for o in out] == [hf_greedy(peft, p, N_NEW)[0] for p in PROMPTS[:2]], name
    assert LoRAStack.generation > generations[1]  # the second adapter did grow the buffers
