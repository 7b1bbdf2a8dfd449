"""Structured outputs: 32 concurrent requests with a JSON schema vs the same 32 without, side by side in one run.

    python benchmarks/bench_structured.py [--dtype auto] [--repeats 5] [--new-tokens 64]

All 32 requests are in flight together (one continuous batch) on the embedded SmolLM2; the two runs alternate
(the machine's speed drifts between runs; medians are compared). Reported: generated tok/s
(tokens over wall time) of each run and their ratio, the time spent building and applying the grammar masks per
step, the schema compile time (first: a fresh compiler; cached: the same schema again), and the fraction of the
decode floor at 32 rows (``roofline.py``, measured in this run after the timed runs: the weights over the read
bandwidth, or the FLOPs over the matmul rate at the model's shapes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import loraplex.sampling.sampler as sampler_mod
from loraplex import LLM, SamplingParams
from loraplex.sampling.grammar import GrammarCompiler
from loraplex.sampling_params import StructuredOutputsParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
    "hobbies": {"type": "array", "items": {"type": "string"}},
    "employed": {"type": "boolean"}, "summary": {"type": "string"}},
    "required": ["name", "age", "city", "hobbies", "employed", "summary"], "additionalProperties": False}
PEOPLE = ["a retired teacher from Lyon", "a young software engineer in Seoul", "a farmer near Nairobi",
          "a chef who moved to Lima", "a student of music in Vienna", "a nurse working nights in Toronto",
          "a fisherman from Bergen", "a painter living in Oaxaca"]


class MaskTimer:
    """Wall time inside the sampler's grammar masking (bitmask fill + apply), per call."""

    def __init__(self) -> None:
        self.calls, self.seconds, self._orig = 0, 0.0, sampler_mod.apply_grammar_masks

    def __enter__(self):
        def timed(*a):
            t = time.perf_counter()
            self._orig(*a)
            self.seconds += time.perf_counter() - t
            self.calls += 1
        sampler_mod.apply_grammar_masks = timed
        return self

    def __exit__(self, *exc) -> None:
        sampler_mod.apply_grammar_masks = self._orig


def run(llm: LLM, prompts: list[list[int]], sp: SamplingParams) -> tuple[float, int]:
    t = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return n / (time.perf_counter() - t), n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    llm = LLM(dtype=args.dtype, max_model_len=1024)
    engine = llm.llm_engine
    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": f"Describe {p} as a JSON object with name, age, city, hobbies, employed and "
                                     f"summary. Variant {i}."}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False) for i in range(4) for p in PEOPLE]
    spec = StructuredOutputsParams(json=SCHEMA)

    fresh = GrammarCompiler(tok, engine.loaded.spec.vocab_size, sorted(engine.loaded.eos_token_ids))
    t = time.perf_counter()
    fresh.compile(spec)
    first = time.perf_counter() - t
    t = time.perf_counter()
    fresh.compile(StructuredOutputsParams(json=json.loads(json.dumps(SCHEMA))))
    cached = time.perf_counter() - t

    free = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)  # every row runs every step
    constrained = SamplingParams(temperature=0, max_tokens=args.new_tokens, structured_outputs=spec)
    run(llm, prompts[:4], free)  # warm-up (and the engine's own compile of the schema)
    run(llm, prompts[:4], constrained)
    rates: dict[str, list[float]] = {"free": [], "json_schema": []}
    tokens: dict[str, int] = {}
    mask = MaskTimer()
    for _ in range(args.repeats):
        for name, sp in (("free", free), ("json_schema", constrained)):
            if name == "json_schema":
                with mask:
                    rate, tokens[name] = run(llm, prompts, sp)
            else:
                rate, tokens[name] = run(llm, prompts, sp)
            rates[name].append(rate)

    dtype, model_spec, rows = engine.config.model.dtype, engine.loaded.spec, len(prompts)
    roof = roofline.Roofline.measure(roofline.model_shapes(model_spec), dtype, rows=(rows,))
    floor = roof.decode_floor(model_spec, roofline.weight_bytes(engine.runner.model), rows)
    print(roof.header())
    print(f"dtype {str(dtype).removeprefix('torch.')}; {rows} requests in flight, {args.new_tokens} max new tokens, "
          f"greedy; median of {args.repeats}")
    print("| run | generated tokens | tok/s | vs free | floor tok/s | of floor |")
    print("|---|---|---|---|---|---|")
    free_tps = statistics.median(rates["free"])
    for name in rates:
        tps = statistics.median(rates[name])
        print(f"| {name} | {tokens[name]} | {tps:.1f} | {tps / free_tps:.2f}x | {floor:.1f} | {tps / floor:.0%} |")
    print(f"\nmask (fill + apply, 32 rows): {mask.seconds / max(mask.calls, 1) * 1e3:.2f} ms per step over "
          f"{mask.calls} steps; schema compile: first {first * 1e3:.1f} ms, cached {cached * 1e6:.0f} us")


if __name__ == "__main__":
    main()
