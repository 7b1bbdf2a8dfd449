"""The decode step's weight kernels alone, side by side in one run, on SmolLM2's projection shapes (30 layers of
q|k|v 576→960, o 576→576, gate|up 576→3072, down 1536→576; random weights, no model load).

    python benchmarks/bench_kernels.py [--tokens 1 8 32] [--rounds 15]

1. GEMV per step size: the bf16 C GEMV (the baseline) against int8's two forms and the int4 panels (groups of 32
   with fp16 pairs, as the embedded GGUF loads; and groups of 128), each over the whole 30-layer sequence; ms per
   step (medians of alternating rounds, each call through its Python wrapper), GB/s of the bytes read, and the
   ratio to bf16.
2. The C BGMV over 32 tokens through all-linear rank-16 stacks of 30 layers (bf16): one adapter on every token, 8 and
   32 distinct adapters; ms per step and the adapters' bytes over it.
The read bandwidth (``roofline.read_bandwidth``) is measured in the same run. The weights sit in ordinary 4 KB pages
here (the engine moves its own into huge pages), so GB/s run below an engine step's.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from loraplex.ops import dense_cpu, lora_cpu, quant
from roofline import cpu_model, read_bandwidth

LAYERS = 30
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out) per layer
SLICES = {576: [576, 192, 192], 3072: [1536, 1536]}  # how the stacked projections split into LoRA slices


def alternate(cases: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each case, the cases run in turn each round."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def gemv_cases(tokens: int) -> tuple[dict, dict[str, int]]:
    g = torch.Generator().manual_seed(tokens)
    layers = {"bf16": [], "int8": [], "int4 g32 fp16 pairs": [], "int4 g128": []}
    for _ in range(LAYERS):
        for n_in, n_out in SHAPES:
            w = torch.randn(n_out, n_in, generator=g) * 0.05
            x = torch.randn(tokens, n_in, generator=g).bfloat16()
            layers["bf16"].append((w.bfloat16(), x))
            layers["int8"].append((*quant.quantize_int8(w), x))
            layers["int4 g32 fp16 pairs"].append((*quant.pack_int4(*quant.quantize_int4(w, 32)), 32, x))
            group = quant.int4_group_size(n_in, 128)
            layers["int4 g128"].append((*quant.pack_int4(*quant.quantize_int4(w, group)), group, x))
    cases = {
        "bf16": lambda: [dense_cpu.gemv(x, w) for w, x in layers["bf16"]],
        "int8": lambda: [dense_cpu.gemv_int8(x, wq, s) for wq, s, x in layers["int8"]],
        "int8 tiled": lambda: [dense_cpu.gemv_int8(x, wq, s, tiled=True) for wq, s, x in layers["int8"]],
    }
    for name in ("int4 g32 fp16 pairs", "int4 g128"):
        cases[name] = lambda name=name: [dense_cpu.gemv_int4(x, p, so, gr) for p, so, gr, x in layers[name]]
    nbytes = {name: sum(t.numel() * t.element_size() for row in rows for t in row[:-1] if torch.is_tensor(t))
              for name, rows in layers.items()}
    nbytes["int8 tiled"] = nbytes["int8"]
    return cases, nbytes


def bgmv_cases(tokens: int = 32, rank: int = 16, slots: int = 33) -> tuple[dict, int]:
    g = torch.Generator().manual_seed(0)
    stacks = []
    for _ in range(LAYERS):
        for n_in, n_out in SHAPES:
            sizes = SLICES.get(n_out if n_in == 576 and n_out != 576 else 0, [n_out])
            a = (torch.randn(slots, len(sizes) * rank, n_in, generator=g) * 0.05).bfloat16()
            bts = [(torch.randn(slots, rank, s, generator=g) * 0.05).bfloat16() for s in sizes]
            out_slices = [(sum(sizes[:i]), s) for i, s in enumerate(sizes)]
            stacks.append((a, bts, out_slices, torch.randn(tokens, n_in, generator=g).bfloat16(),
                           torch.zeros(tokens, sum(sizes)).bfloat16()))
    ranks = torch.full((slots,), rank, dtype=torch.int32)
    ranks[0] = 0
    cases = {}
    for name, distinct in (("one adapter", 1), ("8 distinct", 8), ("32 distinct", 32)):
        sl = (torch.arange(tokens) % distinct + 1).view(tokens, 1)
        cases[name] = lambda sl=sl: [lora_cpu.add_lora_bgmv_cpu(y, x, a, bts, out, sl, None, ranks)
                                     for a, bts, out, x, y in stacks]
    one = sum(t[0].numel() * 2 // slots + sum(b.numel() * 2 // slots for b in t[1]) for t in stacks)
    return cases, one


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    if not (dense_cpu.available(torch.zeros(1, dtype=torch.bfloat16)) and lora_cpu.available(torch.zeros(1))):
        print("the C kernels are not built on this machine: nothing to measure")
        return
    model, flags = cpu_model()
    bw = read_bandwidth()
    print(f"# {model} [{' '.join(f for f in flags if 'avx512' in f or f == 'avx2')}], {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}; read bandwidth {bw / 1e9:.1f} GB/s")
    print("| step tokens | weights | MB | ms per step (30 layers) | GB/s | vs bf16 |")
    print("|---|---|---|---|---|---|")
    for tokens in args.tokens:
        cases, nbytes = gemv_cases(tokens)
        times = alternate(cases, args.rounds)
        for name, t in times.items():
            print(f"| {tokens} | {name} | {nbytes[name] / 1e6:.1f} | {t * 1e3:.2f} | {nbytes[name] / t / 1e9:.1f} | "
                  f"{times['bf16'] / t:.2f}x |")
    cases, one = bgmv_cases()
    times = alternate(cases, args.rounds)
    print("\n| C BGMV, 32 tokens, rank 16 all-linear | adapter MB read | ms per step (30 layers) | GB/s |")
    print("|---|---|---|---|")
    for name, t in times.items():
        mb = one * {"one adapter": 1, "8 distinct": 8, "32 distinct": 32}[name]
        print(f"| {name} | {mb / 1e6:.1f} | {t * 1e3:.2f} | {mb / t / 1e9:.1f} |")


if __name__ == "__main__":
    main()
