"""What --deterministic costs and what it buys, on the embedded SmolLM2 with the demo adapters, one run.

    python benchmarks/bench_deterministic.py [--dtype bfloat16] [--prompts 32] [--new-tokens 32] [--repeats 3]

Throughput (default vs deterministic engine, alternating runs, median) at batch 1 and for ``--prompts`` requests
spread over the base and the three demo adapters, each against its roofline measured in the run (``roofline.py``:
weights + the adapters its rows use over the read bandwidth, or its FLOPs over the matmul rate); then stability:
every request greedy alone, then all of them in one batch, and how many streams differ (token ids, and log-probs
bit for bit) in each mode.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.lora.demo import demo_adapters

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402
from bench_engine import QUESTIONS  # noqa: E402


def run(llm: LLM, prompts: list[list[int]], loras: list, n: int, logprobs: bool = False):
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=1 if logprobs else None)
    t = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp, lora_request=loras, use_tqdm=False)
    dt = time.perf_counter() - t
    streams = [(tuple(o.outputs[0].token_ids),
                tuple(d[tok].logprob for d, tok in zip(o.outputs[0].logprobs or [], o.outputs[0].token_ids)))
               for o in outs]
    return len(prompts) * n / dt, streams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    engines = {mode: LLM(dtype=args.dtype, enable_lora=True, deterministic=mode == "deterministic")
               for mode in ("default", "deterministic")}
    tok = engines["default"].get_tokenizer()
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": f"{q} ({i})"}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)
               for i in range(args.prompts // len(QUESTIONS) + 1) for q in QUESTIONS][:args.prompts]
    demos = [None] + [LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(sorted(demo_adapters().items()))]
    loras = [demos[i % len(demos)] for i in range(len(prompts))]
    for llm in engines.values():  # warm-up: adapters read, kernels' first calls
        run(llm, prompts[:4], loras[:4], 4)
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for mode, llm in engines.items():
            llm.reset_prefix_cache()
            rates.setdefault((mode, "b1"), []).append(run(llm, prompts[:1], [None], args.new_tokens)[0])
            llm.reset_prefix_cache()
            rates.setdefault((mode, "many"), []).append(run(llm, prompts, loras, args.new_tokens)[0])
    med = {k: statistics.median(v) for k, v in rates.items()}
    engine = engines["default"].llm_engine
    spec, dtype = engine.loaded.spec, engine.config.model.dtype
    weights = roofline.weight_bytes(engine.runner.model)
    adapters = sum(roofline.adapter_bytes(lr.lora_path, dtype.itemsize) for lr in demos[1:len(prompts)])
    roof = roofline.Roofline.measure(roofline.model_shapes(spec), dtype, rows=(1, len(prompts)))
    floor = {"b1": roof.decode_floor(spec, weights, 1),
             "many": roof.decode_floor(spec, weights + adapters, len(prompts))}
    print(roof.header())
    print(f"dtype {str(dtype).removeprefix('torch.')}; weights {weights / 1e6:.0f} MB, the adapters used "
          f"{adapters / 1e6:.1f} MB; {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"| mode | batch-1 tok/s | floor | of floor | {args.prompts} prompts (base + 3 adapters) tok/s | floor | "
          "of floor |")
    print("|---|---|---|---|---|---|---|")
    for mode in engines:
        print(f"| {mode} | " + " | ".join(f"{med[mode, c]:.1f} | {floor[c]:.1f} | {med[mode, c] / floor[c]:.0%}"
                                          for c in ("b1", "many")) + " |")
    print(f"deterministic / default: batch 1 {med[('deterministic', 'b1')] / med[('default', 'b1')]:.2f}x, "
          f"{args.prompts} prompts {med[('deterministic', 'many')] / med[('default', 'many')]:.2f}x")
    print("\nstability: each request alone, then all in one batch")
    for mode, llm in engines.items():
        llm.reset_prefix_cache()
        alone = [run(llm, [p], [lr], args.new_tokens, logprobs=True)[1][0] for p, lr in zip(prompts, loras)]
        llm.reset_prefix_cache()
        together = run(llm, prompts, loras, args.new_tokens, logprobs=True)[1]
        ids = sum(a[0] != b[0] for a, b in zip(alone, together))
        bits = sum(a[1] != b[1] for a, b in zip(alone, together))
        print(f"- {mode}: {ids} of {len(prompts)} greedy streams change tokens, {bits} change log-probs")


if __name__ == "__main__":
    main()
