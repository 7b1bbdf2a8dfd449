"""X-LoRA rows (per-token gated experts) vs single-adapter, mixture and base rows, and vs PEFT's X-LoRA.

    python benchmarks/bench_xlora.py [--new-tokens 64] [--repeats 3] [--peft-prompts 8] [--skip-peft] [--arrivals-only]

An X-LoRA over the three demo adapters (congcong, benben, pirate) with a random 2-layer, layer-wise classifier (the
cost does not depend on the gate's values) on the embedded SmolLM2, bf16, 32 chat prompts. Side by side in one run:
base only; one adapter (pirate); a static 3-adapter mixture; X-LoRA on every row; a mixed batch (a quarter each:
base, pirate, 3-mixture, X-LoRA). Then transformers+PEFT X-LoRA ``generate`` (PEFT runs it without a KV cache) and
transformers base ``generate`` on the first ``--peft-prompts`` prompts, with our X-LoRA and base rows on those same
prompts. Last, continuous arrivals (32 in flight, 128 requests x 32 tokens, a new one admitted as each finishes):
all base vs a mix where every fourth request is X-LoRA (the others base / pirate / 3-mixture) — what X-LoRA rows
cost the rows they share steps with, without a closed batch's tail (in a closed batch the X-LoRA rows, which need
two forwards per token, finish last and set the time).

Every tok/s is shown against its decode floor (``roofline.py``, measured in the run before the timed parts): the
weights and the adapters its rows use (an X-LoRA: classifier and experts) over the read bandwidth, or its FLOPs over
the matmul rate; an X-LoRA row takes two steps a token (scaling pass, real pass), so its share of rows counts twice.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.lora.demo import demo_adapters
from loraplex.lora.peft_format import inspect_peft_lora
from loraplex.lora.xlora import is_xlora_dir, module_order

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402
from bench_arrivals import run_arrivals  # noqa: E402
from bench_lora import QUESTIONS  # noqa: E402
from bench_mixture import adapters_of, compare_cases  # noqa: E402

EXPERTS = ("congcong", "benben", "pirate")


def write_xlora(out: Path, hidden: int, n_modules: int, size: int = 2048) -> None:
    """An X-LoRA directory as PEFT loads it: config, classifier safetensors, experts in subfolders "0", "1", "2"."""
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    n_out = len(EXPERTS) * n_modules
    save_file({"base_model.internal_xlora_classifier.layers.0.weight": torch.randn(size, hidden, generator=g) * 0.05,
               "base_model.internal_xlora_classifier.layers.0.bias": torch.zeros(size),
               "base_model.internal_xlora_classifier.layers.2.weight": torch.randn(n_out, size, generator=g) * 0.05,
               "base_model.internal_xlora_classifier.layers.2.bias": torch.zeros(n_out)},
              str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "XLORA", "task_type": "CAUSAL_LM", "hidden_size": hidden, "xlora_depth": 2, "xlora_size": size,
        "layerwise_scalings": True, "xlora_dropout_p": 0.0, "adapters": {str(i): str(i) for i in range(3)}}))
    for i, name in enumerate(EXPERTS):
        shutil.copytree(demo_adapters()[name], out / str(i))


def floor_of(roof: roofline.Roofline, llm: LLM, lr, rows: int) -> float:
    """Decode floor tok/s of ``rows`` rows on ``lr`` (as ``compare_cases`` takes it, or an arrivals pattern)."""
    engine = llm.llm_engine
    spec, elem = engine.loaded.spec, engine.config.model.dtype.itemsize
    nbytes = roofline.weight_bytes(engine.runner.model)
    for path in adapters_of(lr).values():
        nbytes += roofline.adapter_bytes(path, elem)  # a LoRA's A and B; an X-LoRA's classifier
        if is_xlora_dir(path):
            nbytes += sum(roofline.adapter_bytes(Path(path) / str(i), elem) for i in range(len(EXPERTS)))
    pattern = lr if isinstance(lr, list) and not isinstance(lr[0], tuple) else [lr]  # one entry per row, in turn
    xlora_share = sum(isinstance(x, LoRARequest) and is_xlora_dir(x.lora_path) for x in pattern) / len(pattern)
    return roof.decode_floor(spec, nbytes, rows) / (1 + xlora_share)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peft-prompts", type=int, default=8)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--arrivals-only", action="store_true")
    args = ap.parse_args()
    llm = LLM(dtype="bfloat16", max_model_len=1024, enable_lora=True, max_loras=8)  # 3 adapters + 3 experts
    tok = llm.get_tokenizer()
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % 8] + " " * (i // 8)}],
                                                  tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False) for i in range(32)]
    spec = llm.llm_engine.loaded.spec
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-xlora-"))
    plans = [inspect_peft_lora(n, demo_adapters()[n], spec.module_shapes, 64) for n in EXPERTS]
    write_xlora(tmp / "xl", spec.hidden_size, len(module_order(plans)))
    xl = LoRARequest("xl", 10, str(tmp / "xl"))
    pirate, congcong, benben = (LoRARequest(n, i + 1, n) for i, n in enumerate(["pirate", "congcong", "benben"]))
    mix3 = [(pirate, 0.4), (congcong, 0.3), (benben, 0.3)]
    rows = {len(prompts), 32} | (set() if args.skip_peft or args.arrivals_only else {args.peft_prompts})  # 32: arrivals
    dtype = llm.llm_engine.config.model.dtype
    roof = roofline.Roofline.measure(roofline.model_shapes(spec), dtype, tuple(sorted(rows)))
    print(roof.header())
    if args.arrivals_only:
        return arrivals(llm, roof, [None, pirate, mix3, xl], args.repeats)
    cases = {"base only": None, "one adapter (pirate)": pirate, "3-adapter mixture": mix3,
             "X-LoRA (3 experts, per-token gate)": xl, "mixed batch (base/pirate/mix3/X-LoRA)": [None, pirate, mix3, xl] * 8}
    floors = {name: floor_of(roof, llm, lr, len(prompts)) for name, lr in cases.items()}
    compare_cases(llm, prompts, cases, args.new_tokens, args.repeats, floors)
    if not args.skip_peft:
        peft_baseline(llm, roof, prompts[:args.peft_prompts], xl, tmp / "xl", args.new_tokens)
    arrivals(llm, roof, [None, pirate, mix3, xl], args.repeats)


def arrivals(llm, roof: roofline.Roofline, loras: list, repeats: int, in_flight: int = 32, n: int = 128,
             new_tokens: int = 32) -> None:
    engine, tok = llm.llm_engine, llm.get_tokenizer()
    prompts = [tok.encode(f"{QUESTIONS[i % 8]} ({i})") for i in range(n)]
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    def run(pattern: list) -> float:
        return run_arrivals(engine, prompts, sp, pattern, in_flight)

    run(loras), run([None])  # warm-up
    floor_base, floor_mixed = floor_of(roof, llm, None, in_flight), floor_of(roof, llm, loras, in_flight)
    print(f"\n# continuous arrivals: {in_flight} in flight, {n} requests x {new_tokens} tokens; decode floor: all base "
          f"{floor_base:.0f} tok/s, the mix {floor_mixed:.0f} tok/s")
    for _ in range(repeats):
        base, mixed = run([None]), run(loras)
        print(f"all base {base:.0f} tok/s ({base / floor_base:.0%} of floor), 1/4 X-LoRA + base/pirate/mix3 "
              f"{mixed:.0f} tok/s ({mixed / floor_mixed:.0%} of floor): {mixed / base:.0%}")


def peft_baseline(llm, roof: roofline.Roofline, prompts, xl, xl_dir: Path, new_tokens: int) -> None:
    from peft import PeftModel, XLoraConfig
    from transformers import AutoModelForCausalLM

    from loraplex.models.loader import local_hf_dir

    total = len(prompts) * new_tokens
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    ours = {}
    for name, lr in (("loraplex base only", None), ("loraplex X-LoRA", xl)):
        t = time.perf_counter()
        llm.generate(prompt_token_ids=prompts, sampling_params=sp, lora_request=lr, use_tqdm=False)
        ours[name] = total / (time.perf_counter() - t)
    base_dir = local_hf_dir(None)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    gen = dict(attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
               pad_token_id=0)
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        t = time.perf_counter()
        hf.generate(ids, **gen)
        ours["transformers base"] = total / (time.perf_counter() - t)
    hf.config.use_cache = False
    cfg = XLoraConfig.from_pretrained(str(xl_dir))
    cfg.adapters = {k: str(xl_dir / v) for k, v in cfg.adapters.items()}
    peft = PeftModel.from_pretrained(hf, str(xl_dir), config=cfg).to(torch.bfloat16).eval()
    with torch.inference_mode():
        t = time.perf_counter()
        peft.generate(input_ids=ids, **gen)
        ours["transformers+PEFT X-LoRA (no KV cache)"] = total / (time.perf_counter() - t)
    floors = {"base": floor_of(roof, llm, None, len(prompts)), "X-LoRA": floor_of(roof, llm, xl, len(prompts))}
    print(f"\n# the first {len(prompts)} prompts x {new_tokens} tokens")
    print("| engine | tok/s | floor tok/s | of floor |\n|---|---|---|---|")
    for k, v in ours.items():
        floor = floors["X-LoRA" if "X-LoRA" in k else "base"]
        print(f"| {k} | {v:.1f} | {floor:.1f} | {v / floor:.0%} |")
    print(f"\nloraplex X-LoRA / transformers+PEFT X-LoRA: "
          f"{ours['loraplex X-LoRA'] / ours['transformers+PEFT X-LoRA (no KV cache)']:.1f}x")


if __name__ == "__main__":
    main()
