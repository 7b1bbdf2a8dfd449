"""--deterministic: a request's greedy tokens and their log-probabilities are bit-identical whether it runs alone or
inside busy mixed batches (other prompts, adapters, a mixture, chunked prefills, prefix-cache hits, preemption), in
bf16 and fp32, on every tiny family — and the batch-invariant ops equal their plain forms up to rounding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.ops import row_tiled
from loraplex.ops.batch_invariant import add_lora_grouped
from loraplex.ops.lora_batch import TokenGroup
from loraplex.ops.lora_torch import add_lora_reference
from tests.conftest import FAMILIES, hf_greedy, save_tiny_adapter, save_tiny_model

PARAMS = SamplingParams(temperature=0, max_tokens=16, logprobs=1, ignore_eos=True)


@pytest.fixture(scope="module", params=FAMILIES)
def family_dirs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"det-{request.param}")
    save_tiny_model(request.param, root / "base")
    save_tiny_adapter(root / "base", root / "a", 1, r=4, target_modules="all-linear")
    save_tiny_adapter(root / "base", root / "b", 2, r=8, target_modules=["q_proj", "v_proj"])
    return root


def _run(llm: LLM, reqs) -> list[tuple[list[int], list[float]]]:
    outs = llm.generate([p for p, _ in reqs], PARAMS, lora_request=[lr for _, lr in reqs], use_tqdm=False)
    res = []
    for o in outs:
        c = o.outputs[0]
        res.append((list(c.token_ids), [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]))
    return res


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_same_bits_alone_and_in_busy_mixed_batches(family_dirs, dtype):
    base = str(family_dirs / "base")
    a = LoRARequest("a", 1, str(family_dirs / "a"))
    b = LoRARequest("b", 2, str(family_dirs / "b"))
    shared = "a shared system prompt that several requests start with. "
    targets = [(shared + "hello there", None), ("the quick brown fox", a), (shared + "once upon a time", b),
               ("a mixture answers", [(a, 0.6), (b, 0.4)]), ("z", a)]
    alone_llm = LLM(base, dtype=dtype, enable_lora=True, max_loras=4, deterministic=True, max_model_len=128)
    alone = [_run(alone_llm, [t])[0] for t in targets]
    # the same requests among others: a token budget of 24 splits prefills into chunks beside decodes; the shared
    # prefix hits the prefix cache; a small KV cache forces preemption and recomputation
    kv_bytes = alone_llm.llm_engine.memory()["kv_cache"] // alone_llm.llm_engine.config.cache.num_blocks
    busy = LLM(base, dtype=dtype, enable_lora=True, max_loras=4, deterministic=True, max_num_batched_tokens=24,
               max_model_len=128, kv_cache_memory=14 * kv_bytes)
    noise = [(shared * (i % 2) + "noise " * (1 + i % 5) + str(i), [None, a, b, [(b, 0.5), (a, 0.5)]][i % 4])
             for i in range(10)]
    mixed = _run(busy, noise[:5] + targets + noise[5:])[5:5 + len(targets)]
    assert busy.llm_engine.scheduler.num_preemptions > 0
    for (prompt, _), (ids, lps), (ids_m, lps_m) in zip(targets, alone, mixed):
        assert ids == ids_m, prompt
        assert lps == lps_m, prompt  # bit-identical, not just close
    if dtype == "float32":  # still the model: the base row is transformers' greedy
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        prompt_ids = alone_llm.get_tokenizer().encode(targets[0][0])
        assert alone[0][0] == hf_greedy(hf, prompt_ids, PARAMS.max_tokens)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(576, 1536), (64, 96), (960, 16)])
def test_row_tiled_linear_is_batch_invariant_and_equals_the_plain_form(dtype, shape):
    torch.manual_seed(0)
    n_in, n_out = shape
    w = torch.randn(n_out, n_in, dtype=dtype)
    x = torch.randn(40, n_in, dtype=dtype)
    lin = lambda t: F.linear(t, w)  # noqa: E731
    alone = row_tiled(lin, x[:1], 8)[0]
    for m in (2, 3, 8, 9, 17, 40):  # the row first, last, and inside tiles of batches of any size
        for pos in (0, m - 1):
            xs = torch.cat([x[1:pos + 1], x[:1], x[pos + 1:m]])
            assert torch.equal(row_tiled(lin, xs, 8)[pos], alone), (m, pos)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(row_tiled(lin, x, 8), lin(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_lora_equals_the_reference_and_is_batch_invariant(dtype):
    torch.manual_seed(1)
    t, n_in, r, outs = 13, 48, 8, (32, 16)
    lora_a = torch.randn(4, 2 * r, n_in, dtype=dtype)
    lora_bs = [torch.randn(4, n, r, dtype=dtype) for n in outs]
    out_slices = [(0, 32), (32, 16)]
    x = torch.randn(t, n_in, dtype=dtype)
    # tokens 0-4 on slot 1, 5-9 a mixture 0.7·slot 2 + 0.3·slot 1, 10-12 on slot 3
    groups = (TokenGroup(torch.tensor([0, 1, 2, 3, 4]), 1), TokenGroup(torch.tensor([5, 6, 7, 8, 9]), 2,
                                                                        torch.full((5,), 0.7)),
              TokenGroup(torch.tensor([10, 11, 12]), 3), TokenGroup(torch.tensor([5, 6, 7, 8, 9]), 1,
                                                                    torch.full((5,), 0.3)))
    y = torch.zeros(t, 48, dtype=dtype)
    add_lora_grouped(y, x, lora_a, lora_bs, out_slices, groups, 8)
    # the reference on the stacked slices, one slice at a time
    slots = torch.tensor([[1, 0]] * 5 + [[2, 1]] * 5 + [[3, 0]] * 3)
    weights = torch.tensor([[1.0, 0.0]] * 5 + [[0.7, 0.3]] * 5 + [[1.0, 0.0]] * 3)
    ref = torch.zeros(t, 48, dtype=torch.float32)
    for i, (start, size) in enumerate(out_slices):
        add_lora_reference(ref[:, start:start + size], x.float(), lora_a[:, i * r:(i + 1) * r].float(),
                           lora_bs[i].float(), slots, weights)
    tol = 1e-4 if dtype == torch.float32 else 0.15
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
    # token 10 alone gets the same bits as inside the group of three
    y1 = torch.zeros(1, 48, dtype=dtype)
    add_lora_grouped(y1, x[10:11], lora_a, lora_bs, out_slices, (TokenGroup(torch.tensor([0]), 3),), 8)
    assert torch.equal(y1[0], y[10])


def test_deterministic_is_refused_with_the_triton_kernels(tiny_llama_dir, monkeypatch):
    from loraplex import ops

    monkeypatch.setattr(ops, "use_triton", lambda device: True)
    with pytest.raises(ValueError, match="deterministic"):
        LLM(str(tiny_llama_dir), dtype="float32", deterministic=True)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_bases_are_batch_invariant_too(tiny_llama_dir, quantization):
    """The quantized linears pick their kernel by row count; on fixed row tiles they always get the same one."""
    llm = LLM(str(tiny_llama_dir), dtype="bfloat16", quantization=quantization, deterministic=True, max_model_len=128,
              max_num_batched_tokens=16)
    prompts = ["alone or not", "a second, longer prompt to share the steps with", "3", "four four four"]
    alone = _run(llm, [(prompts[0], None)])[0]
    assert _run(llm, [(p, None) for p in prompts[1:3]] + [(prompts[0], None), (prompts[3], None)])[2] == alone
