"""Load a :class:`DecoderLM` with its tokenizer from an HF directory (safetensors, sharded or not) or a GGUF file."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loraplex.models.model_config import ModelSpec
from loraplex.models.registry import ModelSource
from loraplex.models.transformer import DecoderLM


@dataclass
class LoadedModel:
    """The model, its tokenizer and what the engine needs from the configs."""

    source: ModelSource
    spec: ModelSpec
    model: DecoderLM
    tokenizer: object
    eos_token_ids: frozenset[int]
    max_model_len: int


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        why = f" (found {pickles[0]}: pickle checkpoints are refused, convert to safetensors)" if pickles else ""
        raise ValueError(f"model: no *.safetensors weights in {str(path)!r}{why}")
    return files


def _hf_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = safetensors_files(path)
    handles = [safe_open(str(f), framework="pt") for f in files]
    total = sum(len(h.keys()) for h in handles)
    with tqdm(total=total, desc="Loading safetensors weights", unit="tensor", leave=False) as bar:
        for h in handles:
            for name in h.keys():
                yield name, h.get_tensor(name)
                bar.update()


def _gguf_weights(source: ModelSource, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers needs a model skeleton only to map GGUF names to HF names; on "meta" it costs no memory.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    tensors = load_gguf_checkpoint(str(source.path / source.gguf_file), return_tensors=True,
                                   model_to_load=skeleton)["tensors"]
    yield from tqdm(tensors.items(), desc="Loading GGUF weights", unit="tensor", leave=False)


def cache_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_CACHE", Path.home() / ".cache" / "loraplex"))


def convert_gguf(source: ModelSource) -> ModelSource:
    """Dequantize a GGUF file once into an HF directory (fp32 safetensors, config, tokenizer) under the cache.

    Reading GGUF metadata and dequantizing takes ~15 s for SmolLM2-135M; the converted copy loads in ~1 s.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    gguf = source.path / source.gguf_file
    st = gguf.stat()
    out = cache_dir() / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"
    if (out / "model.safetensors").is_file():
        return ModelSource(source.model_id, out)
    hf_config = AutoConfig.from_pretrained(str(source.path), gguf_file=source.gguf_file)
    ModelSpec.from_hf_config(hf_config)  # refuse unsupported architectures before the slow part
    tokenizer = AutoTokenizer.from_pretrained(str(source.path), gguf_file=source.gguf_file)
    tensors = {name: t.contiguous() for name, t in _gguf_weights(source, hf_config)}
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent if out.parent.exists() else None))
    hf_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file(tensors, str(tmp / "model.safetensors"))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "model.safetensors").is_file():  # not "another process converted it first": a real error
            raise
    return ModelSource(source.model_id, out)


def local_hf_dir(model: str | None = None) -> str:
    """An HF directory for ``model`` (alias, path or .gguf) that transformers can load offline; GGUF is converted once."""
    from loraplex.models.registry import resolve_model

    source = resolve_model(model)
    return str(convert_gguf(source).path if source.is_gguf else source.path)


def _eos_ids(source: ModelSource, hf_config, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for value in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    gen = source.path / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return frozenset(ids)


def load_model(source: ModelSource, dtype: torch.dtype, device: str, max_model_len: int | None) -> LoadedModel:
    """Build the decoder for ``source`` and fill it with its weights (cast to ``dtype`` on ``device``).

    ``max_model_len`` defaults to the model's own limit (context length, or sliding window when it has one).
    """
    from transformers import AutoConfig, AutoTokenizer

    if source.is_gguf:
        source = convert_gguf(source)
    try:
        hf_config = AutoConfig.from_pretrained(str(source.path))
    except ValueError as e:
        raise ValueError(f"model: cannot read the config of {source.model_id!r}: {e}") from e
    spec = ModelSpec.from_hf_config(hf_config)
    limit = min(x for x in (spec.max_position_embeddings, spec.sliding_window) if x)
    if max_model_len is None:
        max_model_len = limit
    elif not 2 <= max_model_len <= limit:
        raise ValueError(f"max_model_len: must be in [2, {limit}] for {source.model_id!r}, got {max_model_len}")
    tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    model = DecoderLM(spec, dtype, device, max_positions=max_model_len)
    model.load_weights(_hf_weights(source.path))
    model.eval()
    return LoadedModel(source, spec, model, tokenizer, _eos_ids(source, hf_config, tokenizer), max_model_len)
