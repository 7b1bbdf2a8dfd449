"""Engine-core benchmark: loraplex vs transformers `generate` on the embedded SmolLM2, same prompts, one run.

    python benchmarks/bench_engine.py [--dtype bfloat16] [--new-tokens 64] [--batch 32] [--repeats 3]

Prints a markdown table and the memory-bandwidth floor for batch-1 decode. "end-to-end" is generated tokens over the
whole call (prefill included); "decode" is ``B * (N - 1) / (t(N) - t(1))``, i.e. the prefill taken out.
Runs alternate between the two engines and report the median, so machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from loraplex import LLM, SamplingParams
from loraplex.models.registry import resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402

QUESTIONS = ["Who are you?", "What is the capital of France?", "Write a short poem about autumn.",
             "Explain photosynthesis to a child.", "List three uses of copper.", "What is 17 times 23?",
             "Give me a recipe for pancakes.", "Why is the sky blue?"]


def hf_generate(model, tok, prompts: list[list[int]], new_tokens: int) -> float:
    """transformers padded batch generate (left padding); returns seconds."""
    width = max(map(len, prompts))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, pad_token_id=pad)
    return time.perf_counter() - t


def ours_generate(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    t = time.perf_counter()
    llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    llm = LLM(dtype=args.dtype, max_model_len=1024)
    tok = llm.get_tokenizer()
    src = resolve_model(None)
    hf = AutoModelForCausalLM.from_pretrained(str(src.path), gguf_file=src.gguf_file, dtype=dtype).eval()
    chats = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + " " * (i // 8)}],
                                     tokenize=False, add_generation_prompt=True) for i in range(args.batch)]
    prompts = [tok.encode(c, add_special_tokens=False) for c in chats]
    cases = {"batch 1": prompts[:1], f"batch {args.batch}": prompts}
    engines = {"transformers": lambda ps, n: hf_generate(hf, tok, ps, n),
               "loraplex": lambda ps, n: ours_generate(llm, ps, n)}
    e2e: dict[tuple[str, str], list[float]] = {(c, e): [] for c in cases for e in engines}
    decode: dict[tuple[str, str], list[float]] = {(c, e): [] for c in cases for e in engines}
    for name, ps in cases.items():  # warm-up
        for run in engines.values():
            run(ps, 4)
    for _ in range(args.repeats):
        for name, ps in cases.items():
            for eng, run in engines.items():
                t_full, t_one = run(ps, args.new_tokens), run(ps, 1)
                e2e[name, eng].append(len(ps) * args.new_tokens / t_full)
                decode[name, eng].append(len(ps) * (args.new_tokens - 1) / (t_full - t_one))

    model = llm.llm_engine.runner.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    spec = llm.llm_engine.loaded.spec
    roof = roofline.Roofline.measure(roofline.model_shapes(spec), model.dtype, rows=(1, args.batch))
    # a decode step reads every weight once and multiplies them by its rows: the floor per generated token
    floor = {name: len(ps) / roof.floor_seconds(weight_bytes, roofline.forward_flops(spec, len(ps)), len(ps))
             for name, ps in cases.items()}
    print(roof.header())
    print(f"dtype {args.dtype}; {args.new_tokens} new tokens; median of {args.repeats}; weights "
          f"{weight_bytes / 1e6:.0f} MB")
    print("| case | measure | transformers tok/s | loraplex tok/s | ratio | floor tok/s | loraplex of floor |")
    print("|---|---|---|---|---|---|---|")
    for name in cases:
        for label, table in (("end-to-end", e2e), ("decode", decode)):
            hf_tps, our_tps = (statistics.median(table[name, e]) for e in engines)
            print(f"| {name} | {label} | {hf_tps:.1f} | {our_tps:.1f} | {our_tps / hf_tps:.2f}x | "
                  f"{floor[name]:.1f} | {our_tps / floor[name]:.0%} |")


if __name__ == "__main__":
    main()
