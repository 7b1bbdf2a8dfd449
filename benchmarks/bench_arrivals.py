"""Continuous arrivals, offline: 16 requests in flight, a new one admitted as each finishes (64 × 32 tokens).

    python benchmarks/bench_arrivals.py [--repeats 2]

Base-only vs one random rank-16 all-linear adapter on every request, on the embedded SmolLM2 in bf16: the
arrival pattern of the serving benchmark without HTTP (steps mix new prefill chunks with decodes). Each rate is
shown against the decode floor of ``--in-flight`` rows (``roofline.py``, measured in the run before the timed runs:
the weights, and the adapter, over the read bandwidth, or the FLOPs over the matmul rate; prefill not counted).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from loraplex import LLM, LoRARequest, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402
from bench_lora import QUESTIONS, write_random_adapter  # noqa: E402


def run_arrivals(engine, prompts: list[list[int]], sp: SamplingParams, loras: list, in_flight: int) -> float:
    """Keep ``in_flight`` requests running, admitting the next prompt (adapter: ``loras`` in turn) as each finishes;
    returns generated tok/s."""
    t, nxt, live, done = time.perf_counter(), 0, 0, 0
    while done < len(prompts):
        while live < in_flight and nxt < len(prompts):
            engine.add_request(prompts[nxt], sp, lora_request=loras[nxt % len(loras)])
            nxt, live = nxt + 1, live + 1
        for out in engine.step():
            if out.finished:
                live, done = live - 1, done + 1
    return len(prompts) * sp.max_tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--in-flight", type=int, default=16)
    args = ap.parse_args()
    llm = LLM(dtype="bfloat16", max_model_len=1024, enable_lora=True, max_loras=4)
    engine, tok = llm.llm_engine, llm.get_tokenizer()
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-arrivals-"))
    write_random_adapter(tmp / "a", engine.loaded.spec, 16, 0)
    adapter = LoRARequest("a", 1, str(tmp / "a"))
    prompts = [tok.encode(f"{QUESTIONS[i % 8]} ({i})") for i in range(64)]
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)

    def run(lora) -> float:
        return run_arrivals(engine, prompts, sp, [lora], args.in_flight)

    run(adapter), run(None)  # warm-up
    spec, dtype = engine.loaded.spec, engine.config.model.dtype
    weights = roofline.weight_bytes(engine.runner.model)
    roof = roofline.Roofline.measure(roofline.model_shapes(spec), dtype, rows=(args.in_flight,))
    floor_base = roof.decode_floor(spec, weights, args.in_flight)
    floor_lora = roof.decode_floor(spec, weights + roofline.lora_bytes(spec, 16, dtype.itemsize), args.in_flight)
    print(roof.header())
    print(f"decode floor at {args.in_flight} rows: base-only {floor_base:.0f} tok/s, one adapter "
          f"{floor_lora:.0f} tok/s")
    for _ in range(args.repeats):
        base, lora = run(None), run(adapter)
        print(f"base-only {base:.0f} tok/s ({base / floor_base:.0%} of floor), one adapter {lora:.0f} tok/s "
              f"({lora / floor_lora:.0%} of floor): {lora / base:.0%}")


if __name__ == "__main__":
    main()
