"""What a compiled decode step would buy: the decoder's forward eager vs ``torch.compile`` (inductor, C++ backend),
the paged attention kept opaque as a custom op so the whole layer stack is one graph, base model, decode-only steps.

    python benchmarks/bench_compiled_step.py [--batch 1 32] [--dtype bfloat16] [--context 100]

Prints per batch size: the first (compiling) call, ms per step eager and compiled (best of 5 rounds, alternating),
their ratio, and how far the compiled hidden states are from the eager ones. This is the measurement behind the
engine staying eager (docs/benchmarks.md, "Engine speed"); it patches the attention call in this process only.
"""
from __future__ import annotations

import argparse
import time

import torch

import loraplex.models.transformer as transformer
from loraplex import LLM
from loraplex.layers.attention import AttentionMetadata, paged_attention


@torch.library.custom_op("loraplex_bench::paged_decode", mutates_args=("k_cache", "v_cache"))
def paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, kv_slots: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
    meta = AttentionMetadata(slot_mapping, q.shape[0], kv_slots, lens)
    return paged_attention(q, k, v, k_cache, v_cache, meta, scale).clone()


@paged_decode.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, kv_slots, lens, scale):
    return torch.empty_like(q)


def _opaque_attention(q, k, v, k_cache, v_cache, meta, scale):
    return paged_decode(q, k, v, k_cache, v_cache, meta.slot_mapping, meta.decode_kv_slots, meta.decode_lens, scale)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--context", type=int, default=100)
    args = ap.parse_args()
    llm = LLM(dtype=args.dtype)
    runner = llm.llm_engine.runner
    model, kv = runner.model, runner.kv_caches
    compiled = torch.compile(model.forward, dynamic=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, context {args.context}")
    print("| batch | first compiled call s | eager ms/step | compiled ms/step | eager / compiled | max rel. diff |")
    print("|---|---|---|---|---|---|")
    for b in args.batch:
        n = args.context
        ids, pos = torch.randint(0, 1000, (b,)), torch.full((b,), n - 1)
        slots = torch.arange(b * n).view(b, n)
        meta = AttentionMetadata(slots[:, -1].contiguous(), b, slots, torch.full((b,), n))
        torch._C._set_mkldnn_enabled(b > runner.kernels.gemv_tokens)  # as the runner does for this step size

        def eager():
            return model.forward(ids, pos, kv, meta)

        def fused():
            transformer.paged_attention = _opaque_attention
            try:
                return compiled(ids, pos, kv, meta)
            finally:
                transformer.paged_attention = paged_attention

        with torch.inference_mode():
            t = time.perf_counter()
            out = fused()
            first = time.perf_counter() - t
            ref = eager()
            diff = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            best = {"eager": float("inf"), "fused": float("inf")}
            for _ in range(5):
                for name, fn in (("eager", eager), ("fused", fused)):
                    reps = 20 if b == 1 else 5
                    t = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    best[name] = min(best[name], (time.perf_counter() - t) / reps)
        print(f"| {b} | {first:.1f} | {best['eager'] * 1e3:.2f} | {best['fused'] * 1e3:.2f} | "
              f"{best['eager'] / best['fused']:.2f}x | {diff:.2e} |", flush=True)


if __name__ == "__main__":
    main()
