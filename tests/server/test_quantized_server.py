"""``serve --quantization int8``: the server answers (base and adapter rows) and reports what it holds in /info."""
from __future__ import annotations

import httpx

from tests.server.conftest import RunningServer


def test_quantized_server_serves_adapters_and_reports_memory(tiny_llama_dir, adapter_dir):
    srv = RunningServer([str(tiny_llama_dir), "--served-model-name", "tiny", "--quantization", "int8",
                         "--lora-modules", f"a4={adapter_dir / 'a4'}"])
    try:
        info = httpx.get(srv.url + "/info").json()
        assert info["quantization"] == "int8"
        assert {"weights", "kv_cache", "lora_slots"} <= set(info["memory_bytes"])
        assert min(info["memory_bytes"].values()) > 0
        for model in ("tiny", "a4"):
            r = httpx.post(srv.url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 4})
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert str(srv.engine.runner.model.layers[0].mlp.down_proj.wq.dtype) == "torch.int8"
        info = httpx.get(srv.url + "/info").json()  # the steps just run were timed per thread count
        assert info["deterministic"] is False
        assert all(ms > 0 for bucket in info["cpu_threads"].values() for ms in bucket.values())
        assert info["cpu_threads"]
        assert info["kernels"]["gemv_tokens"] in (0, 1, 2, 3, 4)  # measured on this CPU at this model's shapes
    finally:
        srv.stop()
