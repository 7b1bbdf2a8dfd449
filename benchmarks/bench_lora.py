"""Multi-LoRA benchmark: 32 prompts × 64 tokens, each prompt on its own rank-16 all-linear adapter.

    python benchmarks/bench_lora.py [--adapters 32] [--rank 16] [--new-tokens 64] [--skip-peft] [--pairs 3]

Side by side in one run: transformers (base), transformers+PEFT mixed batch ``generate(adapter_names=...)``,
loraplex base-only and loraplex with one adapter per prompt. Random adapters are written in PEFT's format.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.layers.projections import MODULES, hf_module_path
from loraplex.models.registry import resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402

QUESTIONS = ["Who are you?", "What is the capital of France?", "Write a short poem about autumn.",
             "Explain photosynthesis to a child.", "List three uses of copper.", "What is 17 times 23?",
             "Give me a recipe for pancakes.", "Why is the sky blue?"]


def write_random_adapter(path: Path, spec, rank: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_layers):
        for module, (n_in, n_out) in spec.module_shapes.shapes.items():
            key = f"base_model.model.model.{hf_module_path(layer, module)}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.01
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": list(MODULES), "bias": "none", "lora_dropout": 0.0}))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def paired(run_base, run_lora, total: int, pairs: int) -> tuple[float, float, float]:
    """Median tok/s of base-only and of adapter runs timed in ``pairs`` back-to-back pairs (the order alternating),
    and the median of the pairs' ratios: on a shared machine whose speed drifts by tens of percent between minutes,
    only a ratio taken within one pair compares like with like."""
    base, lora = [], []
    for i in range(pairs):
        first, second = (run_base, run_lora) if i % 2 == 0 else (run_lora, run_base)
        a, b = total / timed(first), total / timed(second)
        base.append(a if i % 2 == 0 else b)
        lora.append(b if i % 2 == 0 else a)
    return statistics.median(base), statistics.median(lora), statistics.median(b / a for a, b in zip(base, lora))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, nargs="+", default=[16],
                    help="adapter ranks; several (e.g. 8 16 64) give adapter i the rank i mod their count")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--max-lora-rank", type=int, default=None,
                    help="the engine's slot width cap (default: the largest --rank; 64 is the server's default)")
    ap.add_argument("--pairs", type=int, default=3,
                    help="base-only / adapter runs timed in this many back-to-back pairs (medians reported)")
    ap.add_argument("--sweep", type=int, nargs="*", default=None,
                    help="instead: distinct-adapter counts to sweep (e.g. 1 8 32 128), max(32, n) prompts each, "
                         "max_loras = --adapters")
    args = ap.parse_args()
    if args.sweep:
        args.rank = args.rank[0]
        return sweep(args)
    n_prompts = 32
    llm = LLM(dtype="bfloat16", max_model_len=1024, enable_lora=True, max_loras=args.adapters,
              max_lora_rank=args.max_lora_rank or max(args.rank), max_cpu_loras=args.adapters)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % 8] + " " * (i // 8)}],
                                                  tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False) for i in range(n_prompts)]
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    spec = llm.llm_engine.loaded.spec
    names = [f"a{i}" for i in range(args.adapters)]
    for i, n in enumerate(names):
        write_random_adapter(tmp / n, spec, args.rank[i % len(args.rank)], i)
    reqs = [LoRARequest(names[i % args.adapters], i % args.adapters + 1, str(tmp / names[i % args.adapters]))
            for i in range(n_prompts)]
    sp = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    total = n_prompts * args.new_tokens
    run_base = lambda: llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)  # noqa: E731
    run_lora = lambda: llm.generate(prompt_token_ids=prompts, sampling_params=sp, lora_request=reqs,  # noqa: E731
                                    use_tqdm=False)
    t = time.perf_counter()
    llm.generate(prompt_token_ids=prompts[:1], sampling_params=SamplingParams(max_tokens=1),
                 lora_request=reqs[0], use_tqdm=False)
    cold = time.perf_counter() - t
    run_base(), run_lora()  # warm-up (loads every adapter into host cache and slots)
    base, lora, ratio = paired(run_base, run_lora, total, args.pairs)
    results = {"loraplex base-only": base, f"loraplex {args.adapters} adapters": lora}

    from transformers import AutoModelForCausalLM

    src = resolve_model(None)
    hf = AutoModelForCausalLM.from_pretrained(str(src.path), gguf_file=src.gguf_file, dtype=torch.bfloat16).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    gen = dict(attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
               min_new_tokens=args.new_tokens, pad_token_id=0)
    with torch.inference_mode():
        results["transformers base"] = total / timed(lambda: hf.generate(ids, **gen))
        if not args.skip_peft:
            from peft import PeftModel

            peft = PeftModel.from_pretrained(hf, str(tmp / names[0]), adapter_name=names[0])
            for n in names[1:]:
                peft.load_adapter(str(tmp / n), adapter_name=n)
            peft = peft.to(torch.bfloat16).eval()
            adapter_names = [r.lora_name for r in reqs]
            results[f"transformers+PEFT {args.adapters} adapters"] = total / timed(
                lambda: peft.generate(input_ids=ids, adapter_names=adapter_names, **gen))

    print(f"32 prompts x {args.new_tokens} tokens, {args.adapters} distinct rank-{'/'.join(map(str, args.rank))} "
          "all-linear adapters, "
          f"bf16, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| engine | tok/s |")
    print("|---|---|")
    for k, v in results.items():
        print(f"| {k} | {v:.1f} |")
    ours = results[f"loraplex {args.adapters} adapters"]
    # the roofline of a decode step over the 32 prompts: the base weights once, plus every distinct adapter used
    # at its own rank (A and B of every module of every layer), against the base GEMMs' FLOPs at 32 rows
    model = llm.llm_engine.runner.model
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # LoRA slots are not parameters
    per_rank = spec.num_layers * sum(i + o for i, o in spec.module_shapes.shapes.values()) * 2  # bf16 bytes
    used = {reqs[i].lora_name for i in range(n_prompts)}
    lora_bytes = sum(per_rank * args.rank[int(n[1:]) % len(args.rank)] for n in used)
    roof = roofline.Roofline.measure(roofline.model_shapes(spec), torch.bfloat16, rows=(n_prompts,))
    flops = roofline.forward_flops(spec, n_prompts)
    floor_base = n_prompts / roof.floor_seconds(base_bytes, flops, n_prompts)
    floor_lora = n_prompts / roof.floor_seconds(base_bytes + lora_bytes, flops, n_prompts)
    print(roof.header())
    print(f"decode floor: base-only {floor_base:.0f} tok/s, with the adapters' {lora_bytes / 1e6:.0f} MB "
          f"{floor_lora:.0f} tok/s; loraplex base-only at {results['loraplex base-only'] / floor_base:.0%}, "
          f"adapters at {ours / floor_lora:.0%} of theirs (end-to-end rates, prefill included)")
    print(f"\nloraplex adapters / own base-only: {ratio:.0%} (median of {args.pairs} pairs)")
    if not args.skip_peft:
        print(f"loraplex adapters / transformers+PEFT: {ours / results[f'transformers+PEFT {args.adapters} adapters']:.1f}x")
    print(f"first adapter request (cold load from disk + 1 token): {cold * 1000:.0f} ms")


def sweep(args) -> None:
    """Throughput vs number of distinct adapters; counts above max_loras make the store swap slots."""
    llm = LLM(dtype="bfloat16", max_model_len=1024, enable_lora=True, max_loras=args.adapters,
              max_lora_rank=args.rank, max_cpu_loras=max(args.adapters, *args.sweep), max_num_seqs=max(32, max(args.sweep)))
    tok = llm.get_tokenizer()
    spec = llm.llm_engine.loaded.spec
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-sweep-"))
    for i in range(max(args.sweep)):
        write_random_adapter(tmp / f"a{i}", spec, args.rank, i)
    sp = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    print(f"sweep: rank-{args.rank} all-linear adapters, max_loras {args.adapters}, {args.new_tokens} new tokens, "
          f"one adapter per prompt round-robin, bf16, {torch.get_num_threads()} threads")
    print(f"medians of {args.pairs} back-to-back pairs (ratio: the pairs' median)")
    print("| distinct adapters | prompts | base-only tok/s | with adapters tok/s | ratio | slot loads | evictions |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sweep:
        n_prompts = max(32, n)
        prompts = [tok.encode(tok.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % 8] + " " * (i // 8 % 8)}], tokenize=False,
            add_generation_prompt=True), add_special_tokens=False) for i in range(n_prompts)]
        reqs = [LoRARequest(f"a{i % n}", i % n + 1, str(tmp / f"a{i % n}")) for i in range(n_prompts)]
        llm.generate(prompt_token_ids=prompts, sampling_params=sp, lora_request=reqs, use_tqdm=False)  # warm-up
        store = llm.llm_engine.lora_store
        loads, evictions = store.num_loads, store.num_evictions
        total = n_prompts * args.new_tokens
        base, lora, ratio = paired(
            lambda: llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False),
            lambda: llm.generate(prompt_token_ids=prompts, sampling_params=sp, lora_request=reqs, use_tqdm=False),
            total, args.pairs)
        print(f"| {n} | {n_prompts} | {base:.1f} | {lora:.1f} | {ratio:.0%} | {store.num_loads - loads} | "
              f"{store.num_evictions - evictions} |")


if __name__ == "__main__":
    main()
