"""TGI routes through ``huggingface_hub.InferenceClient``; admin routes; API key, body cap, queue cap, SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient

from loraplex import SamplingParams
from loraplex.server.serve import parse_lora_module
from tests.conftest import save_tiny_adapter
from tests.server.conftest import RunningServer, free_port

PROMPT = "Tell me about adapters"


def greedy(reference, adapter, n=10):
    params = SamplingParams(temperature=0, max_tokens=n, skip_special_tokens=False)
    return reference.generate(PROMPT, params, use_tqdm=False, lora_request=reference.lora[adapter])[0].outputs[0]


def test_text_generation_with_adapter_id(server, reference):
    c = InferenceClient(server.url)
    want = greedy(reference, "a8")
    assert c.text_generation(PROMPT, max_new_tokens=10, adapter_id="a8") == want.text
    details = c.text_generation(PROMPT, max_new_tokens=10, adapter_id="a8", details=True)
    assert [t.id for t in details.details.tokens] == want.token_ids and details.details.finish_reason == "length"
    streamed = list(c.text_generation(PROMPT, max_new_tokens=10, adapter_id="a8", stream=True, details=True))
    assert [s.token.id for s in streamed] == want.token_ids and streamed[-1].generated_text == want.text
    r = httpx.post(server.url + "/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "nope"}})
    assert r.status_code == 404 and r.json()["error"]["param"] == "adapter_id"
    limit = httpx.get(server.url + "/info").json()["max_stop_sequences"]
    r = httpx.post(server.url + "/generate", json={"inputs": PROMPT, "parameters": {"stop": ["x"] * (limit + 1)}})
    assert r.status_code == 400 and "stop" in r.json()["error"]["param"]  # /info's limit is enforced
    assert httpx.get(server.url + "/info").json()["max_total_tokens"] == server.engine.max_model_len
    r = httpx.request("OPTIONS", server.url + "/")  # GET / (the console) and POST / (TGI) share the path
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    assert httpx.put(server.url + "/v1/models/a8").headers["allow"] == "GET"


def test_admin_load_list_unload(tiny_llama_dir, adapter_dir, tmp_path):
    extra = tmp_path / "extra"
    save_tiny_adapter(tiny_llama_dir, extra, seed=99, r=2, target_modules=["o_proj"])
    srv = RunningServer([str(tiny_llama_dir), "--adapter-dir", str(adapter_dir), "--max-loras", "2"])
    try:
        post = lambda path, body: httpx.post(srv.url + path, json=body)  # noqa: E731
        r = post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(extra)})
        assert r.status_code == 403 and r.json()["error"]["param"] == "lora_path"  # not vetted, runtime lora off
        assert post("/v1/load_lora_adapter", {"lora_name": "a4b", "lora_path": str(adapter_dir / "a4"),
                                               "description": "tiny adapter", "pinned": True}).status_code == 200
        rows = {r["name"]: r for r in httpx.get(srv.url + "/v1/lora_adapters").json()["data"]}
        assert rows["a4b"]["pinned"] and rows["a4b"]["tier"] == "device" and rows["a4b"]["card"]["description"]
        assert rows["a16"]["tier"] == "disk"  # discovered under --adapter-dir, not loaded yet
        r = post("/v1/load_lora_adapter", {"lora_name": "y", "lora_path": "~no-such-user/a"})
        assert r.status_code == 403 and r.json()["error"]["param"] == "lora_path"  # was a 500 (Path.expanduser)
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        assert c.completions.create(model="a16", prompt="hi", max_tokens=2).model == "a16"  # loaded on first use
        for bad in ("../a4", "a4/..", "nope"):
            with pytest.raises(openai.NotFoundError):
                c.completions.create(model=bad, prompt="hi", max_tokens=2)
        body = {"model": "a4b", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()  # keep the iterator: dropping it would close the stream (a disconnect)
            next(lines)
            srv.state.engine.call(time.sleep, 0.5)  # hold the step loop: the request is surely still in flight
            r = post("/v1/unload_lora_adapter", {"lora_name": "a4b"})
            assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use"
        assert srv.idle()
        assert post("/v1/unload_lora_adapter", {"lora_name": "a4b", "wait": True}).status_code == 200
        assert post("/v1/unload_lora_adapter", {"lora_name": "a4b"}).status_code == 404
        assert "a4b" not in {m.id for m in c.models.list().data}
        body = {"model": "a8", "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}) as stream:
            lines = stream.iter_lines()
            next(lines)  # a request is running while a broken adapter is loaded
            (adapter_dir / "broken").mkdir(exist_ok=True)
            (adapter_dir / "broken" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
            r = post("/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": str(adapter_dir / "broken")})
            assert r.status_code == 400 and "broken" in r.json()["error"]["message"]
            tail = [ln for ln in lines if ln.startswith("data: ")]
        assert tail[-1] == "data: [DONE]" and json.loads(tail[-2][6:])["choices"][0]["finish_reason"] == "length"
        (adapter_dir / "broken" / "adapter_config.json").unlink()
        (adapter_dir / "broken").rmdir()
    finally:
        srv.stop()


def test_lora_modules_forms():
    assert parse_lora_module("law=/a/law") == {"name": "law", "path": "/a/law"}
    assert parse_lora_module("/srv/lora/law-v2/") == {"name": "law-v2", "path": "/srv/lora/law-v2/"}
    mod = parse_lora_module('{"name": "law", "path": "/a/law", "description": "legal questions"}')
    assert mod["description"] == "legal questions"
    with pytest.raises(SystemExit, match="lora-modules"):
        parse_lora_module('{"name": "law"}')


def test_api_key_body_cap_and_queue_cap(tiny_llama_dir):
    srv = RunningServer([str(tiny_llama_dir), "--api-key", "s3cret", "--max-waiting", "0"], max_body_bytes=2048)
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        for path in ("/v1/models", "/v1/lora_adapters", "/generate", "/v1/load_lora_adapter"):
            assert httpx.request("GET" if "models" in path or "adapters" in path else "POST",
                                 srv.url + path).status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200
        auth = {"Authorization": "Bearer s3cret"}
        r = httpx.post(srv.url + "/v1/completions", headers=auth, json={"model": "x", "prompt": "a" * 5000})
        assert r.status_code == 413
        r = httpx.post(srv.url + "/v1/completions", headers=auth, json={"model": "x", "prompt": "hi"})
        assert r.status_code == 404
        r = httpx.post(srv.url + "/v1/completions", headers=auth, json={"model": srv.engine.model_id, "prompt": "hi"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
    finally:
        srv.stop()


def test_sigterm_drains_in_flight_requests(tiny_llama_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loraplex", "serve", str(tiny_llama_dir), "--port", str(port),
                             "--dtype", "float32", "--no-demo-adapters", "--log-level", "warning"],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        body = {"model": str(tiny_llama_dir), "prompt": PROMPT, "max_tokens": 300, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = iter(r.iter_lines())
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [ln for ln in lines if ln.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        proc.kill()
