"""int8 and int4 weight-only bases vs the unquantized base, side by side in one run (embedded SmolLM2).

    python benchmarks/bench_quant.py [--dtype auto] [--prompts 32] [--new-tokens 64] [--adapters 8]

Reported: batch-1 decode tok/s and ``--prompts``-prompt throughput for each, the weight bytes, and each case's
floor (``roofline.py``, measured in the run: the bytes a step reads — weights as stored, int8 1 byte a value, int4
half a byte plus scales, and the adapters used — over the read bandwidth, or its FLOPs over the compute dtype's
matmul rate) with the fraction reached; and accuracy: greedy token agreement with
the unquantized model (teacher-forced on its tokens, so one early flip does not count the whole tail) and the mean
per-token KL(unquantized ‖ int8) over the same positions. With ``--adapters N``, the speeds are measured again
with every request on one of N random rank-16 all-linear adapters (LoRA on top of the quantized base).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from loraplex import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402
from bench_engine import QUESTIONS  # noqa: E402
from bench_lora import write_random_adapter  # noqa: E402


def rate(llm: LLM, prompts: list[list[int]], n: int, loras: list | None = None) -> float:
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    per = None if not loras else [loras[i % len(loras)] for i in range(len(prompts))]
    # warm-up on the same batch (first uses of a step size: kernel plans, scratch buffers, oneDNN primitives)
    llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=2), use_tqdm=False,
                 lora_request=per)
    t = time.perf_counter()
    llm.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False, lora_request=per)
    return len(prompts) * n / (time.perf_counter() - t)


def accuracy(ref: LLM, quant: LLM, prompts: list[list[int]], n: int) -> tuple[float, float]:
    """Teacher-forced on the reference's greedy tokens: top-1 agreement and mean KL(ref ‖ quant) per position."""
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    outs = ref.generate(prompt_token_ids=prompts, sampling_params=sp, use_tqdm=False)
    agree = total = 0
    kl = 0.0
    for prompt, out in zip(prompts, outs):
        seq = prompt + out.outputs[0].token_ids
        lp = {}
        for name, llm in (("ref", ref), ("q", quant)):
            eng, model = llm.llm_engine, llm.llm_engine.runner.model
            with torch.inference_mode():
                hidden = _forward(eng, seq)
                lp[name] = torch.log_softmax(model.compute_logits(hidden[len(prompt) - 1:-1]), dim=-1)
        agree += (lp["ref"].argmax(-1) == lp["q"].argmax(-1)).sum().item()
        total += n
        kl += (lp["ref"].exp() * (lp["ref"] - lp["q"])).sum(-1).sum().item()
    return agree / total, kl / total


def _forward(engine, ids: list[int]) -> torch.Tensor:
    """All hidden states of one sequence through the engine's own runner (a one-row prefill on scratch KV)."""
    from loraplex.scheduler.output import ScheduledRequest

    bs = engine.config.cache.block_size
    table = list(range(-(-len(ids) // bs)))
    row = ScheduledRequest("acc", ids, 0, table, True, SamplingParams(), None, ids, [])
    runner = engine.runner
    input_ids, pos, meta, _ = runner.prepare([row])
    hidden = runner.model(input_ids, pos, runner.kv_caches, meta, None)
    engine.reset_prefix_cache()  # those blocks now hold this scratch sequence
    return hidden


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=0)
    args = ap.parse_args()
    kw = dict(dtype=args.dtype, max_model_len=1024, enable_lora=args.adapters > 0, max_loras=max(args.adapters, 1))
    ref = LLM(**kw)
    quants = {m: LLM(quantization=m, **kw) for m in ("int8", "int4")}
    loras = []
    if args.adapters:
        import tempfile

        from loraplex import LoRARequest

        tmp = Path(tempfile.mkdtemp(prefix="loraplex-quant-"))
        for i in range(args.adapters):
            write_random_adapter(tmp / f"a{i}", ref.llm_engine.loaded.spec, 16, seed=i)
            loras.append(LoRARequest(f"a{i}", i + 1, str(tmp / f"a{i}")))
    tok = ref.get_tokenizer()
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": f"{q} ({i})"}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)
               for i in range(args.prompts // len(QUESTIONS) + 1) for q in QUESTIONS][:args.prompts]
    spec, dtype = ref.llm_engine.loaded.spec, ref.llm_engine.config.model.dtype
    rows = len(prompts)
    roof = roofline.Roofline.measure(roofline.model_shapes(spec), dtype, rows=(1, rows))
    print(roof.header())
    print(f"dtype {str(dtype).removeprefix('torch.')} (int8 / int4 computed in it too)")
    print(f"| base | weight MB | batch-1 tok/s | floor tok/s | of floor | {args.prompts} prompts tok/s | floor tok/s | "
          "of floor | vs unquantized (b1 / batch) |")
    print("|---|---|---|---|---|---|---|---|---|")
    weights = {name: roofline.weight_bytes(llm.llm_engine.runner.model) for name, llm in (("unquantized", ref),
                                                                                          *quants.items())}
    base = None
    for name, llm in (("unquantized", ref), *quants.items()):
        b1, many = rate(llm, prompts[:1], args.new_tokens), rate(llm, prompts, args.new_tokens // 2)
        f1, fm = roof.decode_floor(spec, weights[name], 1), roof.decode_floor(spec, weights[name], rows)
        base = base or (b1, many)
        print(f"| {name} | {weights[name] / 1e6:.0f} | {b1:.1f} | {f1:.1f} | {b1 / f1:.0%} | {many:.1f} | {fm:.1f} | "
              f"{many / fm:.0%} | {b1 / base[0]:.2f}x / {many / base[1]:.2f}x |")
    if loras:
        # batch 1 reads one adapter; the batch as many as its rows use (adapter i mod N)
        one = roofline.lora_bytes(spec, 16, dtype.itemsize)
        used = min(len(loras), rows) * one
        print(f"\nwith {len(loras)} rank-16 all-linear adapters (request i on adapter i mod {len(loras)}):")
        print(f"| base | batch-1 tok/s | floor tok/s | of floor | {args.prompts} prompts tok/s | floor tok/s | "
              "of floor | vs unquantized (b1 / batch) |\n|---|---|---|---|---|---|---|---|")
        base = None
        for name, llm in (("unquantized", ref), *quants.items()):
            b1, many = rate(llm, prompts[:1], args.new_tokens, loras), rate(llm, prompts, args.new_tokens // 2, loras)
            f1 = roof.decode_floor(spec, weights[name] + one, 1)
            fm = roof.decode_floor(spec, weights[name] + used, rows)
            base = base or (b1, many)
            print(f"| {name} | {b1:.1f} | {f1:.1f} | {b1 / f1:.0%} | {many:.1f} | {fm:.1f} | {many / fm:.0%} | "
                  f"{b1 / base[0]:.2f}x / {many / base[1]:.2f}x |")
    print()
    for name, quant in quants.items():
        agree, kl = accuracy(ref, quant, prompts, args.new_tokens)
        print(f"{name} vs unquantized, teacher-forced over {args.prompts} x {args.new_tokens} tokens: greedy "
              f"agreement {agree:.1%}, mean KL {kl:.4f}")


if __name__ == "__main__":
    main()
