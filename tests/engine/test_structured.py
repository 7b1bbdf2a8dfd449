"""Constrained decoding in the engine: against transformers masked step by step with the torch reference of the
grammar mask, in mixed batches (constrained and free rows, different schemas, preemption), on every tiny family."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from loraplex import LLM, SamplingParams
from loraplex.sampling.grammar import (
    GrammarCompiler,
    allocate_bitmask,
    apply_grammar_masks,
    apply_grammar_masks_reference,
)
from loraplex.sampling_params import StructuredOutputsParams as SO

PET = {"type": "object", "properties": {
    "kind": {"enum": ["cat", "dog"]}, "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 30},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 4}}, "required": ["name"],
              "additionalProperties": False}},
    "required": ["kind", "name", "age", "tags", "owner"], "additionalProperties": False}
PROMPTS = [list(range(10, 10 + n)) for n in (3, 9, 14, 6)]
MAX_NEW = 200  # room for the longest PET (byte tokens, multi-byte characters): every row ends by its grammar


def compiler(llm: LLM) -> GrammarCompiler:
    e = llm.llm_engine
    return GrammarCompiler(e.tokenizer, e.loaded.spec.vocab_size, sorted(e.loaded.eos_token_ids))


def hf_constrained_greedy(hf, grammars: GrammarCompiler, spec: SO, prompt: list[int], max_new: int) -> list[int]:
    """transformers' logits, masked by the torch reference of the grammar mask, argmax, token by token."""
    matcher, ids, out = grammars.matcher(grammars.compile(spec)), list(prompt), []
    bitmask = allocate_bitmask(1, hf.config.vocab_size)
    with torch.no_grad():
        for _ in range(max_new):
            logits = hf(torch.tensor([ids])).logits[:, -1].float()
            apply_grammar_masks_reference(logits, [matcher], bitmask)
            tok = int(logits.argmax())
            assert matcher.accept(tok)
            ids.append(tok)
            out.append(tok)
            if matcher.is_terminated():
                break
    return out


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu")


def test_mask_matches_its_torch_reference(llm):
    grammars = compiler(llm)
    specs = [SO(json=PET), None, SO(regex=r"[a-c]+x"), SO(choice=["yes", "no"]), None]
    matchers = [None if s is None else grammars.matcher(grammars.compile(s)) for s in specs]
    matchers[0].accept(llm.get_tokenizer().convert_tokens_to_ids("{"))
    logits = torch.randn(len(specs), llm.llm_engine.loaded.spec.vocab_size)
    fast, ref = logits.clone(), logits.clone()
    apply_grammar_masks(fast, matchers, allocate_bitmask(8, logits.shape[1]))
    apply_grammar_masks_reference(ref, matchers, allocate_bitmask(8, logits.shape[1]))
    assert torch.equal(fast, ref)
    assert torch.equal(fast[1], logits[1]) and torch.isinf(fast[0]).sum() > 0
    # greedy rows: a row whose argmax is allowed may stay unmasked; every greedy argmax equals the masked one
    for trial in range(20):
        logits = torch.randn(len(specs), logits.shape[1])
        if trial % 2:  # make some argmax allowed
            logits[2, llm.get_tokenizer().convert_tokens_to_ids("a")] = 100.0
        fast, ref = logits.clone(), logits.clone()
        apply_grammar_masks(fast, matchers, allocate_bitmask(8, logits.shape[1]), [True] * len(specs))
        apply_grammar_masks_reference(ref, matchers, allocate_bitmask(8, logits.shape[1]))
        assert torch.equal(fast.argmax(-1), ref.argmax(-1))
    allowed = (~torch.isinf(fast[3])).nonzero().flatten().tolist()
    assert sorted(llm.get_tokenizer().decode([t]) for t in allowed) == ["n", "y"]


@pytest.mark.parametrize("spec", [SO(json=PET), SO(regex=r"(ab|cd){2,4}!"), SO(choice=["left", "right", "up"]),
                                  SO(grammar='root ::= "[" item ("," item)? ("," item)? "]"\nitem ::= [0-9]')],
                         ids=["json", "regex", "choice", "ebnf"])
def test_greedy_equals_transformers_masked(tiny_model_dir, spec):
    from transformers import AutoModelForCausalLM

    llm = LLM(model=str(tiny_model_dir), dtype="float32", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    grammars = compiler(llm)
    outs = llm.generate(prompt_token_ids=PROMPTS[:2], use_tqdm=False,
                        sampling_params=SamplingParams(temperature=0, max_tokens=MAX_NEW, structured_outputs=spec))
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_constrained_greedy(hf, grammars, spec, prompt, MAX_NEW)
        assert out.outputs[0].finish_reason == "stop"
        text = out.outputs[0].text
        if spec.json is not None:
            jsonschema.validate(json.loads(text), PET)
        elif spec.regex is not None:
            assert re.fullmatch(spec.regex, text)
        elif spec.choice is not None:
            assert text in spec.choice


def test_mixed_batch_leaves_free_rows_unchanged(llm):
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(prompt_token_ids=PROMPTS, sampling_params=free, use_tqdm=False)
    specs = [None, SO(json=PET), None, SO(regex=r"[0-9]{3}-[0-9]{4}")]
    params = [free if s is None else SamplingParams(temperature=0, max_tokens=MAX_NEW, structured_outputs=s)
              for s in specs]
    mixed = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    for i in (0, 2):
        assert mixed[i].outputs[0].token_ids == alone[i].outputs[0].token_ids
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), PET)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", mixed[3].outputs[0].text)


def test_sampled_n_each_child_follows_its_grammar(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=MAX_NEW, structured_outputs=SO(json=PET))
    out = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=params, use_tqdm=False)[0]
    texts = [o.text for o in out.outputs]
    for t in texts:
        jsonschema.validate(json.loads(t), PET)
    assert len(set(texts)) > 1  # four independent draws, each constrained on its own


def test_preempted_rows_keep_their_grammar_state(tiny_llama_dir):
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4
    small = LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu", block_size=4, max_model_len=256,
                kv_cache_memory=72 * block_bytes)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, structured_outputs=SO(json=PET))
    outs = small.generate(prompt_token_ids=PROMPTS * 2, sampling_params=params, use_tqdm=False)
    assert small.llm_engine.scheduler.num_preemptions > 0
    roomy = LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu", max_model_len=256)
    ref = roomy.generate(prompt_token_ids=PROMPTS * 2, sampling_params=params, use_tqdm=False)
    for a, b in zip(outs, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        jsonschema.validate(json.loads(a.outputs[0].text), PET)


def test_a_grammar_that_cannot_finish_stops_at_max_tokens(llm):
    out = llm.generate(prompt_token_ids=[PROMPTS[0]], use_tqdm=False,
                       sampling_params=SamplingParams(temperature=0, max_tokens=5, structured_outputs=SO(regex="a{50}")))
    assert out[0].outputs[0].text == "aaaaa" and out[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("spec,field", [(dict(json={"type": "objectx"}), "structured_outputs.json"),
                                        (dict(regex="(ab"), "structured_outputs.regex"),
                                        (dict(grammar="root ::= undefined_rule"), "structured_outputs.grammar"),
                                        (dict(json='{"type": '), "structured_outputs.json")])
def test_bad_constraints_raise_naming_the_field(llm, spec, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=SamplingParams(structured_outputs=SO(**spec)),
                     use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_structured_outputs_params_validation():
    with pytest.raises(ValueError, match="exactly one"):
        SO()
    with pytest.raises(ValueError, match="exactly one"):
        SO(json=PET, regex="a")
    with pytest.raises(ValueError, match="choice"):
        SO(choice=[])
    assert SO(json=PET).key == SO(json=json.loads(json.dumps(PET))).key
