"""Seed 001's "100 fine-tuned models deployed": 100 distinct adapters uploaded, each deployed and called once
through its deployment; every answer is served by its own adapter; the median upload-to-first-token is printed."""
from __future__ import annotations

import json
import statistics
import time

import torch
from safetensors.torch import load_file, save

from tests.platform.conftest import Client, make_tenant

N = 100


def variants(folder, n: int):
    """``n`` distinct adapters: the same config, weights perturbed by a per-adapter seed."""
    config = (folder / "adapter_config.json").read_bytes()
    base = load_file(folder / "adapter_model.safetensors")
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        tensors = {name: t + 0.05 * torch.randn(t.shape, generator=g) for name, t in base.items()}
        yield config, save(tensors)


def test_hundred_adapters_uploaded_deployed_and_called(platform, admin, adapter_dir, capsys):
    t = Client(platform.url, make_tenant(admin, "fleet"))
    latencies = []
    for k, (config, weights) in enumerate(variants(adapter_dir / "a4", N)):
        start = time.perf_counter()
        r = t.post("/v1/adapters", data={"name": f"m{k}"}, files=[
            ("adapter_config.json", ("adapter_config.json", config)),
            ("adapter_model.safetensors", ("adapter_model.safetensors", weights))])
        assert r.status_code == 201, r.text
        dep = t.post("/v1/deployments", json={"name": f"d{k}", "adapter": f"fleet/m{k}"}).json()
        with t.http.stream("POST", f"/deployments/{dep['id']}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}) as s:
            assert s.status_code == 200 and s.headers["x-loraplex-adapter"] == f"fleet/m{k}"
            events = (json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {"))
            next(events)  # the role chunk, sent before any token
            first = next(events)  # the first token's chunk
            latencies.append(time.perf_counter() - start)
            assert first["choices"][0]["delta"].get("content") or first["choices"][0]["finish_reason"]
            list(events)
    digests = {a["digest"] for a in t.get("/v1/adapters").json()["data"]}
    assert len(digests) == N
    usage = t.get("/v1/usage", params={"group_by": "deployment"}).json()["data"]
    assert len(usage) == N and all(u["requests"] == 1 for u in usage)
    with capsys.disabled():
        print(f"\n{N} adapters: upload-to-first-token median {statistics.median(latencies) * 1000:.0f} ms, "
              f"max {max(latencies) * 1000:.0f} ms, total {sum(latencies):.1f} s")
    assert statistics.median(latencies) < 5.0  # "serves within seconds"
