"""The OpenAI API driven by the official ``openai`` SDK: every answer equals the offline engine's greedy run."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from loraplex import SamplingParams

PROMPT = "Tell me about adapters"


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def offline(reference, prompt, adapter=None, max_tokens=12, chat=False, **kw):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kw)
    lora = reference.lora[adapter] if adapter else None
    if chat:
        return reference.chat([{"role": "user", "content": prompt}], params, use_tqdm=False, lora_request=lora)[0]
    return reference.generate(prompt, params, use_tqdm=False, lora_request=lora)[0]


def test_models_lists_base_and_adapters(server, adapter_dir):
    models = {m.id: m for m in client(server).models.list().data}
    assert set(models) == {"tiny", "a4", "a8", "a16"}
    assert models["tiny"].parent is None and models["tiny"].max_model_len == server.engine.max_model_len
    assert models["a8"].parent == "tiny" and models["a8"].root == str(adapter_dir / "a8")


@pytest.mark.parametrize("adapter", [None, "a4", "a8", "a16"])
def test_chat_matches_offline(server, reference, adapter):
    resp = client(server).chat.completions.create(model=adapter or "tiny", temperature=0, max_tokens=12,
                                                  messages=[{"role": "user", "content": PROMPT}])
    want = offline(reference, PROMPT, adapter, chat=True)
    assert resp.choices[0].message.content == want.outputs[0].text
    assert resp.model == (adapter or "tiny")
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids)
    assert resp.usage.completion_tokens == len(want.outputs[0].token_ids)


def test_adapter_selection_forms(server, reference):
    c = client(server)
    want = offline(reference, PROMPT, "a16", chat=True).outputs[0].text
    msgs = [{"role": "user", "content": PROMPT}]
    for model, extra in [("tiny", {"lora_path": "a16"}), ("tiny", {"adapter_id": "a16"}), ("tiny:a16", None)]:
        r = c.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=12, extra_body=extra)
        assert (r.model, r.choices[0].message.content) == ("a16", want)


def test_chat_stream_with_usage(server, reference):
    stream = client(server).chat.completions.create(
        model="a8", messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    want = offline(reference, PROMPT, "a8", chat=True)
    assert text == want.outputs[0].text
    assert chunks[-1].usage.completion_tokens == len(want.outputs[0].token_ids) and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_completions_prompts_ids_n_and_logprobs(server, reference):
    c = client(server)
    want = offline(reference, PROMPT, "a4")
    r = c.completions.create(model="a4", prompt=PROMPT, temperature=0, max_tokens=12, logprobs=3)
    assert r.choices[0].text == want.outputs[0].text
    lp = r.choices[0].logprobs
    # byte tokens can share a text (several partial UTF-8 bytes decode to '\ufffd'): OpenAI's dicts merge them
    assert len(lp.tokens) == 12 and all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    assert lp.token_logprobs[0] == pytest.approx(max(lp.top_logprobs[0].values()))  # greedy took the top token
    ids = reference.get_tokenizer().encode(PROMPT)
    r = c.completions.create(model="a4", prompt=ids, temperature=0, max_tokens=12)
    assert r.choices[0].text == want.outputs[0].text
    r = c.completions.create(model="tiny", prompt=[PROMPT, "Other"], temperature=0, max_tokens=5)
    assert [ch.text for ch in r.choices] == [offline(reference, p, max_tokens=5).outputs[0].text
                                              for p in (PROMPT, "Other")]
    r = c.completions.create(model="tiny", prompt=PROMPT, n=2, seed=7, temperature=1.0, max_tokens=8)
    again = c.completions.create(model="tiny", prompt=PROMPT, n=2, seed=7, temperature=1.0, max_tokens=8)
    assert len(r.choices) == 2 and [x.text for x in r.choices] == [x.text for x in again.choices]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="a4", prompt=PROMPT, temperature=0, max_tokens=12, stream=True) if ch.choices)
    assert streamed == want.outputs[0].text


def test_chat_logprobs(server, reference):
    r = client(server).chat.completions.create(model="a16", messages=[{"role": "user", "content": PROMPT}],
                                               temperature=0, max_tokens=6, logprobs=True, top_logprobs=4)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 4 for t in content)
    ref = offline(reference, PROMPT, "a16", max_tokens=6, chat=True, logprobs=4).outputs[0]  # the offline engine
    for t, tid, entry in zip(content, ref.token_ids, ref.logprobs):
        assert t.token == entry[tid].decoded_token and t.logprob == pytest.approx(entry[tid].logprob, abs=1e-4)
        top = sorted(entry.values(), key=lambda lp: lp.rank)[:4]
        assert [x.logprob for x in t.top_logprobs] == pytest.approx([lp.logprob for lp in top], abs=1e-4)


def test_stop_strings_and_max_completion_tokens(server, reference):
    want = offline(reference, PROMPT, "a8", max_tokens=20, chat=True).outputs[0].text
    stop = want[5:7]
    r = client(server).chat.completions.create(model="a8", messages=[{"role": "user", "content": PROMPT}],
                                               temperature=0, max_completion_tokens=20, stop=[stop])
    assert r.choices[0].message.content == want[:want.index(stop)] and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=3), "temperature"), (dict(top_p=0), "top_p"), (dict(n=100), "n"),
    (dict(max_tokens=100_000), "max_tokens"), (dict(top_logprobs=50, logprobs=True), "top_logprobs"),
    (dict(max_tokens="many"), "max_tokens"), (dict(tools=[{"type": "function", "function": {"name": "no spaces"}}]), "tools.0.function.name"),
    (dict(functions=[{"name": "f"}]), "functions"),
])
def test_bad_parameters_are_400_naming_them(server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], **kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_unknown_model_or_adapter_is_404(server):
    c = client(server)
    for model, extra in [("nope", None), ("tiny", {"lora_path": "nope"}), ("tiny:nope", None)]:
        with pytest.raises(openai.NotFoundError) as e:
            c.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], extra_body=extra)
        assert e.value.body["code"] == "model_not_found"


def test_malformed_json_and_missing_fields(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_concurrent_streams_match_sequential(server, reference):
    """64 simultaneous streaming requests over 3 adapters + base (max_loras 2: they take turns in the slots)."""
    names = [None, "a4", "a8", "a16"]
    prompts = [(f"Question {i}: why?", names[i % 4]) for i in range(64)]

    async def one(c, prompt, adapter):
        stream = await c.completions.create(model=adapter or "tiny", prompt=prompt, temperature=0, max_tokens=8,
                                            stream=True)
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    async def run():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        return await asyncio.gather(*(one(c, p, a) for p, a in prompts))

    got = asyncio.run(run())
    want = [offline(reference, p, a, max_tokens=8).outputs[0].text for p, a in prompts]
    assert got == want
    assert server.idle()


def test_client_disconnect_aborts_and_frees_blocks(server):
    body = {"model": "a8", "prompt": PROMPT, "max_tokens": 480, "n": 8, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as r:
        next(r.iter_lines())
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client gives up
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.1)
    assert server.idle()


def test_metrics_count_tokens_per_adapter(server):
    client(server).completions.create(model="a4", prompt=PROMPT, temperature=0, max_tokens=5)
    text = httpx.get(server.url + "/metrics").text
    assert 'loraplex_generation_tokens_total{adapter="a4"}' in text
    assert 'loraplex_time_to_first_token_seconds_count{adapter="a4"}' in text
    assert "loraplex_num_requests_waiting" in text and 'loraplex_adapter_resident{adapter="a4",tier="device"}' in text
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_per_request_mixture_matches_offline(server, reference):
    """``adapters: [{name, weight}]`` with model = the base id: the same tokens as the offline mixture."""
    mix = [("a4", 0.7), ("a16", 0.3)]
    want = reference.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False,
                              lora_request=[(reference.lora[n], w) for n, w in mix])[0].outputs[0].text
    body = {"adapters": [{"name": n, "weight": w} for n, w in mix]}
    r = client(server).completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=12, extra_body=body)
    assert r.choices[0].text == want and r.model == "a4*0.7+a16*0.3"
    assert want not in (offline(reference, PROMPT, n).outputs[0].text for n in ("a4", "a16"))
    tgi = httpx.post(server.url + "/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 12, **body}}).json()
    assert tgi["generated_text"] == want
    for extra, code in [({"adapters": [{"name": "nope", "weight": 1}]}, 404),
                        ({"adapters": [{"name": "a4", "weight": "x"}]}, 400),
                        ({"adapters": [], "lora_path": "a4"}, 400)]:
        r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", **extra})
        assert r.status_code == code and r.json()["error"]["param"].startswith("adapters"), r.json()
    r = httpx.post(server.url + "/v1/completions", json={"model": "a8", "prompt": "x", **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == "adapters"
