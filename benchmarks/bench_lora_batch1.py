"""Batch-1 decode with one adapter vs the base, on the embedded SmolLM2 and a shipped demo adapter.

    python benchmarks/bench_lora_batch1.py [--adapter pirate] [--repeats 3] [--new-tokens 64]

Alternates base and adapter runs in one process; reports median tok/s of each, the ratio, and each against its
batch-1 floor (``roofline.py``, measured after the runs: the weights, and the adapter, over the read bandwidth).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from loraplex import LLM, LoRARequest, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402


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
    engine = llm.llm_engine
    spec, dtype = engine.loaded.spec, engine.config.model.dtype
    weights = roofline.weight_bytes(engine.runner.model)
    roof = roofline.Roofline.measure(roofline.model_shapes(spec), dtype, rows=(1,))
    floor_base = roof.decode_floor(spec, weights, 1)
    floor_lora = roof.decode_floor(spec, weights + roofline.adapter_bytes(args.adapter, dtype.itemsize), 1)
    print(roof.header())
    print(f"batch 1, {args.new_tokens} tokens, {str(dtype).removeprefix('torch.')}: base {base:.1f} tok/s "
          f"({base / floor_base:.0%} of its floor {floor_base:.1f}), with '{args.adapter}' {ours:.1f} tok/s "
          f"({ours / floor_lora:.0%} of its floor {floor_lora:.1f}; {ours / base:.0%} of base)")


if __name__ == "__main__":
    main()
