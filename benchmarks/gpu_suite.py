"""The GPU suite, one short call on one H100/H200 (issue 16): random bf16 weights built on the device (no download)
in an 8B Llama shape and a 4B Qwen3 shape.

    python benchmarks/gpu_suite.py [--shapes llama8b qwen3_4b] [--skip-peft] [--steps 20]
    python benchmarks/gpu_suite.py --shapes tiny --device cpu   # the same code path, minutes on a CPU

Per shape: decode step time at batch 1 / 32 / 128 against the weight-bandwidth floor (weight bytes over the copy
bandwidth measured in the run); the same at batch max(32, n) with n = 1 / 8 / 32 / 128 distinct rank-16 all-linear
adapters (128 with max_loras 32: swapping); prefill tok/s (8 prompts × 1024); transformers + PEFT on the same GPU
with 32 distinct adapters in one batch (``adapter_names=``) for the ratio. Writes ``gpu_suite.json`` and
``gpu_suite.md`` under ``$OUT`` (or the current directory).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from loraplex import LoRARequest, SamplingParams
from loraplex.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from loraplex.engine import LLMEngine
from loraplex.models.loader import LoadedModel
from loraplex.models.model_config import ModelSpec
from loraplex.models.registry import ModelSource
from loraplex.models.transformer import DecoderLM

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from bench_lora import write_random_adapter  # noqa: E402
from tests.conftest import byte_tokenizer  # noqa: E402  (a byte tokenizer: the prompts are random ids anyway)


def shape_config(name: str):
    from transformers import LlamaConfig, Qwen3Config

    if name == "llama8b":
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=5e5)
    if name == "qwen3_4b":
        return Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=8192,
                           tie_word_embeddings=True)
    if name == "tiny":
        return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)
    raise SystemExit(f"--shapes: unknown shape {name!r}")


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a 2 GiB device copy (read + write)."""
    n = (2 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n / best


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_engine(cfg, device: str, dtype: torch.dtype, max_loras: int, max_num_seqs: int) -> LLMEngine:
    """Our engine over random weights (nn.Linear's own init), without writing a checkpoint."""
    spec = ModelSpec.from_hf_config(cfg)
    model = DecoderLM(spec, dtype, device, max_positions=4096).eval()
    loaded = LoadedModel(ModelSource("random", Path(".")), spec, model, byte_tokenizer(), frozenset(), 4096)
    kv_bytes = int(torch.cuda.mem_get_info()[0] * 0.5) if device == "cuda" else 1 << 30
    block = 16
    per_block = 2 * spec.num_layers * block * spec.num_kv_heads * spec.head_dim * torch.finfo(dtype).bits // 8
    blocks = min(kv_bytes // per_block, 256 * max_num_seqs)
    return LLMEngine(EngineConfig(ModelConfig("random", dtype, device), CacheConfig(block, blocks, False),
                                  SchedulerConfig(max_num_seqs, 8192, 4096),
                                  LoRAConfig(max_loras, 16, max(max_loras, 128))), loaded)


def decode_step_time(engine: LLMEngine, batch: int, loras: list, steps: int, vocab: int,
                     device: str) -> tuple[float, float]:
    """Median seconds of a decode step with ``batch`` rows of 128-token prompts (after every prefill is done), and
    tokens per second over those steps (fewer rows than ``batch`` run when adapters outnumber the slots)."""
    g = torch.Generator().manual_seed(batch)
    sp = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    ids = [engine.add_request(torch.randint(0, vocab, (128,), generator=g).tolist(), sp,
                              lora_request=loras[i % len(loras)] if loras else None) for i in range(batch)]
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
        engine.step()
    times, tokens = [], 0
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        tokens += len(engine.step())  # one output per request that got a token
        sync(device)
        times.append(time.perf_counter() - t)
    for rid in ids:
        engine.abort_request(rid)
    return sorted(times)[len(times) // 2], tokens / sum(times)


def prefill_rate(engine: LLMEngine, vocab: int, device: str) -> float:
    g = torch.Generator().manual_seed(1)
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for _ in range(8):
        engine.add_request(torch.randint(0, vocab, (1024,), generator=g).tolist(), sp)
    sync(device)
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    sync(device)
    return 8 * 1024 / (time.perf_counter() - t)


def peft_rate(cfg, adapter_dirs: list[Path], batch: int, new_tokens: int, device: str, dtype) -> float:
    """transformers + PEFT, one mixed batch over distinct adapters (``adapter_names``), generated tok/s."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()
    peft = PeftModel.from_pretrained(model, str(adapter_dirs[0]), adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], start=1):
        peft.load_adapter(str(d), adapter_name=f"a{i}")
    names = [f"a{i % len(adapter_dirs)}" for i in range(batch)]
    ids = torch.randint(0, cfg.vocab_size, (batch, 128), device=device)
    with torch.no_grad():
        peft.generate(ids, max_new_tokens=2, do_sample=False, adapter_names=names)
        sync(device)
        t = time.perf_counter()
        peft.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      adapter_names=names)
        sync(device)
    del peft, model
    return batch * new_tokens / (time.perf_counter() - t)


def run_shape(name: str, args, rows: list[dict]) -> None:
    cfg = shape_config(name)
    dtype, device = torch.bfloat16 if args.device == "cuda" else torch.float32, args.device
    engine = build_engine(cfg, device, dtype, 32, 128)
    spec = engine.loaded.spec
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    floor = weight_bytes / (copy_bandwidth(device) / 2)
    for batch in (1, 32, 128):
        t, rate = decode_step_time(engine, batch, [], args.steps, spec.vocab_size, device)
        rows.append({"shape": name, "case": f"base, batch {batch}", "step_ms": t * 1e3, "vs_floor": t / floor,
                     "tok_s": rate})
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-gpu-"))
    files = []
    for i in range(8):  # 8 distinct weight files; more adapters reuse them under their own names (own slots)
        write_random_adapter(tmp / f"f{i}", spec, 16, seed=i)
        files.append(tmp / f"f{i}")
    base32 = next(r["step_ms"] for r in rows if r["shape"] == name and r["case"] == "base, batch 32")
    for n in (1, 8, 32, 128):
        loras = [LoRARequest(f"{name}-{n}-{i}", 1000 * n + i + 1, str(files[i % len(files)])) for i in range(n)]
        batch = max(32, n)
        t, rate = decode_step_time(engine, batch, loras, args.steps, spec.vocab_size, device)
        rows.append({"shape": name, "case": f"{n} adapters, batch {batch}", "step_ms": t * 1e3,
                     "vs_floor": t / floor, "tok_s": rate,
                     **({"vs_base_batch32": t * 1e3 / base32} if batch == 32 else {})})
        for lr in loras:
            engine.lora_store.unload(lr.lora_name)
    rows.append({"shape": name, "case": "prefill 8 x 1024", "tok_s": prefill_rate(engine, spec.vocab_size, device)})
    del engine
    if device == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_peft:
        ours = next(r["tok_s"] for r in rows if r["shape"] == name and r["case"] == "32 adapters, batch 32")
        hf = peft_rate(cfg, files * 4, 32, 16, device, dtype)
        rows.append({"shape": name, "case": "transformers+PEFT, 32 adapters, batch 32", "tok_s": hf,
                     "ours_vs_peft": ours / hf})
    rows.append({"shape": name, "case": "weights", "weight_gb": weight_bytes / 1e9, "floor_ms": floor * 1e3})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["llama8b", "qwen3_4b"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-peft", action="store_true")
    args = ap.parse_args()
    rows: list[dict] = []
    t0 = time.perf_counter()
    for name in args.shapes:
        run_shape(name, args, rows)
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
            "seconds": time.perf_counter() - t0}
    (out / "gpu_suite.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    keys = ["shape", "case", "step_ms", "vs_floor", "tok_s", "vs_base_batch32", "ours_vs_peft", "weight_gb",
            "floor_ms"]
    lines = [f"{meta}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                                       for k in keys) + " |")
    (out / "gpu_suite.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
