"""An X-LoRA served over HTTP: listed, requested by name like any adapter, batched with other requests."""
from __future__ import annotations

import httpx
import openai
import pytest

from loraplex import LLM, LoRARequest, SamplingParams
from tests.conftest import save_xlora
from tests.server.conftest import ADAPTERS, RunningServer

PROMPT = "Tell me about adapters"


@pytest.fixture(scope="module")
def xlora_dir(tiny_llama_dir, adapter_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("xlora") / "xl"
    save_xlora(tiny_llama_dir, [adapter_dir / n for n in ADAPTERS], out, hidden_size=64, xlora_depth=2,
               xlora_size=32, layerwise_scalings=True)
    return out


@pytest.fixture(scope="module")
def xserver(tiny_llama_dir, adapter_dir, xlora_dir):
    srv = RunningServer([str(tiny_llama_dir), "--served-model-name", "tiny", "--max-loras", "4",
                         "--lora-modules", f"xl={xlora_dir}", f"a8={adapter_dir / 'a8'}"])
    yield srv
    srv.stop()


def test_xlora_over_http_matches_offline(xserver, tiny_llama_dir, xlora_dir):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", enable_lora=True, max_loras=4)
    want = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False,
                        lora_request=LoRARequest("xl", 1, str(xlora_dir)))[0].outputs[0].text
    c = openai.OpenAI(base_url=xserver.url + "/v1", api_key="none", max_retries=0)
    models = {m.id: m for m in c.models.list().data}
    assert {"tiny", "xl", "a8"} <= set(models) and models["xl"].parent == "tiny"
    r = c.completions.create(model="xl", prompt=PROMPT, temperature=0, max_tokens=12)
    assert r.choices[0].text == want and r.model == "xl"
    stream = c.completions.create(model="xl", prompt=PROMPT, temperature=0, max_tokens=12, stream=True)
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == want
    tgi = httpx.post(xserver.url + "/generate", json={"inputs": PROMPT, "parameters": {
        "adapter_id": "xl", "max_new_tokens": 12}}).json()
    assert tgi["generated_text"] == want
    rows = {r["name"]: r for r in httpx.get(xserver.url + "/v1/lora_adapters").json()["data"]}
    assert rows["xl"]["xlora_experts"] == ["xl/0", "xl/1", "xl/2"]
    assert 'loraplex_generation_tokens_total{adapter="xl"}' in httpx.get(xserver.url + "/metrics").text
    r = httpx.post(xserver.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "adapters": [
        {"name": "xl", "weight": 0.5}, {"name": "a8", "weight": 0.5}]})
    assert r.status_code == 400 and "X-LoRA" in r.json()["error"]["message"]
    assert xserver.idle()
    r = httpx.post(xserver.url + "/v1/unload_lora_adapter", json={"lora_name": "xl"})
    assert r.status_code == 200, r.text
    assert "xl" not in {m.id for m in c.models.list().data}
