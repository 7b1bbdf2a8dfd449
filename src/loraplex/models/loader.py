"""Load a :class:`DecoderLM` with its tokenizer from an HF directory (safetensors, sharded or not) or a GGUF file."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loraplex.models.gguf_tensors import read_gguf
from loraplex.models.model_config import ModelSpec
from loraplex.models.quant_load import Dense, PlanFor, fill_quantized, targets
from loraplex.models.registry import ModelSource
from loraplex.models.transformer import DecoderLM

log = logging.getLogger("loraplex.engine")


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


def _safetensors_sources(path: Path) -> Iterator[tuple[str, Dense]]:
    """Each tensor of the checkpoint as a :class:`Dense` source, in file order, nothing read yet."""
    for f in safetensors_files(path):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                yield name, Dense(fh, 8 + n + info["data_offsets"][0], info["dtype"], info["shape"])


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


def _cached(out: Path, marker: str, write) -> Path:
    """``out`` under the cache, written once by ``write(tmp_dir)`` into a temporary sibling then renamed."""
    if (out / marker).is_file():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent if out.parent.exists() else None))
    write(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / marker).is_file():  # not "another process wrote it first": a real error
            raise
    return out


KEY_SPAN = 1 << 20  # bytes of a GGUF file read at each of three places for its cache name


def _gguf_key(source: ModelSource) -> str:
    """The GGUF file's cache name: its stem, size and a digest of its first, middle and last MB (not its mtime: every
    reinstall of a weights package would leave another ~0.5 GB copy of the same file behind)."""
    path = source.path / source.gguf_file
    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=8)
    with open(path, "rb") as f:
        for at in (0, max(0, size // 2 - KEY_SPAN // 2), max(0, size - KEY_SPAN)):
            f.seek(at)
            digest.update(f.read(KEY_SPAN))
    return f"{Path(source.gguf_file).stem}-{size}-{digest.hexdigest()}"


def gguf_metadata(source: ModelSource) -> Path:
    """An HF directory with only the config and tokenizer of a GGUF file (transformers reads the metadata, no tensor),
    cached: reading them takes ~9 s for SmolLM2."""
    from transformers import AutoConfig, AutoTokenizer

    def write(tmp: Path) -> None:
        hf_config = AutoConfig.from_pretrained(str(source.path), gguf_file=source.gguf_file)
        ModelSpec.from_hf_config(hf_config)  # refuse unsupported architectures early
        AutoTokenizer.from_pretrained(str(source.path), gguf_file=source.gguf_file).save_pretrained(tmp)
        hf_config.save_pretrained(tmp)

    return _cached(cache_dir() / f"{_gguf_key(source)}-meta", "config.json", write)


def convert_gguf(source: ModelSource) -> ModelSource:
    """Dequantize a GGUF file once into an HF directory (fp32 safetensors, config, tokenizer) under the cache.

    Reading GGUF metadata and dequantizing takes ~15 s for SmolLM2-135M; the converted copy loads in ~1 s.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig

    def write(tmp: Path) -> None:
        meta = gguf_metadata(source)
        log.info("dequantizing %s to fp32 once (--quantization gguf keeps its quantized blocks instead)",
                 source.gguf_file)
        hf_config = AutoConfig.from_pretrained(str(meta))
        tensors = {name: t.contiguous() for name, t in _gguf_weights(source, hf_config)}
        for f in meta.iterdir():
            shutil.copy(f, tmp / f.name)
        save_file(tensors, str(tmp / "model.safetensors"))

    return ModelSource(source.model_id, _cached(cache_dir() / _gguf_key(source), "model.safetensors", write))


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


def load_model(source: ModelSource, dtype: torch.dtype, device: str, max_model_len: int | None,
               quantization: str | None = None, plan_for: PlanFor | None = None) -> LoadedModel:
    """Build the decoder for ``source`` and fill it with its weights (cast to ``dtype`` on ``device``).

    ``max_model_len`` defaults to the model's own limit (context length, or sliding window when it has one).
    ``quantization`` int8 | int4 | gguf: the projections, embedding and LM head are quantized tensor by tensor as
    they are read (``quant_load``), never all in full precision; ``plan_for(method, in, out)`` gives each shape's
    kernel paths. ``gguf`` (GGUF files only) keeps each tensor in the nearest kernel format to its own type.
    Without it a GGUF file is dequantized (once, cached) and cast to ``dtype``.
    """
    from transformers import AutoConfig, AutoTokenizer

    if quantization == "gguf" and not source.is_gguf:
        raise ValueError(f"quantization: 'gguf' keeps a GGUF file's own quantization, but {source.model_id!r} is "
                         f"not a .gguf model; use int8 or int4")
    if quantization is not None and plan_for is None:
        raise ValueError("plan_for: needed with quantization (which kernel path serves which batch size)")
    hf_dir = (gguf_metadata(source) if quantization else convert_gguf(source).path) if source.is_gguf else source.path
    try:
        hf_config = AutoConfig.from_pretrained(str(hf_dir))
    except ValueError as e:
        raise ValueError(f"model: cannot read the config of {source.model_id!r}: {e}") from e
    spec = ModelSpec.from_hf_config(hf_config)
    limit = min(x for x in (spec.max_position_embeddings, spec.sliding_window) if x)
    if max_model_len is None:
        max_model_len = limit
    elif not 2 <= max_model_len <= limit:
        raise ValueError(f"max_model_len: must be in [2, {limit}] for {source.model_id!r}, got {max_model_len}")
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    if quantization is None:
        model = DecoderLM(spec, dtype, device, max_positions=max_model_len)
        model.load_weights(_hf_weights(hf_dir))
    else:
        model = DecoderLM(spec, dtype, device, max_positions=max_model_len, skeleton=True)
        if source.is_gguf:
            _, gguf = read_gguf(str(source.path / source.gguf_file), spec.num_heads, spec.num_kv_heads)
            kinds = targets(quantization, spec, {name: t.qtype for name, t in gguf})
            tensors = tqdm(gguf, desc="Loading GGUF weights (quantized)", unit="tensor", leave=False)
        else:
            kinds = targets(quantization, spec, {})
            tensors = tqdm(_safetensors_sources(hf_dir), desc="Loading safetensors weights (quantizing)",
                           unit="tensor", leave=False)
        built = fill_quantized(model, tensors, kinds, plan_for)
        log.info("%s: projections %s; embedding %s, LM head %s", quantization,
                 ", ".join(f"{n} {k}" for k, n in sorted(built.items())), kinds["embed"].kind,
                 kinds["embed" if spec.tie_word_embeddings else "head"].kind)
    model.eval()
    src = ModelSource(source.model_id, hf_dir)
    return LoadedModel(source, spec, model, tokenizer, _eos_ids(src, hf_config, tokenizer), max_model_len)
