"""The labelled routing evaluation set (``eval_set.json``) and an accuracy report, shared with the benchmark."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loraplex.lora.demo import demo_adapters
from loraplex.routing import AdapterCard, Router

EVAL_FILE = Path(__file__).with_name("eval_set.json")


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


def demo_router(scorer, **kw) -> Router:
    router = Router(scorer, **kw)
    for name, path in demo_adapters().items():
        router.set_card(name, AdapterCard.from_folder(path))
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
    lines = [f"{router.scorer.name} scorer (threshold {router.threshold}, margin {router.margin}): "
             f"accuracy {acc:.3f} on {len(items)} prompts; "
             + ", ".join(f"{k} {v[1]}/{sum(v)}" for k, v in per.items()), *misses]
    return acc, "\n".join(lines)
