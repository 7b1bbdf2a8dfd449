"""One user: batch-1 decode offline vs over HTTP (one streaming client), same prompts, same process settings.

    python benchmarks/bench_http_single.py [--new-tokens 64] [--requests 4] [--rounds 2] [--adapter congcong]

Offline: ``LLM.generate`` one prompt at a time. HTTP: ``loraplex serve`` (a subprocess, embedded SmolLM2, demo
adapters) and one client streaming ``/v1/completions`` with ``ignore_eos``. Decode tok/s is the tokens generated
between the first and the last chunk over the time between them (the first token's prefill taken out; over HTTP the
token counts come from each chunk's ``usage``, since a token that adds no text — a special token, part of a UTF-8
character — sends no chunk of its own), TTFT from the client's send; rounds alternate offline and HTTP so machine
noise hits both. The batch-1 floor (``roofline.py``, measured in this run after the rounds):
the weights' and the adapter's bytes over the read bandwidth, or one row's FLOPs over the matmul rate.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402
from bench_engine import QUESTIONS  # noqa: E402


def start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "loraplex", "serve", "--port", str(port), "--log-level", "warning"],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def offline(prompts: list[str], n: int, adapter: str | None) -> tuple[list[float], list[float], tuple]:
    """Decode tok/s and TTFTs of each prompt alone, and ``(spec, dtype, bytes a step reads)`` for the roofline."""
    from loraplex import LLM, LoRARequest, SamplingParams

    llm = LLM(enable_lora=True)
    model = llm.llm_engine.runner.model
    spec, dtype = llm.llm_engine.loaded.spec, llm.llm_engine.config.model.dtype
    nbytes = roofline.weight_bytes(model) + (roofline.adapter_bytes(adapter, dtype.itemsize) if adapter else 0)
    lr = LoRARequest(adapter, 1, adapter) if adapter else None
    engine = llm.llm_engine
    rates, ttfts = [], []
    for i, p in enumerate([prompts[0]] + prompts):  # the first one warms up
        engine.add_request(engine.tokenizer.encode(p), SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                           f"r{i}", lora_request=lr)
        t0, times = time.perf_counter(), []
        while engine.has_unfinished_requests():
            if engine.step():
                times.append(time.perf_counter())
        if i:
            rates.append((len(times) - 1) / (times[-1] - times[0]))
            ttfts.append(times[0] - t0)
    del llm, engine, model
    gc.collect()
    return rates, ttfts, (spec, dtype, nbytes)


def http(prompts: list[str], n: int, adapter: str | None) -> tuple[list[float], list[float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(port)
    rates, ttfts = [], []
    try:
        with httpx.Client(timeout=300) as client:
            for i, p in enumerate([prompts[0]] + prompts):
                body = {"model": adapter or "SmolLM2-135M-Instruct", "prompt": p, "max_tokens": n, "temperature": 0,
                        "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
                t0, times, counts = time.perf_counter(), [], []
                with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            chunk = json.loads(line[6:])
                            if chunk["choices"]:
                                times.append(time.perf_counter())
                                counts.append(chunk["usage"]["completion_tokens"])
                if i:
                    rates.append((counts[-1] - counts[0]) / (times[-1] - times[0]))
                    ttfts.append(times[0] - t0)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return rates, ttfts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--adapter", default="congcong", help="demo adapter to serve the requests ('' = the base)")
    args = ap.parse_args()
    prompts = QUESTIONS[:args.requests]
    res: dict[str, tuple[list[float], list[float]]] = {"offline": ([], []), "http": ([], [])}
    for _ in range(args.rounds):
        r, t, (spec, dtype, nbytes) = offline(prompts, args.new_tokens, args.adapter or None)
        res["offline"][0].extend(r), res["offline"][1].extend(t)
        r, t = http(prompts, args.new_tokens, args.adapter or None)
        res["http"][0].extend(r), res["http"][1].extend(t)
    roof = roofline.Roofline.measure(roofline.model_shapes(spec), dtype, rows=(1,))
    floor = roof.decode_floor(spec, nbytes, 1)
    print(roof.header())
    print(f"dtype auto ({str(dtype).removeprefix('torch.')}); {args.new_tokens} tokens, adapter "
          f"{args.adapter or 'none'}; a step reads {nbytes / 1e6:.0f} MB, floor {floor:.1f} tok/s")
    print("| path | decode tok/s (median) | floor tok/s | of floor | TTFT ms (median) |\n|---|---|---|---|---|")
    med = {k: (statistics.median(v[0]), statistics.median(v[1])) for k, v in res.items()}
    for k, (rate, ttft) in med.items():
        print(f"| {k} | {rate:.1f} | {floor:.1f} | {rate / floor:.0%} | {ttft * 1000:.0f} |")
    print(f"HTTP / offline: {med['http'][0] / med['offline'][0]:.2f}x")


if __name__ == "__main__":
    main()
