"""Every supported family against transformers on the same random weights: greedy ids identical, logprobs close."""
from __future__ import annotations

import pytest
import torch

from loraplex import LLM, SamplingParams
from tests.conftest import assert_fused_step_is_op_by_op, hf_greedy

PROMPTS = [[5, 17, 99, 3], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
           [42], list(range(30, 70)), [7, 7, 7, 7, 7, 7, 7]]
N_NEW = 12


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _check_against_hf(llm: LLM, hf_model, prompts=PROMPTS, n_new=N_NEW):
    params = SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True, logprobs=5)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ref_ids, ref_lp = hf_greedy(hf_model, prompt, n_new)
        got = out.outputs[0]
        assert got.token_ids == ref_ids, f"prompt {prompt[:5]}...: {got.token_ids} != {ref_ids}"
        assert got.finish_reason == "length"
        for step, entry in enumerate(got.logprobs):
            for tid, lp in entry.items():
                torch.testing.assert_close(lp.logprob, ref_lp[step, tid].item(), atol=2e-4, rtol=1e-4)


def test_batched_greedy_matches_transformers(tiny_model_dir, hf_model):
    llm = LLM(model=str(tiny_model_dir), dtype="float32", device="cpu")
    _check_against_hf(llm, hf_model)


def test_chunked_prefill_and_small_blocks_match(tiny_model_dir, hf_model):
    # 5-token budget per step forces prompts through several chunks; block_size 4 spreads them over many blocks.
    llm = LLM(model=str(tiny_model_dir), dtype="float32", device="cpu", max_num_batched_tokens=5, block_size=4)
    _check_against_hf(llm, hf_model)


def test_sharded_checkpoint_loads_the_same(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((tiny_llama_dir / f).read_bytes())
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    _check_against_hf(LLM(model=str(tmp_path), dtype="float32", device="cpu"), hf, PROMPTS[:2], 6)


@pytest.mark.parametrize("kernels", ["C", "torch"])
def test_c_kernels_and_their_torch_forms_both_match(tiny_model_dir, hf_model, kernels, monkeypatch):
    """Every small step through the C kernels (GEMV forced for every step it takes, norm, RoPE, decode attention),
    then none of them (their torch forms, what runs where no compiler is found)."""
    from loraplex.engine import model_runner
    from loraplex.engine.kernel_choice import KernelChoice
    from loraplex.ops import attention_cpu, dense_cpu

    if kernels == "C":
        if not dense_cpu.available(torch.zeros(1)):
            pytest.skip("no C compiler on this machine")
        monkeypatch.setattr(model_runner, "kernel_choice",
                            lambda *args: KernelChoice(c_gemv_tokens=dense_cpu.GEMV_MAX_ROWS))
    else:
        monkeypatch.setattr(dense_cpu, "available", lambda x: False)
        monkeypatch.setattr(attention_cpu, "available", lambda x: False)
    _check_against_hf(LLM(model=str(tiny_model_dir), dtype="float32", device="cpu"), hf_model)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch", ["few", "wide"])
def test_fused_decode_step_is_the_op_by_op_path_bit_for_bit(tiny_model_dir, dtype, batch, monkeypatch):
    """The one-call decode step (``ops.decode_step_cpu``) runs the op-by-op path's kernels in its order: the same
    tokens and the same log-probabilities, to the bit, on every family (biases, q/k norms) and both dtypes; "wide":
    steps of 19 decodes (the GEMV's register-tiled form, a partial tile of tokens)."""
    prompts = PROMPTS if batch == "few" else [p[i:] + [i] for i in range(4) for p in PROMPTS[:4]] + PROMPTS[1:4]
    assert_fused_step_is_op_by_op(monkeypatch, lambda: LLM(model=str(tiny_model_dir), dtype=dtype, device="cpu"),
                                  prompts, N_NEW)
