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

import torch

from loraplex.models.model_config import ModelSpec

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def module_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """``module -> (in_features, out_features)`` of the base linears."""
    h, i = spec.hidden_size, spec.intermediate_size
    return {"q_proj": (h, spec.q_size), "k_proj": (h, spec.kv_size), "v_proj": (h, spec.kv_size),
            "o_proj": (spec.q_size, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@dataclass
class LoRAWeights:
    """One adapter in memory: ``weights[(layer, module)] = (A [r, in], B·scale [out, r])``."""

    name: str
    path: str
    rank: int  # the largest rank of any module
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def _pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rule: a pattern key applies when the module's dotted name ends with it (regex allowed)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def load_peft_lora(name: str, path: str | Path, spec: ModelSpec, max_lora_rank: int,
                   dtype: torch.dtype = torch.float32) -> LoRAWeights:
    """Load and validate; raise ``ValueError("adapter 'name': …")`` on anything not served exactly."""
    path = Path(path)

    def refuse(why: str) -> ValueError:
        return ValueError(f"adapter {name!r} ({path}): {why}")

    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise refuse("no adapter_config.json (not a PEFT adapter directory)")
    cfg = json.loads(cfg_file.read_text())
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
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        if (path / "adapter_model.bin").is_file():
            raise refuse("adapter_model.bin is a pickle and is refused; save it with safetensors")
        raise refuse("no adapter_model.safetensors")

    from safetensors.torch import load_file

    tensors = load_file(str(weights_file))
    shapes = module_shapes(spec)
    layers = cfg.get("layers_to_transform")
    layers = None if layers is None else {layers} if isinstance(layers, int) else set(layers)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if "lora_embedding" in key or "embed_tokens" in key or "lm_head" in key:
            raise refuse(f"embedding / lm_head targets are not supported ({key})")
        if "lora_magnitude_vector" in key:
            raise refuse("DoRA adapters are not supported")
        m = _KEY.search(key)
        if m is None or m.group(2) not in MODULES:
            raise refuse(f"tensor {key!r} targets a module loraplex cannot serve")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= spec.num_layers:
            raise refuse(f"tensor {key!r} is for layer {layer}, the base has {spec.num_layers} layers")
        if layers is not None and layer not in layers:
            continue
        pairs.setdefault((layer, module), {})[ab] = t

    weights = {}
    max_rank = 0
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise refuse(f"layer {layer} {module} has lora_{''.join(ab)} without its partner")
        a, b = ab["A"], ab["B"]
        n_in, n_out = shapes[module]
        r = a.shape[0]
        if a.shape != (r, n_in) or b.shape != (n_out, r):
            raise refuse(f"layer {layer} {module}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the base "
                         f"linear {n_in}->{n_out} (wrong base model?)")
        if r > max_lora_rank:
            raise refuse(f"rank {r} > max_lora_rank {max_lora_rank}; restart with max_lora_rank={r}")
        module_path = f"model.layers.{layer}.{'self_attn' if module[0] in 'qkvo' else 'mlp'}.{module}"
        alpha = _pattern_value(cfg.get("alpha_pattern"), module_path, cfg.get("lora_alpha", r))
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        weights[layer, module] = (a.to(dtype), (b.float() * scale).to(dtype))
        max_rank = max(max_rank, r)
    if not weights:
        raise refuse("no LoRA weights for any layer loraplex serves")
    return LoRAWeights(name, str(path), max_rank, weights)
