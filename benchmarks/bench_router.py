"""Router cost and accuracy per scorer on CPU: ``Router.route`` with 50 cards, and the held-out figures.

    python benchmarks/bench_router.py [--cards 50] [--repeats 3] [--scorers use,e5,minilm,lexical]

For each scorer (the embedding ones only when their package is installed): the time to build a router with
``--cards`` cards (the held-out English and Chinese cards, the development cards and the demo adapters' cards,
repeated under new names up to the count; the general card is embedded once per process and timed apart) and to
fit every card's threshold, then p50 / p99 of one ``route(prompt)`` over the held-out prompts (English, Chinese and
general; ``--repeats`` rounds), called directly and while another thread keeps the cores on 2-thread matmuls ("busy":
an engine stepping beside the router). Then the accuracy tables: development sets (eval_set.json, dev_domains.json)
and both held-out sets (tests/routing/heldout, heldout2: never used to choose a default).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.routing.evalset: the labelled prompts

from loraplex.lora.demo import demo_adapters
from loraplex.routing import ENCODERS, AdapterCard, Router, make_scorer
from tests.routing.evalset import (
    HELDOUT_SETS,
    cards_router,
    demo_router,
    dev_domains,
    evaluate,
    heldout,
    heldout_figures,
    heldout_general,
    load_eval,
)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


class Busy:
    """A thread running 2-thread 512x512 matmuls back to back (what an engine step does to the cores)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        a = torch.randn(512, 512)
        while not self.stop.is_set():
            a @ a

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def many_cards(n: int) -> dict[str, AdapterCard]:
    base = {**heldout("en")[0], **heldout("zh")[0], **dev_domains()[0]}
    base |= {name: AdapterCard.from_folder(path) for name, path in demo_adapters().items()}
    names = list(base)
    return {(names[i % len(names)] + (f"_{i // len(names)}" if i >= len(names) else "")): base[names[i % len(names)]]
            for i in range(n)}


def timed(router: Router, prompts: list[str], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        for p in prompts:
            t = time.perf_counter()
            router.route(p)
            out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cards", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scorers", default="use,e5,minilm,lexical")
    args = ap.parse_args()
    kinds = [k for k in args.scorers.split(",") if k == "lexical" or ENCODERS[k].installed()]
    prompts = [it.prompt for lang in ("en", "zh") for it in heldout(lang)[1]] + [it.prompt for it in heldout_general()]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{args.cards} cards, {len(prompts)} prompts x {args.repeats}")
    print("| scorer | general card embedded, s | build + fit 50 cards, s | route p50 ms | route p99 ms "
          "| busy cores p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for kind in kinds:
        scorer = make_scorer(kind)
        t = time.perf_counter()
        router = Router(scorer)
        general = time.perf_counter() - t
        t = time.perf_counter()
        for name, card in many_cards(args.cards).items():
            router.set_card(name, card)
        router.calibration()
        build = time.perf_counter() - t
        timed(router, prompts[:10], 1)  # warm-up
        direct = timed(router, prompts, args.repeats)
        with Busy():
            busy = timed(router, prompts, 1)
        ms = lambda xs, q: 1e3 * pct(xs, q)  # noqa: E731
        print(f"| {kind} | {general:.2f} | {build:.2f} | {ms(direct, .5):.2f} | {ms(direct, .99):.2f} | "
              f"{ms(busy, .5):.2f} / {ms(busy, .99):.2f} |")
    print("\n| scorer | dev: eval_set | dev: dev_domains | held-out en / zh / general | held-out2 en / zh / general |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        scorer = make_scorer(kind)
        dev, _ = evaluate(demo_router(scorer), load_eval())
        cards, items = dev_domains()
        dev2, _ = evaluate(cards_router(scorer, cards), items)
        held = [heldout_figures(scorer, root)[0] for root in HELDOUT_SETS.values()]
        print(f"| {kind} | {dev:.3f} | {dev2:.3f} | "
              + " | ".join(f"{h['en']:.3f} / {h['zh']:.3f} / {h['general']:.3f}" for h in held) + " |")


if __name__ == "__main__":
    main()
