"""Mixture rows vs single-adapter rows: 32 prompts × 64 tokens on the embedded SmolLM2 with the demo adapters.

    python benchmarks/bench_mixture.py [--new-tokens 64] [--repeats 3]

Side by side in one run, same prompts: base only; every row on one adapter (pirate); every row on a 2-adapter
mixture (0.5 pirate + 0.5 congcong); every row on a 3-adapter mixture; and a mixed batch (a quarter each: base,
pirate, congcong, the 2-mixture). Median tok/s of ``--repeats`` alternating runs, each case against its decode
floor (``roofline.py``, measured in the run before the timed part: the weights and the adapters its rows use over
the read bandwidth, or its FLOPs over the matmul rate).
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
from bench_lora import QUESTIONS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    llm = LLM(dtype="bfloat16", max_model_len=1024, enable_lora=True, max_loras=4)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % 8] + " " * (i // 8)}],
                                                  tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False) for i in range(32)]
    pirate, congcong, benben = (LoRARequest(n, i + 1, n) for i, n in enumerate(["pirate", "congcong", "benben"]))
    mix2 = [(pirate, 0.5), (congcong, 0.5)]
    mix3 = [(pirate, 0.4), (congcong, 0.3), (benben, 0.3)]
    cases = {"base only": None, "one adapter (pirate)": pirate, "2-adapter mixture": mix2,
             "3-adapter mixture": mix3, "mixed batch (base/pirate/congcong/mix2)": [None, pirate, congcong, mix2] * 8}
    engine = llm.llm_engine
    spec, dtype = engine.loaded.spec, engine.config.model.dtype
    weights = roofline.weight_bytes(engine.runner.model)
    roof = roofline.Roofline.measure(roofline.model_shapes(spec), dtype, rows=(len(prompts),))
    print(roof.header())
    floors = {name: roof.decode_floor(spec, weights + sum(roofline.adapter_bytes(path, dtype.itemsize)
                                                          for path in adapters_of(lr).values()), len(prompts))
              for name, lr in cases.items()}
    compare_cases(llm, prompts, cases, args.new_tokens, args.repeats, floors)


def adapters_of(lr) -> dict[str, str]:
    """``name -> path`` of every adapter a ``lora_request`` uses: None, one request, a mixture ``[(request, weight),
    ...]``, or a list of those, one per row."""
    if lr is None:
        return {}
    if isinstance(lr, LoRARequest):
        return {lr.lora_name: lr.lora_path}
    if isinstance(lr, tuple):
        return adapters_of(lr[0])
    return {name: path for x in lr for name, path in adapters_of(x).items()}


def compare_cases(llm: LLM, prompts: list[list[int]], cases: dict, new_tokens: int, repeats: int,
                  floors: dict[str, float]) -> None:
    """Time ``cases`` (name -> lora_request; the first is the baseline) in alternating repeats and print a table of
    median tok/s, the ratio to the first case, and the fraction of each case's floor tok/s (``floors``)."""
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    total = len(prompts) * new_tokens
    times: dict[str, list[float]] = {k: [] for k in cases}
    for lr in cases.values():  # warm-up: every adapter resident
        llm.generate(prompt_token_ids=prompts[:4], sampling_params=SamplingParams(max_tokens=2),
                     lora_request=lr[:4] if isinstance(lr, list) and len(lr) == len(prompts) else lr, use_tqdm=False)
    for _ in range(repeats):
        for name, lr in cases.items():
            t = time.perf_counter()
            llm.generate(prompt_token_ids=prompts, sampling_params=sp, lora_request=lr, use_tqdm=False)
            times[name].append(time.perf_counter() - t)
    first = total / statistics.median(next(iter(times.values())))
    print(f"# SmolLM2-135M-Instruct, bf16, {len(prompts)} prompts x {new_tokens} tokens, median of {repeats}")
    print("| rows | tok/s | vs base | floor tok/s | of floor |\n|---|---|---|---|---|")
    for name in cases:
        tps = total / statistics.median(times[name])
        print(f"| {name} | {tps:.1f} | {tps / first:.0%} | {floors[name]:.1f} | {tps / floors[name]:.0%} |")


if __name__ == "__main__":
    main()
