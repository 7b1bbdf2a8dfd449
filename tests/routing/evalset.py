"""The labelled routing sets and an accuracy report, shared with the benchmark.

- development sets (defaults may be chosen on them): ``eval_set.json`` (the demo adapters' domains and general
  prompts) and ``dev_domains.json`` (new domains with short cards);
- held-out sets (never used to choose anything), ``heldout/``, ``heldout2/`` (written before the competing-class
  method, after ``heldout/`` had been looked at) and ``heldout3/`` (written blind, by a writer who had not seen the
  router, before it was first measured): ``cards_{en,zh}.json`` with ``prompts_{en,zh}.json`` (8 domains × 10
  prompts each, cards written apart from the prompts) and ``general.json``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loraplex.lora.demo import demo_adapters
from loraplex.routing import AdapterCard, Router

HERE = Path(__file__).parent
EVAL_FILE = HERE / "eval_set.json"
DEV_DOMAINS_FILE = HERE / "dev_domains.json"
HELDOUT = HERE / "heldout"
HELDOUT2 = HERE / "heldout2"
HELDOUT3 = HERE / "heldout3"
HELDOUT_SETS = {"heldout": HELDOUT, "heldout2": HELDOUT2, "heldout3": HELDOUT3}


@dataclass(frozen=True)
class Item:
    label: str | None  # the adapter that should serve it, None for the base
    prompt: str
    system: str | None = None


def load_eval() -> list[Item]:
    data = json.loads(EVAL_FILE.read_text(encoding="utf-8"))
    items = []
    for label, prompts in data.items():
        if label.startswith("_"):
            continue
        for p in prompts:
            p = p if isinstance(p, dict) else {"prompt": p}
            items.append(Item(None if label == "base" else label, p["prompt"], p.get("system")))
    return items


def _read(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if not k.startswith("_")}


def dev_domains() -> tuple[dict[str, AdapterCard], list[Item]]:
    data = _read(DEV_DOMAINS_FILE)
    cards = {n: AdapterCard(c["description"], tuple(c["examples"])) for n, c in data["cards"].items()}
    items = [Item(d, p) for d, ps in data["prompts"].items() for p in ps] + [Item(None, p) for p in data["general"]]
    return cards, items


def heldout(lang: str, root: Path = HELDOUT) -> tuple[dict[str, AdapterCard], list[Item]]:
    """Cards and in-domain prompts of one language (``en`` / ``zh``) of the held-out set in ``root``."""
    cards = {n: AdapterCard(c["description"], tuple(c["examples"]))
             for n, c in _read(root / f"cards_{lang}.json").items()}
    items = [Item(d, p) for d, ps in _read(root / f"prompts_{lang}.json").items() for p in ps]
    return cards, items


def heldout_general(root: Path = HELDOUT) -> list[Item]:
    data = _read(root / "general.json")
    return [Item(None, p) for lang in ("en", "zh") for p in data[lang]]


def demo_router(scorer, **kw) -> Router:
    router = Router(scorer, **kw)
    for name, path in demo_adapters().items():
        router.set_card(name, AdapterCard.from_folder(path))
    return router


def cards_router(scorer, cards: dict[str, AdapterCard], **kw) -> Router:
    router = Router(scorer, **kw)
    for name, card in cards.items():
        router.set_card(name, card)
    return router


def evaluate(router: Router, items: list[Item]) -> tuple[float, str]:
    """Accuracy and a printable report (per class, and every miss with its candidates)."""
    per: dict[str, list[int]] = {}
    misses = []
    for it in items:
        d = router.route(it.prompt, it.system)
        ok = d.adapter == it.label
        per.setdefault(it.label or "base", [0, 0])[ok] += 1
        if not ok:
            misses.append(f"  miss: want {it.label or 'base'}, got {d.summary()} <- {it.prompt!r}")
    acc = sum(v[1] for v in per.values()) / len(items)
    lines = [f"{router.scorer.name} scorer (margin {router.margin}, spread {router.spread:.4f}): "
             f"accuracy {acc:.3f} on {len(items)} prompts; "
             + ", ".join(f"{k} {v[1]}/{sum(v)}" for k, v in per.items()), *misses]
    return acc, "\n".join(lines)


def heldout_figures(scorer, root: Path = HELDOUT) -> tuple[dict[str, float], str]:
    """Held-out accuracy: ``en`` / ``zh`` (in-domain prompts routed to their card, with that language's 8 cards)
    and ``general`` (general prompts of both languages kept on the base, with each card set loaded)."""
    figures, reports, general = {}, [], []
    for lang in ("en", "zh"):
        cards, items = heldout(lang, root)
        router = cards_router(scorer, cards)
        figures[lang], report = evaluate(router, items)
        g, greport = evaluate(router, heldout_general(root))
        general.append(g)
        reports += [f"[{lang}] " + report, f"[general, {lang} cards] " + greport]
    figures["general"] = sum(general) / len(general)
    return figures, "\n".join(reports)
