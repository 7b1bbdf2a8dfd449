"""Read a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) and check it fits the base.

What is supported: ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``/``alpha_pattern``, ``target_modules``
over q/k/v/o/gate/up/down (list, ``"all-linear"``, regex), ``layers_to_transform``. What is refused, with the
adapter's name and the reason: pickle weights, DoRA, ``modules_to_save``, embedding / lm_head targets, biases,
ranks over ``max_lora_rank``, shapes that do not match the base.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from loraplex.layers.projections import MODULES, ModuleShapes, hf_module_path

_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


@dataclass
class LoRAWeights:
    """One adapter in memory: ``weights[(layer, module)] = (A [r, in], B·scale [out, r])``."""

    name: str
    path: str
    rank: int  # the largest rank of any module
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def _pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rule: a pattern key applies when the module's dotted name ends with it (regex allowed)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


class PlanEntry(NamedTuple):
    """One LoRA-wrapped module of an adapter: where its A and B tensors are, its rank and its scale."""

    layer: int
    module: str
    key_a: str
    key_b: str
    rank: int
    scale: float


@dataclass(frozen=True)
class LoRAPlan:
    """A validated adapter before its tensors are read: one :class:`PlanEntry` per (layer, module)."""

    name: str
    path: str
    file: str
    entries: tuple[PlanEntry, ...]

    @property
    def rank(self) -> int:
        return max(e.rank for e in self.entries)


def inspect_peft_lora(name: str, path: str | Path, shapes: ModuleShapes, max_lora_rank: int) -> LoRAPlan:
    """Validate config and tensor shapes (read from the safetensors header only); raise ``ValueError("adapter …")``."""
    path = Path(path)

    def refuse(why: str) -> ValueError:
        return ValueError(f"adapter {name!r} ({path}): {why}")

    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise refuse("no adapter_config.json (not a PEFT adapter directory)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise refuse(f"adapter_config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise refuse("adapter_config.json must hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise refuse(f"peft_type {cfg.get('peft_type')!r} is not LoRA")
    if cfg.get("use_dora"):
        raise refuse("DoRA adapters are not supported")
    if cfg.get("modules_to_save"):
        raise refuse(f"modules_to_save {cfg['modules_to_save']} (fully trained modules) are not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise refuse("adapters that train biases are not supported")
    if cfg.get("fan_in_fan_out"):
        raise refuse("fan_in_fan_out (Conv1D layout) is not supported")
    declared = [cfg.get("r", 8), *(cfg.get("rank_pattern") or {}).values()]
    if all(isinstance(r, int) for r in declared) and max(declared) > max_lora_rank:  # before reading any weights
        raise refuse(f"rank {max(declared)} > max_lora_rank {max_lora_rank}; restart with "
                     f"max_lora_rank={max(declared)}")
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        if (path / "adapter_model.bin").is_file():
            raise refuse("adapter_model.bin is a pickle and is refused; save it with safetensors")
        raise refuse("no adapter_model.safetensors")

    from safetensors import safe_open

    try:
        with safe_open(str(weights_file), framework="pt") as f:
            key_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors' own error type: a truncated or corrupt file
        raise refuse(f"adapter_model.safetensors is not a readable safetensors file ({e})") from None
    layers = cfg.get("layers_to_transform")
    layers = None if layers is None else {layers} if isinstance(layers, int) else set(layers)
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key in key_shapes:
        if "lora_embedding" in key or "embed_tokens" in key or "lm_head" in key:
            raise refuse(f"embedding / lm_head targets are not supported ({key})")
        if "lora_magnitude_vector" in key:
            raise refuse("DoRA adapters are not supported")
        m = _KEY.search(key)
        if m is None or m.group(2) not in MODULES:
            raise refuse(f"tensor {key!r} targets a module loraplex cannot serve")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= shapes.num_layers:
            raise refuse(f"tensor {key!r} is for layer {layer}, the base has {shapes.num_layers} layers")
        if layers is not None and layer not in layers:
            continue
        pairs.setdefault((layer, module), {})[ab] = key

    entries = []
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise refuse(f"layer {layer} {module} has lora_{''.join(ab)} without its partner")
        a, b = key_shapes[ab["A"]], key_shapes[ab["B"]]
        n_in, n_out = shapes.shapes[module]
        r = a[0]
        if a != (r, n_in) or b != (n_out, r):
            raise refuse(f"layer {layer} {module}: A {a} / B {b} do not fit the base linear {n_in}->{n_out} "
                         f"(wrong base model?)")
        if r > max_lora_rank:
            raise refuse(f"rank {r} > max_lora_rank {max_lora_rank}; restart with max_lora_rank={r}")
        module_path = f"model.{hf_module_path(layer, module)}"
        alpha = _pattern_value(cfg.get("alpha_pattern"), module_path, cfg.get("lora_alpha", r))
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        entries.append(PlanEntry(layer, module, ab["A"], ab["B"], r, scale))
    if not entries:
        raise refuse("no LoRA weights for any layer loraplex serves")
    return LoRAPlan(name, str(path), str(weights_file), tuple(entries))


def read_lora(plan: LoRAPlan, dtype: torch.dtype = torch.float32) -> LoRAWeights:
    """Read a validated adapter's tensors: ``(A, B·scale)`` per (layer, module), in ``dtype``."""
    from safetensors import safe_open

    weights = {}
    with safe_open(plan.file, framework="pt") as f:
        for layer, module, key_a, key_b, _, scale in plan.entries:
            weights[layer, module] = (f.get_tensor(key_a).to(dtype), (f.get_tensor(key_b).float() * scale).to(dtype))
    return LoRAWeights(plan.name, plan.path, plan.rank, weights)


def load_peft_lora(name: str, path: str | Path, shapes: ModuleShapes, max_lora_rank: int,
                   dtype: torch.dtype = torch.float32) -> LoRAWeights:
    """Validate and read in one go."""
    return read_lora(inspect_peft_lora(name, path, shapes, max_lora_rank), dtype)
