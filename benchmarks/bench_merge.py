"""What does keeping an adapter separate cost? The base, the base + adapter as a LoRA, and the adapter merged.

    python benchmarks/bench_merge.py [--adapter pirate] [--repeats 5] [--new-tokens 64]

Side by side in one run, bf16, on the embedded SmolLM2: 32 chat prompts (those of bench_lora.py) and batch 1
(the first of them). Engines: one with LoRA enabled (base rows, and the adapter on every prompt via LoRARequest),
one plain engine on the base (same graph as a merged model) and one plain engine on the directory written by
``merge_adapters`` into a temp dir. Runs alternate between configurations; the median tok/s of ``--repeats`` is shown,
with the fraction of each configuration's decode floor (``roofline.py``, measured after the runs: the weights, and
the adapter where it runs as a LoRA, over the read bandwidth, or the FLOPs over the matmul rate).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import roofline
import torch
# the same prompts as bench_lora.py (benchmarks/ is on sys.path when this runs as a script, as for roofline)
from bench_lora import QUESTIONS

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.merge import merge_adapters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default="pirate")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="loraplex-merge-"))
    t = time.perf_counter()
    merged_dir = merge_adapters(None, [args.adapter], None, tmp / "merged", dtype="bfloat16")
    merge_s = time.perf_counter() - t
    lora_llm = LLM(dtype="bfloat16", max_model_len=1024, enable_lora=True, max_lora_rank=16)
    plain_llm = LLM(dtype="bfloat16", max_model_len=1024)
    merged_llm = LLM(model=str(merged_dir), dtype="bfloat16", max_model_len=1024)
    shutil.rmtree(tmp)  # the weights are in memory now

    tok = lora_llm.get_tokenizer()
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % 8] + " " * (i // 8)}],
                                                  tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False) for i in range(32)]
    sp = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    lora = LoRARequest(args.adapter, 1, args.adapter)
    configs = {  # name: (engine, LoRA request or None)
        "base (LoRA-enabled engine)": (lora_llm, None),
        "base (plain engine)": (plain_llm, None),
        f"base + '{args.adapter}' as LoRA": (lora_llm, lora),
        f"'{args.adapter}' merged (plain engine)": (merged_llm, None),
    }
    results: dict[tuple[str, int], list[float]] = {}
    outputs = {}
    for batch in (32, 1):
        ids = prompts[:batch]
        for llm, req in configs.values():  # warm-up (loads the adapter into its slot)
            llm.generate(prompt_token_ids=ids, sampling_params=sp, lora_request=req, use_tqdm=False)
        for _ in range(args.repeats):
            for name, (llm, req) in configs.items():
                t = time.perf_counter()
                outputs[name, batch] = llm.generate(prompt_token_ids=ids, sampling_params=sp, lora_request=req,
                                                    use_tqdm=False)
                results.setdefault((name, batch), []).append(batch * args.new_tokens / (time.perf_counter() - t))

    print(f"SmolLM2-135M-Instruct, adapter '{args.adapter}', {args.new_tokens} new tokens, bf16, "
          f"median of {args.repeats}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"merge_adapters took {merge_s:.1f} s")
    spec = lora_llm.llm_engine.loaded.spec
    roof = roofline.Roofline.measure(roofline.model_shapes(spec), torch.bfloat16, rows=(32, 1))
    nbytes = {name: roofline.weight_bytes(llm.llm_engine.runner.model)
              + (roofline.adapter_bytes(args.adapter, 2) if req else 0) for name, (llm, req) in configs.items()}
    floor = {(name, b): roof.decode_floor(spec, nbytes[name], b) for name in configs for b in (32, 1)}
    print(roof.header())
    print("| configuration | 32 prompts tok/s | vs base | floor | of floor | batch 1 tok/s | vs base | floor | "
          "of floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    med = {k: statistics.median(v) for k, v in results.items()}
    base = "base (LoRA-enabled engine)"
    for name in configs:
        print(f"| {name} | " + " | ".join(f"{med[name, b]:.1f} | {med[name, b] / med[base, b]:.0%} | "
                                          f"{floor[name, b]:.1f} | {med[name, b] / floor[name, b]:.0%}"
                                          for b in (32, 1)) + " |")
    lora_name, merged_name = list(configs)[2:]
    for batch in (32, 1):
        pairs = [(a.outputs[0].token_ids, b.outputs[0].token_ids)
                 for a, b in zip(outputs[lora_name, batch], outputs[merged_name, batch])]
        same = sum(a == b for a, b in pairs)
        lead = statistics.median(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in pairs)
        print(f"batch {batch}: merged vs LoRA greedy outputs identical for {same}/{len(pairs)} prompts "
              f"(median {lead:.0f} of {args.new_tokens} leading tokens agree; bf16 rounding differs)")


if __name__ == "__main__":
    main()
