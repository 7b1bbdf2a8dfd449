"""Peak memory while loading a quantized model (issue 19): a random model in Qwen2-1.5B's shape (hidden 1536, 28
layers, intermediate 8960, 12 heads / 2 KV heads, vocab 151936, tied embedding; no download), written as bf16
safetensors and as a GGUF (projections Q4_K, embedding Q8_0 — random valid blocks), each loaded in a fresh process.

    python benchmarks/bench_quant_load.py [--layers 28] [--dir /tmp] [--kv-mb 256]

Per case: peak RSS during the load (``VmHWM``, reset after imports and the kernel-plan measurement) against the
model's quantized bytes + KV bytes as the engine reports them; the process's RSS before loading (interpreter,
torch, transformers) is shown apart. The GGUF's config and tokenizer are placed in the loader's metadata cache
(transformers would read them from the file's keys; the file holds tensors and its architecture only).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SHAPE = dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
             num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
CHILD = r"""
import gc, json, sys, time, torch
from loraplex import LLM
from loraplex.engine.quant_plan import quant_plan
path, method, kv, shapes = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
for kind, n_in, n_out in shapes:  # measured once per machine and cached: not part of the load's peak
    quant_plan(method if kind == "proj" else "int8", n_in, n_out, torch.bfloat16, "cpu")
gc.collect()
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
before = status("VmRSS:")
t = time.perf_counter()
llm = LLM(model=path, dtype="bfloat16", quantization=method, kv_cache_memory=kv, max_model_len=1024)
print(json.dumps({"load_s": time.perf_counter() - t, "before": before, "peak": status("VmHWM:"),
                  **llm.llm_engine.memory()}))
"""


def tensors(cfg: dict):
    """(HF name, shape) of every weight, in a checkpoint's order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    yield "model.embed_tokens.weight", (v, h)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                            ("mlp.down_proj", (h, i))):
            yield p + name + ".weight", shape
            if name[-6:] in ("q_proj", "k_proj", "v_proj"):
                yield p + name + ".bias", shape[:1]
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)


def write_safetensors(path: Path, cfg: dict) -> None:
    """bf16, streamed tensor by tensor (the whole model never in memory here either)."""
    specs, off = {}, 0
    for name, shape in tensors(cfg):
        n = int(np.prod(shape)) * 2
        specs[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header = json.dumps(specs).encode()
    header += b" " * (-len(header) % 8)
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for name, shape in tensors(cfg):
            w = torch.randn(shape, generator=g) * (0.02 if len(shape) == 2 else 1.0) + (len(shape) == 1)
            f.write(w.to(torch.bfloat16).view(torch.uint16).numpy().tobytes())


def write_gguf(path: Path, cfg: dict) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    from loraplex.models.gguf_tensors import GLOBAL_NAMES, LAYER_NAMES

    to_gguf = {**{f"layers.{{}}.{v}": f"blk.{{}}.{k}" for k, v in LAYER_NAMES.items()},
               **{v: k for k, v in GLOBAL_NAMES.items()}}
    rng = np.random.default_rng(0)

    def data(name: str, shape: tuple) -> tuple[np.ndarray, GGMLQuantizationType | None]:
        if len(shape) == 1:
            return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32), None
        qtype = GGMLQuantizationType.Q8_0 if "embed" in name else GGMLQuantizationType.Q4_K
        block, nbytes = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (shape[0], shape[1] // block, nbytes), dtype=np.uint8)
        raw[..., 0:2] = np.full(raw.shape[:2], 1e-3 if qtype == GGMLQuantizationType.Q8_0 else 2e-4,
                                np.float16)[..., None].view(np.uint8)
        if qtype == GGMLQuantizationType.Q4_K:  # dmin
            raw[..., 2:4] = np.full(raw.shape[:2], 1.5e-3, np.float16)[..., None].view(np.uint8)
        return raw.reshape(shape[0], -1), qtype

    def gguf_name(name: str) -> str:
        parts = name.removeprefix("model.").split(".")
        key = ".".join(["layers.{}", *parts[2:-1]]) if parts[0] == "layers" else ".".join(parts[:-1])
        return to_gguf[key].format(*parts[1:2]) + "." + parts[-1]

    w = GGUFWriter(str(path), "qwen2")
    for name, shape in tensors(cfg):
        if len(shape) == 1:
            w.add_tensor_info(gguf_name(name), shape, np.dtype(np.float32), shape[0] * 4)
            continue
        qtype = GGMLQuantizationType.Q8_0 if "embed" in name else GGMLQuantizationType.Q4_K
        block, nbytes = GGML_QUANT_SIZES[qtype]
        row = shape[1] // block * nbytes
        w.add_tensor_info(gguf_name(name), (shape[0], row), np.dtype(np.uint8), shape[0] * row, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in tensors(cfg):
        w.write_tensor_data(data(name, shape)[0])
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    ap.add_argument("--dir", default=None, help="where to write the model files (default: a temp dir)")
    ap.add_argument("--kv-mb", type=int, default=256)
    args = ap.parse_args()
    from transformers import PreTrainedTokenizerFast, Qwen2Config
    from tokenizers import Tokenizer, models

    from loraplex.models.loader import _gguf_key, cache_dir
    from loraplex.models.registry import ModelSource

    cfg = {**SHAPE, "num_hidden_layers": args.layers}
    root = Path(tempfile.mkdtemp(prefix="bench_quant_load.", dir=args.dir))
    hf_dir, gguf_dir = root / "hf", root / "gguf"
    hf_dir.mkdir()
    gguf_dir.mkdir()
    config = Qwen2Config(**cfg, use_sliding_window=False, bos_token_id=0, eos_token_id=1)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "a": 2}, "a")),
                                  bos_token="<s>", eos_token="</s>")
    config.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    t = time.perf_counter()
    write_safetensors(hf_dir / "model.safetensors", cfg)
    write_gguf(gguf_dir / "model.gguf", cfg)
    meta = cache_dir() / f"{_gguf_key(ModelSource('m', gguf_dir, 'model.gguf'))}-meta"
    meta.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(meta)
    tok.save_pretrained(meta)
    print(f"# wrote {root} in {time.perf_counter() - t:.0f} s: safetensors "
          f"{(hf_dir / 'model.safetensors').stat().st_size / 1e9:.2f} GB, GGUF "
          f"{(gguf_dir / 'model.gguf').stat().st_size / 1e9:.2f} GB")
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_out = h + 2 * h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = [("proj", h, q_out), ("proj", h, h), ("proj", h, 2 * i), ("proj", i, h), ("head", h, v)]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    print(f"# {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
          f"{args.layers} layers, KV {args.kv_mb} MB")
    print(f"| file | quantization | load s | RSS before MB | peak RSS in load MB | weights MB | KV MB "
          f"| peak / (weights + KV) | peak / weights |")
    print("|---|---|---|---|---|---|---|---|---|")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    for label, path, methods in (("bf16 safetensors", hf_dir, ("int8", "int4")),
                                 ("GGUF Q4_K + Q8_0", gguf_dir / "model.gguf", ("gguf", "int8", "int4"))):
        for method in methods:
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), method, str(args.kv_mb << 20),
                                  json.dumps(shapes)], capture_output=True, text=True, env=env)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            grown = r["peak"] - r["before"]
            mb = lambda x: x / 2**20  # noqa: E731
            print(f"| {label} | {method} | {r['load_s']:.1f} | {mb(r['before']):.0f} | {mb(grown):.0f} | "
                  f"{mb(r['weights']):.0f} | {mb(r['kv_cache']):.0f} | "
                  f"{grown / (r['weights'] + r['kv_cache']):.2f} | {grown / r['weights']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
