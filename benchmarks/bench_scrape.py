"""What a gateway's 50 ms scrape of /metrics costs, on the embedded SmolLM2 with many adapters registered.

    python benchmarks/bench_scrape.py [--adapters 100] [--clients 32] [--tokens 32] [--rounds 2]

Side by side in one run, on one server: GET /metrics latency (idle and under load; its size in bytes), and the
decode throughput of ``--clients`` concurrent requests over base + 16 adapters with no scraper vs one scraping
every 50 ms (the endpoint picker's default interval), alternated ``--rounds`` times. The ratio is the cost.
"""
from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from bench_platform import adapter_files

PORT = 8766


def quantiles(xs: list[float]) -> str:
    xs = sorted(xs)
    return (f"p50 {statistics.median(xs) * 1000:.2f} ms, p99 {xs[int(0.99 * (len(xs) - 1))] * 1000:.2f} ms "
            f"({len(xs)} scrapes)")


async def load(url: str, models: list[str], clients: int, tokens: int) -> float:
    """Generated tokens per second of ``clients`` concurrent greedy completions, two waves."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        async def one(k: int) -> int:
            r = await c.post("/v1/completions", json={"model": models[k % len(models)], "prompt": f"Story {k}:",
                                                      "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["completion_tokens"]
        start = time.perf_counter()
        n = sum(await asyncio.gather(*(one(k) for k in range(2 * clients))))
        return n / (time.perf_counter() - start)


def scraper(url: str, stop: threading.Event, out: list[float], interval: float = 0.05) -> None:
    with httpx.Client(base_url=url) as c:
        while not stop.is_set():
            t = time.perf_counter()
            assert c.get("/metrics").status_code == 200
            out.append(time.perf_counter() - t)
            stop.wait(max(0.0, interval - (time.perf_counter() - t)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    import uvicorn

    from loraplex.server.app import build_app
    from loraplex.server.args import add_serve_args
    from loraplex.server.serve import build_state

    work = Path(tempfile.mkdtemp(prefix="bench-scrape-"))
    p = argparse.ArgumentParser()
    add_serve_args(p)
    state = build_state(p.parse_args(["--no-demo-adapters", "--adapter-dir", str(work), "--max-loras", "16",
                                      "--max-cpu-loras", "32", "--log-level", "warning"]))
    shapes = state.engine.engine.lora_store.shapes
    for k in range(args.adapters):
        config, weights = adapter_files(shapes, 8, seed=k)
        (work / f"a{k}").mkdir()
        (work / f"a{k}" / "adapter_config.json").write_bytes(config)
        (work / f"a{k}" / "adapter_model.safetensors").write_bytes(weights)
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=PORT, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{PORT}"
    for k in range(args.adapters):  # every adapter registered (loaded once: its row, its series)
        r = httpx.post(url + "/v1/completions", json={"model": f"a{k}", "prompt": "hi", "max_tokens": 1}, timeout=60)
        assert r.status_code == 200, r.text
    models = [state.resolver.base_id, *(f"a{k}" for k in range(16))]

    idle: list[float] = []
    with httpx.Client(base_url=url) as c:
        size = len(c.get("/metrics").content)
        for _ in range(200):
            t = time.perf_counter()
            c.get("/metrics")
            idle.append(time.perf_counter() - t)
    asyncio.run(load(url, models, args.clients, 4))  # warm-up
    plain, scraped, busy = [], [], []
    for _ in range(args.rounds):
        plain.append(asyncio.run(load(url, models, args.clients, args.tokens)))
        stop = threading.Event()
        t = threading.Thread(target=scraper, args=(url, stop, busy))
        t.start()
        scraped.append(asyncio.run(load(url, models, args.clients, args.tokens)))
        stop.set()
        t.join()
    server.should_exit = True

    print(f"# bench_scrape  {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}  "
          f"torch {torch.__version__}  {torch.get_num_threads()} threads")
    print(f"model {state.resolver.base_id}, {args.adapters} adapters registered, /metrics {size / 1024:.0f} KiB")
    print(f"GET /metrics idle: {quantiles(idle)}")
    print(f"GET /metrics under load ({args.clients} clients): {quantiles(busy)}")
    print(f"throughput, {args.clients} clients × {args.tokens} tokens over base + 16 adapters: no scraper "
          f"{statistics.median(plain):.1f} tok/s, scraped every 50 ms {statistics.median(scraped):.1f} tok/s "
          f"(ratio {statistics.median(scraped) / statistics.median(plain):.3f}; rounds {plain} / {scraped})")


if __name__ == "__main__":
    main()
