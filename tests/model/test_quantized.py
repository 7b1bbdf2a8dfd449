"""int8 weight-only base projections: each kernel path against the fp32 reference; the engine against
transformers (and PEFT) on the same dequantized weights — the same quantization simulated in fp32."""
from __future__ import annotations

import pytest
import torch

import loraplex.engine.engine as engine_mod
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.ops.quant import (
    INT4_PATHS,
    INT8_PATHS,
    int4_group_size,
    dequantize_int4,
    int4_linear,
    int4_linear_reference,
    int8_linear,
    int8_linear_reference,
    pack_int4,
    quantize_int4,
    quantize_int8,
)
from tests.conftest import assert_fused_step_is_op_by_op, hf_greedy, save_tiny_adapter

PROMPTS = [[5, 17, 99, 3], list(range(30, 52)), [42, 7]]
N_NEW = 10
HF_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def close(got: torch.Tensor, want: torch.Tensor, path: str) -> None:
    """fp32 paths: elementwise; bf16-activation paths (~3 significant digits per term): relative to the norm."""
    if path.endswith("_bf16"):
        assert (got - want).norm() / want.norm() < 1e-2
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", INT8_PATHS)
@pytest.mark.parametrize("m", [1, 5, 64])
def test_int8_paths_match_the_reference(path, m):
    g = torch.Generator().manual_seed(m)
    w, x, b = torch.randn(96, 64, generator=g), torch.randn(m, 64, generator=g), torch.randn(96, generator=g)
    wq, s = quantize_int8(w)
    assert wq.dtype == torch.int8 and (w - wq.float() * s[:, None]).abs().max() <= s.max() / 2 + 1e-6
    want = int8_linear_reference(x, wq, s, b)
    close(int8_linear(x, wq, s, b, path), want, path)


@pytest.mark.parametrize("path", INT4_PATHS)
@pytest.mark.parametrize("m,n_in", [(1, 64), (7, 96), (64, 256)])
def test_int4_paths_match_the_reference(path, m, n_in):
    g = torch.Generator().manual_seed(m)
    w, x = torch.randn(64, n_in, generator=g), torch.randn(m, n_in, generator=g)
    group = int4_group_size(n_in, 128)
    q, so = quantize_int4(w, group)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    want = int4_linear_reference(x, q, so, group, None)
    assert (want - x @ w.T).abs().mean() < 0.2 * (x @ w.T).abs().mean()  # 4 bits keep the product roughly
    close(int4_linear(x, *pack_int4(q, so), group, None, path), want, path)


class _Rows:
    """A dense checkpoint tensor in memory (``quant_load.Source``)."""

    qtype = "dense"

    def __init__(self, w: torch.Tensor) -> None:
        self.w, self.shape = w, tuple(w.shape)

    def float_rows(self, lo: int, hi: int) -> torch.Tensor:
        return self.w[lo:hi].float()

    def release(self) -> None:
        pass


@pytest.mark.parametrize("sizes", [[64, 32, 32], [20, 12, 7], [16, 5]])
def test_int4_stacks_pack_in_panels_whatever_their_parts(monkeypatch, sizes):
    """A stacked projection's parts quantize into 16-row panels as they arrive: parts starting at a panel's first row
    pack chunk by chunk (chunks of whole panels), parts starting inside one (20 + 12 + 7 rows) are gathered and packed
    once complete; either way the module computes the stacked quantized weight."""
    from loraplex.models import quant_load

    monkeypatch.setattr(quant_load, "CHUNK", 96 * 17)  # chunks of 16 rows of 96: several per part
    g = torch.Generator().manual_seed(len(sizes))
    parts = [torch.randn(n, 96, generator=g) for n in sizes]
    fill = quant_load.Fill(quant_load.Target("int4", 32), 96, sizes, False, torch.float32, "cpu")
    for i, w in reversed(list(enumerate(parts))):
        fill.put(f"part{i}", "weight", i, _Rows(w))
    module = fill.build(lambda *a: [(1 << 30, "int4_c")])
    q, so = quantize_int4(torch.cat(parts), 32)
    x = torch.randn(3, 96, generator=g)
    close(module(x), int4_linear_reference(x, q, so, 32, None), "int4_c")


def _round_trip(w: torch.Tensor, method: str) -> torch.Tensor:
    if method == "int8":
        wq, s = quantize_int8(w)
        return wq.float() * s[:, None]
    group = int4_group_size(w.shape[1], 128)
    q, so = quantize_int4(w, group)
    return dequantize_int4(q, so, group)


def dequantized_hf(model_dir, adapter_dir=None, method: str = "int8"):
    """transformers (+ PEFT) with every decoder projection replaced by its quantization round trip. Stacked
    projections quantize row by row (int8) or per row group (int4), so per-module round trips are the same."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if name.rsplit(".", 1)[-1] in HF_LINEARS:
                mod.weight.copy_(_round_trip(mod.weight, method))
        # the embedding and the LM head: int8 per vocabulary row, whatever the method (a tied pair once)
        for w in {id(p): p for p in (hf.get_input_embeddings().weight, hf.get_output_embeddings().weight)}.values():
            w.copy_(_round_trip(w, "int8"))
    if adapter_dir is None:
        return hf
    from peft import PeftModel

    return PeftModel.from_pretrained(hf, adapter_dir).eval()


@pytest.fixture
def exact_plan(monkeypatch):
    """Every batch through an fp32-activation path: exact fp32 arithmetic on the quantized weights."""
    monkeypatch.setattr(engine_mod, "quant_plan", lambda method, *a: [(1 << 30, "dequant")])


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_engine_matches_simulated_quantization(tiny_model_dir, exact_plan, method):
    llm = LLM(model=str(tiny_model_dir), dtype="float32", quantization=method)
    params = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, logprobs=3)
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    hf = dequantized_hf(tiny_model_dir, method=method)
    for prompt, out in zip(PROMPTS, outs):
        ids, lp = hf_greedy(hf, prompt, N_NEW)
        assert out.outputs[0].token_ids == ids
        for step, entry in enumerate(out.outputs[0].logprobs):
            for tid, x in entry.items():
                assert abs(x.logprob - lp[step, tid].item()) < 1e-3
    down = llm.llm_engine.runner.model.layers[0].mlp.down_proj
    assert (down.wq.dtype == torch.int8) if method == "int8" else hasattr(down, "packed")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_lora_on_a_quantized_base_matches_peft_on_the_dequantized_base(tiny_llama_dir, tmp_path, exact_plan, method):
    save_tiny_adapter(tiny_llama_dir, tmp_path / "a", seed=3, r=8, target_modules="all-linear")
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", quantization=method, enable_lora=True)
    lora = LoRARequest("a", 1, str(tmp_path / "a"))
    params = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False,
                        lora_request=[lora, None, lora])
    peft, base = dequantized_hf(tiny_llama_dir, tmp_path / "a", method), dequantized_hf(tiny_llama_dir, None, method)
    for prompt, out, model in zip(PROMPTS, outs, (peft, base, peft)):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, N_NEW)[0]


def test_measured_plan_stays_close_and_bad_method_is_refused(tiny_llama_dir):
    exact = LLM(model=str(tiny_llama_dir), dtype="float32")
    quant = LLM(model=str(tiny_llama_dir), dtype="float32", quantization="int8")  # this machine's measured plan
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=5)
    for a, b in zip(quant.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False),
                    exact.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)):
        first_a, first_b = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        tid = next(iter(first_b))  # the unquantized model's first token: among int8's top 5, at nearly its logprob
        assert tid in first_a
        assert abs(first_a[tid].logprob - first_b[tid].logprob) < 0.2
    with pytest.raises(ValueError, match="quantization"):
        LLM(model=str(tiny_llama_dir), quantization="int3")
    int4 = LLM(model=str(tiny_llama_dir), dtype="float32", quantization="int4")
    sizes = [m.llm_engine.memory()["weights"] for m in (exact, quant, int4)]
    assert sizes[0] > sizes[1] > sizes[2]  # fp32 > int8 > int4 (embeddings and LM head stay fp32)
    assert exact.llm_engine.memory()["kv_cache"] == quant.llm_engine.memory()["kv_cache"] > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method,tiled_from", [("int8", None), ("int8", 2), ("int4", None)])
def test_fused_decode_step_on_quantized_bases_is_the_op_by_op_path(tiny_model_dir, monkeypatch, dtype, method,
                                                                   tiled_from):
    """With the C GEMVs as the measured paths for small steps (the pass form, or int8's tiled form from 2 tokens on),
    decode steps run the whole stack in one C call (``ops.decode_step_cpu``) on the quantized weights: the same
    tokens and log-probabilities as the op-by-op path, to the bit, on every family."""
    plan = [(8, f"{method}_c")] if tiled_from is None else [(tiled_from - 1, f"{method}_c"), (8, f"{method}_tiled")]
    monkeypatch.setattr(engine_mod, "quant_plan", lambda m, *a: plan + [(1 << 30, "dequant")])
    assert_fused_step_is_op_by_op(monkeypatch, lambda: LLM(model=str(tiny_model_dir), dtype=dtype,
                                                           quantization=method), PROMPTS, N_NEW)
