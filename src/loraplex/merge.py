"""Static merge export: fold PEFT LoRA adapters into the base weights and write a plain HF model directory.

For every targeted linear ``W += Σ_i w_i · scale_i · B_i @ A_i`` (delta in fp32, then cast to the output dtype).
Adapters are read and validated by :mod:`loraplex.lora.peft_format` (ranks, rsLoRA, rank/alpha patterns,
``layers_to_transform``); the base is streamed one safetensors file at a time, keeping its file layout.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loraplex.layers.projections import hf_module_path
from loraplex.lora.demo import demo_adapters, resolve_adapter_path
from loraplex.lora.peft_format import inspect_peft_lora, read_lora
from loraplex.models.loader import local_hf_dir, safetensors_files
from loraplex.models.model_config import ModelSpec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# non-weight files of the base that the merged directory keeps (config.json is rewritten separately)
_COPY = ("generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*",
         "vocab.json", "merges.txt")


def _check_out(out: Path, base_dir: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {str(out)!r} exists and is not a directory")
    if out.exists() and out.resolve() == base_dir.resolve():
        raise ValueError(f"out: {str(out)!r} is the base model's own directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"out: {str(out)!r} exists and is not empty; pass force=True (--force) to replace it")


def merge_adapters(base: str | None, adapters: list[str], weights: list[float] | None, out: str | Path,
                   dtype: str | torch.dtype | None = None, force: bool = False) -> Path:
    """Merge ``adapters`` (directories or demo adapter names) with ``weights`` (default all 1.0) into ``base``.

    ``base`` takes what ``LLM(model=...)`` takes (alias, HF directory, .gguf). ``dtype`` (bfloat16, float16,
    float32) defaults to each base tensor's own dtype. Tied embeddings stay tied (no ``lm_head.weight`` written).
    The directory is built next to ``out`` and renamed into place, so a failed merge leaves nothing behind.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig

    if not adapters:
        raise ValueError("adapter: give at least one adapter to merge")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"weights: {len(weights)} given for {len(adapters)} adapters")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    base_dir = Path(local_hf_dir(base))
    out = Path(out).expanduser()
    _check_out(out, base_dir, force)
    spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(str(base_dir)))

    # base tensor name without "model." -> [(w, A, B·scale)], one entry per adapter that targets it
    parts: dict[str, list[tuple[float, torch.Tensor, torch.Tensor]]] = {}
    for name, w in zip(adapters, weights):
        path = resolve_adapter_path(name)
        if not Path(path).is_dir():
            raise ValueError(f"adapter: {name!r} is neither a directory nor a demo adapter "
                             f"({', '.join(demo_adapters())})")
        lora = read_lora(inspect_peft_lora(name, path, spec.module_shapes, max_lora_rank=1 << 30))
        for (layer, module), (a, b) in lora.weights.items():
            key = f"{hf_module_path(layer, module)}.weight"
            parts.setdefault(key, []).append((w, a, b))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files = safetensors_files(base_dir)
        handles = [safe_open(str(f), framework="pt") for f in files]
        weight_map, total_size = {}, 0
        with tqdm(total=sum(len(h.keys()) for h in handles), desc="Merging", unit="tensor", leave=False) as bar:
            for f, h in zip(files, handles):
                tensors = {}
                for name in h.keys():
                    bar.update()
                    if name == "lm_head.weight" and spec.tie_word_embeddings:
                        continue
                    t = h.get_tensor(name)
                    to = dtype if dtype is not None and t.is_floating_point() else t.dtype
                    contributions = parts.pop(name.removeprefix("model."), None)
                    if contributions:
                        t = t.to(torch.float32, copy=True)
                        for w, a, b in contributions:
                            t.addmm_(b, a, alpha=w)
                    tensors[name] = t.to(to).contiguous()
                    weight_map[name] = f.name
                    total_size += tensors[name].numel() * tensors[name].element_size()
                save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
        if parts:
            raise ValueError(f"base: {str(base_dir)!r} has no tensors for {sorted(parts)[:3]} targeted by the adapters")
        if len(files) > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = json.loads((base_dir / "config.json").read_text())
        if dtype is not None:  # transformers 5 writes "dtype", 4.x "torch_dtype": update the one(s) the base has
            for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
                config[key] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for pattern in _COPY:
            for src in base_dir.glob(pattern):
                if src.is_file():
                    shutil.copy2(src, tmp / src.name)
        mask = os.umask(0)  # mkdtemp and save_file create owner-only entries; give them the usual permissions
        os.umask(mask)
        for p in (tmp, *tmp.glob("*.safetensors")):
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
