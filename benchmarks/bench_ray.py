"""Ray Serve scale-out on this machine: 1 engine replica vs 2, and with 2 replicas adapter affinity (Serve's
multiplexed model ids) vs Serve's plain load-based routing — 16 adapters with Zipf popularity.

    python benchmarks/bench_ray.py [--requests 160] [--warmup 48] [--concurrency 8] [--adapters 16] [--per-replica 8]

Each configuration gets a fresh local Ray cluster (2 CPUs; the replicas share them: 1 replica gets 2 CPUs, 2 get 1
each) running ``loraplex serve``'s Serve application on the embedded SmolLM2-135M-Instruct, and the same request
sequence (seeded), after ``--warmup`` requests of the same popularity (the LRUs filled: steady state): a short
chat prompt, ``max_tokens`` tokens, streamed, ``--concurrency`` clients. Reported:
completion tokens/s, p50/p99 time to first token, and adapter loads (registrations in a replica's engine: Serve's
multiplexed LRU holds ``--per-replica`` adapters per replica) per minute, with their ratio plain / affinity.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from safetensors.torch import save_file

CONFIGS = [("1 replica", 1, True), ("2 replicas, affinity", 2, True), ("2 replicas, plain routing", 2, False)]


def write_adapters(root: Path, n: int, rank: int) -> list[str]:
    """``n`` random rank-``rank`` PEFT LoRAs on q_proj / v_proj of every layer of the embedded model."""
    from transformers import AutoConfig

    from loraplex.models.loader import local_hf_dir

    cfg = AutoConfig.from_pretrained(local_hf_dir(None))
    head = cfg.hidden_size // cfg.num_attention_heads
    outs = {"q_proj": cfg.num_attention_heads * head, "v_proj": cfg.num_key_value_heads * head}
    names = []
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        tensors = {}
        for layer in range(cfg.num_hidden_layers):
            for module, n_out in outs.items():
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, cfg.hidden_size, generator=g) * 0.02
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.02
        d = root / f"z{k:02d}"
        d.mkdir()
        save_file(tensors, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                           "target_modules": ["q_proj", "v_proj"]}))
        names.append(d.name)
    return names


def zipf_sequence(names: list[str], n: int, s: float, seed: int) -> list[str]:
    """``n`` adapter names drawn with probability ∝ 1 / rank^s (rank 1 = the first name)."""
    p = 1.0 / np.arange(1, len(names) + 1) ** s
    rng = np.random.default_rng(seed)
    return [names[i] for i in rng.choice(len(names), size=n, p=p / p.sum())]


def one_request(url: str, model: str, max_tokens: int) -> tuple[float, int]:
    """(time to first token, completion tokens) of one streamed chat request."""
    body = {"model": model, "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, ttft, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - t0
    return ttft, tokens


def loads(url: str) -> int:
    return sum(r["adapter_loads"] for r in httpx.get(f"{url}/v1/replicas").json()["data"])


def run_config(replicas: int, affinity: bool, adapter_dir: Path, warm: list[str], seq: list[str],
               args) -> dict:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from loraplex.scaleout.ray_serve import APP_NAME, NAMESPACE, application, parser

    ray.init(num_cpus=2, object_store_memory=200 << 20, include_dashboard=False, log_to_driver=False,
             namespace=NAMESPACE, _node_ip_address="127.0.0.1", configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        flags = ["--num-replicas", str(replicas), "--replica-cpus", str(2 / replicas), "--max-adapters-per-replica",
                 str(args.per_replica), "--max-loras", str(min(args.per_replica, 4)), "--max-cpu-loras",
                 str(args.per_replica), "--router-scorer", "lexical", "--adapter-dir", str(adapter_dir),
                 "--no-demo-adapters", "--log-level", "warning"]
        serve.run(application(parser().parse_args(flags + (["--no-adapter-affinity"] if not affinity else []))),
                  name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{args.port}"
        with ThreadPoolExecutor(args.concurrency) as pool:  # warm every replica's base path
            list(pool.map(lambda _: one_request(url, "SmolLM2-135M-Instruct", 2), range(2 * replicas)))
            list(pool.map(lambda m: one_request(url, m, 2), warm))  # steady state: the LRUs filled
        time.sleep(1.5)  # the replicas' reports reach the catalog
        before, t0 = loads(url), time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda m: one_request(url, m, args.max_tokens), seq))
        wall = time.perf_counter() - t0
        time.sleep(1.5)
        n_loads = loads(url) - before
    finally:
        serve.shutdown()
        ray.shutdown()
    ttfts = sorted(r[0] for r in results)
    return {"wall_s": wall, "tok_s": sum(r[1] for r in results) / wall,
            "ttft_p50_ms": 1000 * statistics.median(ttfts), "ttft_p99_ms": 1000 * ttfts[int(0.99 * (len(ttfts) - 1))],
            "loads": n_loads, "loads_per_min": 60 * n_loads / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.0, help="popularity exponent s")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--per-replica", type=int, default=8, help="adapters one replica's LRU holds")
    ap.add_argument("--warmup", type=int, default=48, help="requests (same popularity) before measuring")
    ap.add_argument("--port", type=int, default=8790)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    names = write_adapters(root, args.adapters, args.rank)
    seq = zipf_sequence(names, args.requests, args.zipf, seed=0)
    warm = zipf_sequence(names, args.warmup, args.zipf, seed=1)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    print(f"{model}, {platform.machine()}, torch {torch.__version__}; {args.requests} requests × {args.max_tokens} "
          f"tokens, {args.concurrency} clients, {args.adapters} adapters (Zipf s={args.zipf}, "
          f"{len(set(seq))} distinct asked), {args.per_replica} adapters per replica")
    rows = {}
    for label, replicas, affinity in CONFIGS:
        rows[label] = r = run_config(replicas, affinity, root, warm, seq, args)
        print(f"{label:28s} {r['tok_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:6.0f} ms  p99 {r['ttft_p99_ms']:6.0f} ms"
              f"  adapter loads {r['loads']:4d} ({r['loads_per_min']:6.1f}/min)  wall {r['wall_s']:.1f} s", flush=True)
    one, aff, plain = rows[CONFIGS[0][0]], rows[CONFIGS[1][0]], rows[CONFIGS[2][0]]
    print(f"throughput 2 replicas (affinity) / 1 replica: {aff['tok_s'] / one['tok_s']:.2f}x")
    print(f"adapter loads per minute, plain / affinity: {plain['loads_per_min'] / max(aff['loads_per_min'], 1e-9):.2f}x"
          f" (loads {plain['loads']} vs {aff['loads']})")


if __name__ == "__main__":
    main()
