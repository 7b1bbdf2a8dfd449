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
