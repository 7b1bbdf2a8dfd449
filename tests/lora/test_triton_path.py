"""The whole engine through the Triton kernels — paged attention over the block tables, BGMV for decodes (incl.
mixtures' K = 2 pairs), SGMV for every prefill segment of a step — run by Triton's interpreter on CPU tensors: the
same tokens and logprobs as the torch path, which the transformers / PEFT oracle tests pin down."""
from __future__ import annotations

import os

import pytest
import torch

from loraplex import LLM, LoRARequest, SamplingParams, ops
from tests.conftest import save_tiny_adapter

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no CUDA and TRITON_INTERPRET is not set")
ADAPTERS = {"r4_attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            "r16_all": dict(r=16, lora_alpha=32, target_modules="all-linear"),
            "pattern": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
                            rank_pattern={"o_proj": 2}, layers_to_transform=[1])}
PROMPTS = [[5, 17, 99, 3], list(range(30, 52)), [42, 7], list(range(100, 109)), [9] * 13]


def test_engine_through_triton_kernels_matches_torch_path(tiny_llama_dir, tmp_path, monkeypatch):
    for seed, (name, kw) in enumerate(ADAPTERS.items()):
        save_tiny_adapter(tiny_llama_dir, tmp_path / name, seed, **kw)
    req = {n: LoRARequest(n, i + 1, str(tmp_path / n)) for i, n in enumerate(ADAPTERS)}
    loras = [None, req["r4_attn"], req["r16_all"], [(req["pattern"], 0.6), (req["r4_attn"], 0.4)], req["pattern"]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)

    def run(triton_on: bool):
        monkeypatch.setattr(ops, "TRITON_ON_CPU", triton_on)
        llm = LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu", enable_lora=True, max_loras=3,
                  max_lora_rank=16, max_num_batched_tokens=24)  # chunked prefill: segments beside decodes
        return llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, lora_request=loras, use_tqdm=False)

    calls = {"bgmv": 0, "sgmv": 0, "attention": 0}
    from loraplex.ops import attention_triton, lora_triton

    kernels = ((lora_triton, "add_lora_bgmv_triton", "bgmv"), (lora_triton, "add_lora_segments_triton", "sgmv"),
               (attention_triton, "paged_attention_triton", "attention"))
    for mod, fn, key in kernels:
        orig = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _o=orig, _k=key, **kw: (calls.__setitem__(_k, calls[_k] + 1),
                                                                      _o(*a, **kw))[1])
    fast, ref = run(True), run(False)
    assert min(calls.values()) > 0, calls  # every kernel really ran
    for a, b in zip(fast, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for ea, eb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for tid, lp in eb.items():
                assert abs(ea[tid].logprob - lp.logprob) < 1e-4
