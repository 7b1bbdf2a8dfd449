"""What --deterministic costs and what it buys, on the embedded SmolLM2 with the demo adapters, one run.

    python benchmarks/bench_deterministic.py [--dtype bfloat16] [--prompts 32] [--new-tokens 32] [--repeats 3]

Throughput (default vs deterministic engine, alternating runs, median) at batch 1 and for ``--prompts`` requests
spread over the base and the three demo adapters; the batch-1 weight-bandwidth floor (copy bandwidth measured in the
run); then stability: every request greedy alone, then all of them in one batch, and how many streams differ
(token ids, and log-probs bit for bit) in each mode.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.lora.demo import demo_adapters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import QUESTIONS, copy_bandwidth  # noqa: E402


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
    model = engines["default"].llm_engine.runner.model
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    bw = copy_bandwidth() / 2
    floor = bw / weights
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; dtype {str(engines['default'].llm_engine.config.model.dtype).removeprefix('torch.')};"
          f" copy bandwidth {bw / 1e9:.1f} GB/s read, batch-1 floor {floor:.1f} tok/s ({weights / 1e6:.0f} MB)")
    print(f"| mode | batch-1 tok/s | of floor | {args.prompts} prompts (base + 3 adapters) tok/s |")
    print("|---|---|---|---|")
    for mode in engines:
        print(f"| {mode} | {med[(mode, 'b1')]:.1f} | {med[(mode, 'b1')] / floor:.0%} | {med[(mode, 'many')]:.1f} |")
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
