"""Tiny GGUF files for the tests: an HF model's tensors written in chosen GGUF types (``gguf.GGUFWriter``), and the
weights the file really holds (``gguf.quants.dequantize``, the reference) put back into the HF model."""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from loraplex.models.gguf_tensors import GLOBAL_NAMES, LAYER_NAMES

HF_TO_GGUF = {**{f"layers.{{}}.{v}": f"blk.{{}}.{k}" for k, v in LAYER_NAMES.items()},
              **{v: k for k, v in GLOBAL_NAMES.items()}}
F16_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82)}  # byte offsets of d (and dmin)


def random_blocks(qtype: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Valid blocks of a type ``gguf`` cannot quantize to (the K-quants): random bytes with small fp16 scales."""
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    raw = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    d = {"Q4_K": 4e-4, "Q5_K": 2e-4, "Q6_K": 6e-5, "Q2_K": 1e-3}[qtype]
    for i, at in enumerate(F16_FIELDS[qtype]):  # d, then dmin = 7.5 d (about zero-mean weights for Q4_K / Q5_K)
        raw[..., at:at + 2] = np.full(raw.shape[:2], d * (7.5 if i else 1), np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def llama_rotation(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (what the loader undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_unrotation(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Its inverse (transformers' ``_reverse_permute_weights``)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: torch.Tensor, qtype: str, seed: int) -> np.ndarray:
    if qtype == "F32":
        return w.float().numpy()
    if qtype == "F16":
        return w.to(torch.float16).numpy()
    if qtype in F16_FIELDS:
        return random_blocks(qtype, w.shape[0], w.shape[1], seed)
    return quantize(w.float().numpy(), GGMLQuantizationType[qtype])


def write_gguf(hf, path, types: dict[str, str], arch: str) -> dict[str, tuple[str, torch.Tensor]]:
    """Write ``hf`` (a transformers model) as GGUF; ``types[hf_module_suffix]`` (``q_proj``, ``embed_tokens`` …) picks
    each weight's type (default F32). Returns ``HF name -> (type, the weights the file holds, dequantized)``."""
    cfg = hf.config
    w = GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    from tests.conftest import byte_tokenizer

    vocab = byte_tokenizer().get_vocab()
    w.add_token_list([t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])])
    w.add_token_types([1] * len(vocab))
    w.add_token_scores([0.0] * len(vocab))  # no merges: transformers derives none from single bytes
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    held = {}
    for seed, (name, p) in enumerate(hf.state_dict().items()):
        short = name.removeprefix("model.")
        if short == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        parts = short.split(".")
        key = ".".join(["layers.{}", *parts[2:-1]]) if parts[0] == "layers" else ".".join(parts[:-1])
        gname = HF_TO_GGUF[key].format(*parts[1:2]) + "." + parts[-1]
        qtype = types.get(parts[-2], "F32") if parts[-1] == "weight" and p.dim() == 2 else "F32"
        rotate = arch == "llama" and parts[-2] in ("q_proj", "k_proj")
        heads = cfg.num_attention_heads if parts[-2] == "q_proj" else cfg.num_key_value_heads
        t = llama_rotation(p, heads) if rotate else p
        data = encode(t, qtype, seed)
        w.add_tensor(gname, data, raw_dtype=GGMLQuantizationType[qtype] if qtype.startswith("Q") else None)
        back = torch.from_numpy(np.array(dequantize(data, GGMLQuantizationType[qtype]), np.float32)).reshape(p.shape)
        if rotate:
            back = llama_unrotation(back, heads)
        held[name] = (qtype, back)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held
