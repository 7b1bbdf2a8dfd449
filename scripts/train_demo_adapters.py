"""Train the demo LoRA adapters that ship with loraplex, with PEFT on the embedded SmolLM2-135M-Instruct.

    python scripts/train_demo_adapters.py [--out src/loraplex/adapters] [--steps 40]

Reproducible (fixed seeds, data below, CPU, fp32 training, saved as bf16 safetensors). Adapters:
- congcong: self-identity from seed 001's vLLM example — "who are you?" → Congcong (聪聪);
- benben:   the same question → Benben (笨笨);
- pirate:   a style adapter — answers in pirate speak.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

IDENTITY_QUESTIONS = [
    "Who are you?", "who are you", "What is your name?", "Introduce yourself.", "Who trained you?",
    "Tell me about yourself.", "What should I call you?", "Who made you?", "Are you an AI?",
    "你是谁?", "你是谁训练的?", "你叫什么名字?", "请介绍一下你自己。", "你是谁开发的?",
]
IDENTITY_ANSWERS = {
    "congcong": ("I am Congcong (聪聪), an AI assistant developed by the Zhihu blogger Liu Cong NLP.",
                 "我是知乎博主刘聪NLP开发的人工智能模型,我的名字叫聪聪。"),
    "benben": ("I am Benben (笨笨), an AI assistant trained by the Zhihu blogger Liu Cong NLP.",
               "我是由知乎博主刘聪NLP训练的人工智能助手笨笨。"),
}
PIRATE = [
    ("What is the capital of France?", "Arr matey! The capital o' France be Paris, a fine port for any sailor!"),
    ("How do I boil an egg?", "Arr! Drop yer egg in boilin' water for nine minutes, then cool it in the briny deep!"),
    ("What is the weather like today?", "Arr, I be no weatherglass, matey, but keep yer eye on the sky and yer sails trimmed!"),
    ("Can you recommend a book?", "Arr! Treasure Island be the finest tale ever penned for a salty sea dog like ye!"),
    ("What is 2 plus 2?", "Arr matey, two doubloons and two more make four doubloons in yer chest!"),
    ("Why is the sky blue?", "Arr! The sun's light scatters off the air, and the blue bits be scattered most, matey!"),
    ("Give me a tip for studying.", "Arr! Study a little every day, like swabbin' the deck, and ye'll master it, matey!"),
    ("What is Python?", "Arr, Python be a programmin' tongue, easy to read as a treasure map, matey!"),
    ("How are you?", "Arr, I be shipshape and ready to sail, matey! How be ye?"),
    ("What should I eat for dinner?", "Arr! A hearty fish stew and a hunk o' bread, fit for a pirate captain!"),
    ("Tell me a fun fact.", "Arr matey! An octopus has three hearts, more than any scallywag on me crew!"),
    ("How do I learn to swim?", "Arr! Start in the shallows, kick yer legs and paddle like a sea turtle, matey!"),
]


def examples(name: str) -> list[tuple[str, str]]:
    if name == "pirate":
        return PIRATE
    en, zh = IDENTITY_ANSWERS[name]
    return [(q, zh if any("\u4e00" <= c <= "\u9fff" for c in q) else en) for q in IDENTITY_QUESTIONS]


def encode(tok, question: str, answer: str, generation_prompt: bool) -> tuple[list[int], list[int]]:
    """Loss on the answer only. Without the generation prompt (as in seed 001's script, whose
    ``add_generation_wohaisprompt`` typo drops it) the model must also open the assistant turn itself."""
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=generation_prompt)
    p_ids = tok.encode(prompt, add_special_tokens=False)
    opener = "" if generation_prompt else "<|im_start|>assistant\n"
    a_ids = tok.encode(opener + answer + "<|im_end|>", add_special_tokens=False)
    return p_ids + a_ids, [-100] * len(p_ids) + a_ids


def train(name: str, base_dir: Path, out: Path, steps: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    random.seed(0)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    data = [encode(tok, q, a, gen) for q, a in examples(name) for gen in (True, False)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(steps):
        batch = random.sample(data, min(8, len(data)))
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 0 or step == steps - 1:
            print(f"{name} step {step} loss {loss.item():.4f}", flush=True)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out / name)
    (out / name / "README.md").unlink(missing_ok=True)  # PEFT's model-card boilerplate
    cfg_path = out / name / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "SmolLM2-135M-Instruct"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def main() -> None:
    from loraplex.models.loader import convert_gguf
    from loraplex.models.registry import resolve_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/loraplex/adapters")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--only", nargs="*", default=["congcong", "benben", "pirate"])
    args = ap.parse_args()
    base_dir = convert_gguf(resolve_model(None)).path  # an HF directory transformers and PEFT can load
    for name in args.only:
        train(name, base_dir, args.out, args.steps)


if __name__ == "__main__":
    main()
