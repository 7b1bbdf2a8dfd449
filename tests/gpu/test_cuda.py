"""The same decoder on CUDA, against transformers on CUDA (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from loraplex import LLM, SamplingParams
from tests.conftest import hf_greedy

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_model_on_cuda_matches_transformers(tiny_model_dir, dtype):
    from transformers import AutoModelForCausalLM

    llm = LLM(model=str(tiny_model_dir), dtype=dtype, device="cuda")
    prompts = [[5, 17, 99, 3], list(range(30, 70)), [42]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    hf_cpu = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs):
        ref_ids, ref_lp = hf_greedy(hf_cpu, prompt, 8)
        tol = 2e-3 if dtype == "float32" else 0.15
        for step, entry in enumerate(out.outputs[0].logprobs):
            for tid, lp in entry.items():
                assert abs(lp.logprob - ref_lp[step, tid].item()) < tol
        if dtype == "float32":
            assert out.outputs[0].token_ids == ref_ids


def run_adapter_batch(root, device: str):
    """Base, single-adapter, mixture and X-LoRA rows in one batch (5-token prefill chunks), fp32 on ``device``."""
    from loraplex import LoRARequest

    b, c = LoRARequest("b", 2, str(root / "b")), LoRARequest("c", 3, str(root / "c"))
    xl = LoRARequest("xl", 1, str(root / "xl"))
    llm = LLM(model=str(root / "base"), dtype="float32", device=device, enable_lora=True, max_loras=6,
              max_num_batched_tokens=5)
    prompts = [[5, 17, 33, 9, 120, 64], [200, 3, 3, 71], [250, 1, 99, 42, 7, 7, 180], [11, 12, 13, 14, 15, 16]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    return llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False,
                        lora_request=[xl, None, b, [(b, 0.6), (c, 0.4)]])


@pytest.fixture(scope="module")
def adapters_root(tmp_path_factory):
    from tests.conftest import save_tiny_adapter, save_tiny_model, save_xlora

    root = tmp_path_factory.mktemp("cuda-lora")
    save_tiny_model("llama", root / "base")
    for seed, (name, kw) in enumerate({"a": {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
                                       "b": {"r": 8, "lora_alpha": 32, "target_modules": "all-linear"},
                                       "c": {"r": 16, "target_modules": ["k_proj", "o_proj", "up_proj"]}}.items()):
        save_tiny_adapter(root / "base", root / name, seed=40 + seed, **kw)
    save_xlora(root / "base", [root / n for n in "abc"], root / "xl", hidden_size=64, xlora_depth=2, xlora_size=32,
               layerwise_scalings=True)
    return root


def test_lora_mixture_and_xlora_rows_on_cuda_match_cpu(adapters_root):
    """The CPU path is checked against PEFT (tests/lora); the CUDA path must give the same tokens."""
    for cuda, cpu in zip(run_adapter_batch(adapters_root, "cuda"), run_adapter_batch(adapters_root, "cpu")):
        assert cuda.outputs[0].token_ids == cpu.outputs[0].token_ids
        for got, want in zip(cuda.outputs[0].logprobs, cpu.outputs[0].logprobs):
            for tid, lp in want.items():
                assert abs(got[tid].logprob - lp.logprob) < 2e-3
