"""The platform on the embedded SmolLM2: 100 adapters uploaded over HTTP, each deployed and called once.

    python benchmarks/bench_platform.py [--adapters 100] [--rank 8]

Reported side by side in one run, on one server:
- **upload path**: ``POST /v1/adapters`` (multipart: validation reads every tensor, content-addressed store) →
  ``POST /v1/deployments`` → first streamed token through ``/deployments/<id>/v1/chat/completions``;
- **baseline, vLLM's path**: the same adapters as folders on disk, ``POST /v1/load_lora_adapter`` → first streamed
  token through ``/v1/chat/completions`` (what vLLM / SGLang offer: the operator copies files onto the server);
- the ledger's raw write rate (rows/s into SQLite, batched) against the request rate it has to keep up with.
Medians and p90 of upload-to-first-token; the ratio upload path / baseline.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save

ADMIN = "bench-admin"


def adapter_files(shapes, rank: int, seed: int) -> tuple[bytes, bytes]:
    """A random PEFT LoRA on q_proj and v_proj of every layer: (adapter_config.json, adapter_model.safetensors)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shapes.num_layers):
        for module in ("q_proj", "v_proj"):
            n_in, n_out = shapes.shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.02
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"]}
    return json.dumps(config).encode(), save(tensors)


def first_token(client: httpx.Client, path: str, body: dict) -> None:
    with client.stream("POST", path, json={**body, "stream": True, "max_tokens": 4,
                                          "messages": [{"role": "user", "content": "Who are you?"}]}) as s:
        assert s.status_code == 200, s.read()
        events = (ln for ln in s.iter_lines() if ln.startswith("data: {"))
        next(events)  # the role chunk
        next(events)  # the first token
        for _ in events:
            pass


def summary(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"median {statistics.median(xs) * 1000:.0f} ms, p90 {xs[int(0.9 * (len(xs) - 1))] * 1000:.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    import uvicorn

    from loraplex.server.app import build_app
    from loraplex.server.args import add_serve_args
    from loraplex.server.serve import build_state

    work = Path(tempfile.mkdtemp(prefix="bench-platform-"))
    p = argparse.ArgumentParser()
    add_serve_args(p)
    sargs = p.parse_args(["--api-key", ADMIN, "--platform", "--platform-dir", str(work / "data"), "--no-demo-adapters",
                          "--enable-runtime-lora", "--port", "0", "--log-level", "warning"])
    state = build_state(sargs)
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=8765, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = "http://127.0.0.1:8765"
    shapes = state.engine.engine.lora_store.shapes
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300)
    admin.post("/v1/tenants", json={"id": "bench"})
    key = admin.post("/v1/tenants/bench/keys", json={}).json()["key"]
    tenant = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
    first_token(admin, "/v1/chat/completions", {"model": state.resolver.base_id})  # warm-up

    uploads, loads, handled, bases, size = [], [], [], [], 0
    for k in range(args.adapters):
        config, weights = adapter_files(shapes, args.rank, seed=k)
        size = len(weights)
        start = time.perf_counter()  # the upload path: HTTP upload, validation, store, deployment, first token
        r = tenant.post("/v1/adapters", data={"name": f"u{k}"}, files=[
            ("adapter_config.json", ("adapter_config.json", config)),
            ("adapter_model.safetensors", ("adapter_model.safetensors", weights))])
        assert r.status_code == 201, r.text
        handled.append(r.json()["seconds"])
        dep = tenant.post("/v1/deployments", json={"name": f"d{k}", "adapter": f"bench/u{k}"}).json()
        first_token(tenant, f"/deployments/{dep['id']}/v1/chat/completions", {})
        uploads.append(time.perf_counter() - start)

        folder = work / "disk" / f"v{k}"  # the baseline: files already on the server's disk, loaded by path
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_bytes(config)
        (folder / "adapter_model.safetensors").write_bytes(weights)
        start = time.perf_counter()
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": f"v{k}", "lora_path": str(folder)})
        assert r.status_code == 200, r.text
        first_token(admin, "/v1/chat/completions", {"model": f"v{k}"})
        loads.append(time.perf_counter() - start)
        start = time.perf_counter()  # the floor: the base model's first token for the same prompt
        first_token(admin, "/v1/chat/completions", {"model": state.resolver.base_id})
        bases.append(time.perf_counter() - start)

    ledger = state.platform.ledger
    from loraplex.platform.ledger import UsageRow

    n_rows, t0 = 20000, time.perf_counter()
    for i in range(n_rows):
        ledger.append(UsageRow(f"r{i}", "bench", None, None, "bench/u0", 20, 0, 4, time.time(), time.time(),
                               "finished"))
    ledger.flush()
    rate = n_rows / (time.perf_counter() - t0)
    server.should_exit = True

    print(f"# bench_platform  {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}  "
          f"torch {torch.__version__}  {torch.get_num_threads()} threads")
    print(f"model {state.resolver.base_id}, {args.adapters} adapters rank {args.rank} q,v ({size / 1e6:.1f} MB each)")
    print(f"upload → deploy → first token : {summary(uploads)}, all {args.adapters} in {sum(uploads):.1f} s")
    print(f"load_lora_adapter → first token (baseline, files already on disk): {summary(loads)}")
    print(f"  of which the upload route itself (receive, unpack, read every tensor, hash, store, register): "
          f"{summary(handled)}")
    print(f"base model first token, same prompt (the floor): {summary(bases)}")
    print(f"ratio upload path / baseline (medians): {statistics.median(uploads) / statistics.median(loads):.2f}x")
    print(f"ledger: {rate:.0f} rows/s written (batched SQLite WAL)")


if __name__ == "__main__":
    main()
