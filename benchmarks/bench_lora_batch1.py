"""Batch-1 decode with one adapter vs the base, on the embedded SmolLM2 and a shipped demo adapter.

    python benchmarks/bench_lora_batch1.py [--adapter pirate] [--repeats 3] [--new-tokens 64]

Alternates base and adapter runs in one process; reports median tok/s of each and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

from loraplex import LLM, LoRARequest, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default="pirate")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    llm = LLM(enable_lora=True, max_lora_rank=16)
    tok = llm.get_tokenizer()
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me a long story about the sea."}],
                                              tokenize=False, add_generation_prompt=True), add_special_tokens=False)]
    sp = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    lora = LoRARequest(args.adapter, 1, args.adapter)
    runs: dict[str, list[float]] = {"base": [], args.adapter: []}
    llm.generate(prompt_token_ids=ids, sampling_params=sp, lora_request=lora, use_tqdm=False)  # warm-up
    for _ in range(args.repeats):
        for name, req in (("base", None), (args.adapter, lora)):
            t = time.perf_counter()
            llm.generate(prompt_token_ids=ids, sampling_params=sp, lora_request=req, use_tqdm=False)
            runs[name].append(args.new_tokens / (time.perf_counter() - t))
    base, ours = (statistics.median(v) for v in runs.values())
    print(f"batch 1, {args.new_tokens} tokens, bf16: base {base:.1f} tok/s, with '{args.adapter}' {ours:.1f} tok/s "
          f"({ours / base:.0%} of base)")


if __name__ == "__main__":
    main()
