"""Router overhead per request on CPU: ``Router.route`` over the labelled eval prompts, both scorers.

    python benchmarks/bench_router.py [--repeats 20]

For each scorer: the time to build the router with the three demo adapters' cards (the embedding model load is
timed apart), then p50 / p99 of one ``route(prompt, system)`` call over every eval prompt (``--repeats`` rounds),
called directly and through ``asyncio.to_thread`` as the server does for the embedding scorer; "busy" repeats the
direct calls while another thread keeps both cores on 2-thread matmuls (an engine stepping beside the router).
Also prints each scorer's accuracy on the eval set.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.routing.evalset: the labelled prompts

from loraplex.routing import EmbeddingScorer, LexicalScorer, embedding_model_dir
from loraplex.routing.scorers import _load, _native_bf16
from tests.routing.evalset import demo_router, evaluate, load_eval


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


class Busy:
    """A thread running 2-thread 512x512 matmuls back to back (what an engine step does to the cores)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        a = torch.randn(512, 512)
        while not self.stop.is_set():
            a @ a

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def timed(router, items, repeats: int, via_thread: bool = False) -> list[float]:
    async def one(it):
        t = time.perf_counter()
        await asyncio.to_thread(router.route, it.prompt, it.system)
        return time.perf_counter() - t

    async def all_threaded():
        return [await one(it) for _ in range(repeats) for it in items]

    if via_thread:
        return asyncio.run(all_threaded())
    out = []
    for _ in range(repeats):
        for it in items:
            t = time.perf_counter()
            router.route(it.prompt, it.system)
            out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    items = load_eval()
    scorers = {"lexical": LexicalScorer}
    if embedding_model_dir() is not None:
        dtypes = ["bfloat16", "float32"] if _native_bf16() else ["float32"]  # "auto" picks the first
        scorers = {f"embedding {d}": (lambda d=d: EmbeddingScorer(dtype=d)) for d in dtypes} | scorers
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {len(items)} eval prompts x {args.repeats}")
    if embedding_model_dir() is not None:
        t = time.perf_counter()
        _load(str(embedding_model_dir()), "float32")
        print(f"all-MiniLM-L6-v2 load: {1e3 * (time.perf_counter() - t):.0f} ms")
    print("| scorer | build (3 cards) ms | route p50 ms | route p99 ms | via to_thread p50 / p99 ms "
          "| busy cores p50 / p99 ms | accuracy |")
    print("|---|---|---|---|---|---|---|")
    for kind, make in scorers.items():
        t = time.perf_counter()
        router = demo_router(make())
        build = time.perf_counter() - t
        timed(router, items, 1)  # warm-up
        direct = timed(router, items, args.repeats)
        threaded = timed(router, items, max(1, args.repeats // 4), via_thread=True)
        with Busy():
            busy = timed(router, items, max(1, args.repeats // 4))
        acc, _ = evaluate(router, items)
        ms = lambda xs, q: 1e3 * pct(xs, q)
        print(f"| {kind} | {1e3 * build:.1f} | {ms(direct, .5):.2f} | {ms(direct, .99):.2f} | "
              f"{ms(threaded, .5):.2f} / {ms(threaded, .99):.2f} | {ms(busy, .5):.2f} / {ms(busy, .99):.2f} | "
              f"{acc:.3f} |")


if __name__ == "__main__":
    main()
