"""A registry of many adapters costs metadata only; memory grows with the host cache and device slots.

    python benchmarks/bench_registry.py [--adapters 1000]

Registers N adapters (directories linking one demo adapter's files) on the embedded SmolLM2 engine and reports
resident memory and registration time, then serves requests on a few of them.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import psutil

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.lora.demo import demo_adapters


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=1000)
    args = ap.parse_args()
    llm = LLM(enable_lora=True, max_loras=4, max_lora_rank=16, max_cpu_loras=8)
    src = demo_adapters()["congcong"]
    root = Path(tempfile.mkdtemp(prefix="loraplex-registry-"))
    for i in range(args.adapters):
        d = root / f"expert{i}"
        d.mkdir()
        for f in src.iterdir():
            os.symlink(f, d / f.name)
    engine = llm.llm_engine
    before = rss_mb()
    t = time.perf_counter()
    for i in range(args.adapters):
        engine.add_lora(LoRARequest(f"expert{i}", i + 1, str(root / f"expert{i}")))
    took = time.perf_counter() - t
    after_registry = rss_mb()
    tok = llm.get_tokenizer()
    prompts = [tok.encode(f"Question {i}?") for i in range(16)]
    reqs = [LoRARequest(f"expert{i % 12}", i % 12 + 1, str(root / f"expert{i % 12}")) for i in range(16)]
    llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0), lora_request=reqs, use_tqdm=False)
    after_serving = rss_mb()
    tiers = [r["tier"] for r in engine.list_loras()]
    print(f"registered {args.adapters} adapters in {took:.2f} s ({took / args.adapters * 1e3:.2f} ms each)")
    print(f"RSS: {before:.0f} MB before, {after_registry:.0f} MB after registering (+{after_registry - before:.1f} MB), "
          f"{after_serving:.0f} MB after serving 12 of them (host cache 8, 4 slots)")
    print(f"tiers: device {tiers.count('device')}, host {tiers.count('host')}, disk {tiers.count('disk')}")


if __name__ == "__main__":
    main()
