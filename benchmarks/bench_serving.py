"""Serving benchmark: N concurrent streaming clients over loopback against ``loraplex serve``.

    python benchmarks/bench_serving.py [--clients 16] [--requests 64] [--new-tokens 32] [--adapters 1 8 32 128]

The server (a subprocess, the embedded SmolLM2, bf16) serves random rank-16 all-linear adapters from an
``--adapter-dir``; each run sends ``--requests`` completions, the adapter of each drawn uniformly or Zipf(1.1)
from the first N adapters, plus a base-only run as the baseline. Reports generated tok/s, TTFT and inter-token
latency p50/p99 (client side, from SSE chunk arrival times), and each run's decode floor at ``--clients`` rows
(``roofline.py``, measured before the server starts: the weights in the server's dtype and the adapters a step can
hold, at most one per client, over the read bandwidth, or the FLOPs over the matmul rate) with the fraction reached.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402
from bench_lora import QUESTIONS, write_random_adapter  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def one(client: httpx.AsyncClient, model: str, prompt: str, n_tokens: int, stats: dict) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    t0 = time.perf_counter()
    last, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            if last is None:
                stats["ttft"].append(now - t0)
            else:
                stats["itl"].append(now - last)
            last = now
            tokens += 1 if json.loads(line[6:])["choices"] else 0
    stats["tokens"] += n_tokens


async def run(url: str, models: list[str], args) -> dict:
    stats = {"ttft": [], "itl": [], "tokens": 0}
    sem = asyncio.Semaphore(args.clients)
    prompts = [f"{QUESTIONS[i % len(QUESTIONS)]} ({i})" for i in range(args.requests)]

    async def worker(i: int, client: httpx.AsyncClient) -> None:
        async with sem:
            await one(client, models[i], prompts[i], args.new_tokens, stats)

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t = time.perf_counter()
        await asyncio.gather(*(worker(i, client) for i in range(args.requests)))
        stats["wall"] = time.perf_counter() - t
    return stats


def draw(names: list[str], n: int, zipf: bool, rng: random.Random) -> list[str]:
    weights = [1 / (k + 1) ** 1.1 for k in range(len(names))] if zipf else None
    return rng.choices(names, weights=weights, k=n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--max-loras", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()

    from transformers import AutoConfig

    from loraplex.config import parse_dtype
    from loraplex.models.loader import local_hf_dir
    from loraplex.models.model_config import ModelSpec
    from loraplex.models.registry import resolve_model

    source = resolve_model(None)
    spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(local_hf_dir(None)))
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-serving-"))
    names = [f"ad{i:03d}" for i in range(max(args.adapters))]
    for i, name in enumerate(names):
        write_random_adapter(tmp / name, spec, args.rank, seed=i)
    dtype = parse_dtype("auto")  # what the server runs
    roof = roofline.Roofline.measure(roofline.model_shapes(spec), dtype, rows=(args.clients,))
    weights = roofline.gemm_weight_bytes(spec, dtype.itemsize)
    one = roofline.lora_bytes(spec, args.rank, dtype.itemsize)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "loraplex", "serve", "--port", str(port), "--no-demo-adapters",
                             "--adapter-dir", str(tmp), "--max-loras", str(args.max_loras),
                             "--max-cpu-loras", str(max(args.adapters)), "--max-lora-rank", str(args.rank),
                             "--log-level", "warning"], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        rng = random.Random(0)
        print(roof.header())
        print(f"# {source.model_id}, {str(dtype).removeprefix('torch.')}, {args.requests} requests x "
              f"{args.new_tokens} tokens, {args.clients} "
              f"concurrent clients, rank-{args.rank} all-linear adapters, max_loras {args.max_loras}")
        print("| adapters | popularity | tok/s | vs base | floor tok/s | of floor | TTFT p50 / p99 (ms) | "
              "ITL p50 / p99 (ms) |")
        print("|---|---|---|---|---|---|---|---|")
        asyncio.run(run(url, [source.model_id] * args.clients, argparse.Namespace(**{**vars(args),
                                                                                     "requests": args.clients})))
        base = None
        plan = [(0, "-")] + [(n, pop) for n in args.adapters for pop in ("uniform", "zipf")]
        for n, pop in plan:
            models = ([source.model_id] * args.requests if n == 0
                      else draw(names[:n], args.requests, pop == "zipf", rng))
            for m in set(models) - {source.model_id}:  # first use loads from disk: not what this measures
                httpx.post(url + "/v1/completions", json={"model": m, "prompt": "hi", "max_tokens": 1}, timeout=60)
            st = asyncio.run(run(url, models, args))
            tps = st["tokens"] / st["wall"]
            base = base or tps
            used = len(set(models) - {source.model_id})
            floor = roof.decode_floor(spec, weights + min(used, args.clients) * one, args.clients)
            print(f"| {n or 'base only'} | {pop} | {tps:.1f} | {tps / base:.0%} | {floor:.1f} | {tps / floor:.0%} | "
                  f"{pct(st['ttft'], .5) * 1e3:.0f} / {pct(st['ttft'], .99) * 1e3:.0f} | "
                  f"{pct(st['itl'], .5) * 1e3:.1f} / {pct(st['itl'], .99) * 1e3:.1f} |",
                  flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
