"""Prefix caching, keyed by adapter: caching on vs off, side by side in one run.

    python benchmarks/bench_prefix_cache.py [--dtype bfloat16] [--repeats 1] [--in-flight 8]

Shared workload: 64 requests over 4 random rank-16 all-linear adapters; each adapter has its own 512-token system
prompt, each request its own short question, 16 new tokens; ``--in-flight`` requests run at once, the next one is
admitted as one finishes (adapters in turn). Reported: TTFT p50 (add_request → first token) and generated tok/s.
No-sharing workload: 64 distinct ~60-token prompts on the base: what caching costs when nothing repeats.
The cache is emptied before every timed run, so each run starts cold. Each tok/s is shown against the decode floor
of ``--in-flight`` rows (``roofline.py``, measured after the timed runs: the weights and the adapters the workload
uses over the read bandwidth, or the FLOPs over the matmul rate; prefill, most of the shared workload, not counted).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from loraplex import LLM, LoRARequest, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402
from bench_lora import QUESTIONS, write_random_adapter  # noqa: E402

PARAGRAPH = ("You are a meticulous assistant for a regional utility company. Answer in plain language, cite the "
             "relevant policy section when you can, never invent account details, and keep every answer under "
             "five sentences unless the customer asks for more. ")


def run(engine, prompts: list[list[int]], loras: list, sp: SamplingParams, in_flight: int) -> tuple[float, float]:
    """Continuous arrivals; returns (TTFT p50 in seconds, generated tok/s)."""
    engine.reset_prefix_cache()
    t0, nxt, live, ttft = time.perf_counter(), 0, {}, []
    done = 0
    while done < len(prompts):
        while len(live) < in_flight and nxt < len(prompts):
            rid = engine.add_request(prompts[nxt], sp, lora_request=loras[nxt])
            live[rid] = time.perf_counter()
            nxt += 1
        for out in engine.step():
            if out.request_id in live and out.outputs[0].token_ids and live[out.request_id] is not None:
                ttft.append(time.perf_counter() - live[out.request_id])
                live[out.request_id] = None
            if out.finished:
                live.pop(out.request_id, None)
                done += 1
    return statistics.median(ttft), len(prompts) * sp.max_tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--in-flight", type=int, default=8)
    args = ap.parse_args()
    kw = dict(dtype=args.dtype, max_model_len=1024, enable_lora=True, max_loras=4)
    engines = {"off": LLM(enable_prefix_caching=False, **kw).llm_engine, "on": LLM(**kw).llm_engine}
    tok = engines["on"].tokenizer
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-prefix-"))
    adapters = []
    for i in range(4):
        write_random_adapter(tmp / f"a{i}", engines["on"].loaded.spec, 16, i)
        adapters.append(LoRARequest(f"a{i}", i + 1, str(tmp / f"a{i}")))
    systems = [(tok.encode(f"[expert {i}] " + PARAGRAPH * 20))[:512] for i in range(4)]
    shared = [systems[i % 4] + tok.encode(f" Q{i}: {QUESTIONS[i % 8]}", add_special_tokens=False) for i in range(64)]
    shared_loras = [adapters[i % 4] for i in range(64)]
    distinct = [tok.encode(f"({i}) " + " ".join(QUESTIONS[(i + j) % 8] for j in range(8)) + f" {i * 7919}")[:100]
                for i in range(64)]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for e in engines.values():  # warm-up
        run(e, shared[:8], shared_loras[:8], sp, args.in_flight)
    rows = {"shared": {"off": [], "on": []}, "distinct": {"off": [], "on": []}}
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            rows["shared"][mode].append(run(engines[mode], shared, shared_loras, sp, args.in_flight))
            rows["distinct"][mode].append(run(engines[mode], distinct, [None] * 64, sp, args.in_flight))
    med = {w: {m: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for m, v in d.items()}
           for w, d in rows.items()}
    engine = engines["on"]
    spec, dtype = engine.loaded.spec, engine.config.model.dtype
    weights = roofline.weight_bytes(engine.runner.model)
    roof = roofline.Roofline.measure(roofline.model_shapes(spec), dtype, rows=(args.in_flight,))
    # a step holds at most --in-flight rows, so at most that many of the 4 adapters
    floor = {"shared": roof.decode_floor(spec, weights + min(4, args.in_flight) * roofline.lora_bytes(
                 spec, 16, dtype.itemsize), args.in_flight),
             "distinct": roof.decode_floor(spec, weights, args.in_flight)}
    print(roof.header())
    print(f"{args.dtype}, in flight {args.in_flight}, system prompts {[len(s) for s in systems]} tokens, no-sharing "
          f"prompts ~{len(distinct[0])} tokens")
    print("| workload | caching | TTFT p50 ms | tok/s | decode floor tok/s | of floor |\n|---|---|---|---|---|---|")
    for w in rows:
        for m in ("off", "on"):
            print(f"| {w} | {m} | {med[w][m][0] * 1000:.0f} | {med[w][m][1]:.1f} | {floor[w]:.1f} | "
                  f"{med[w][m][1] / floor[w]:.0%} |")
    s, d = med["shared"], med["distinct"]
    print(f"shared: TTFT {s['off'][0] / s['on'][0]:.1f}x lower, throughput {s['on'][1] / s['off'][1]:.2f}x; "
          f"no sharing: throughput with caching {d['on'][1] / d['off'][1]:.1%} of without")


if __name__ == "__main__":
    main()
