"""X-LoRA (mixture of LoRA experts with a learned per-token gate) as PEFT defines it (``XLoraConfig``).

A request is served in two passes per step. The *scaling pass* runs the model with every expert weighted by
``scaling_pass_value`` (0 = the base model) over its own KV track; its final (normed) hidden state goes through the
classifier, which gives per-token weights ``[T, n_modules, n_experts]`` (softmax with temperature, optional top-k).
The *real pass* then adds ``Σ_e w[t, m, e] · global_scaling_weight · scale_e · B_e A_e x`` at every LoRA module m.
Both passes are causal, so running them token by token with two KV caches equals PEFT's uncached forward over the
whole sequence.

Directory layout (what PEFT's ``PeftModel.from_pretrained`` reads): ``adapter_config.json`` with
``"peft_type": "XLORA"``, ``adapter_model.safetensors`` with the classifier (``…internal_xlora_classifier.layers.N.
{weight,bias}``), and the LoRA experts, each found as the subfolder named after it, the subfolder named by its index
(how PEFT names the experts it saves), or the path in ``adapters`` (absolute or relative to the directory).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.layers.projections import MODULES
from loraplex.layers.xlora_gate import XLoRAConfig, classifier_outputs
from loraplex.lora.peft_format import LoRAPlan

_CLASSIFIER_KEY = re.compile(r"internal_xlora_classifier\.layers\.(?:(\d+)\.)?(weight|bias)$")


def is_xlora_dir(path: str | Path) -> bool:
    cfg = Path(path) / "adapter_config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("peft_type") == "XLORA"
    except (OSError, ValueError):
        return False


@dataclass
class XLoRAPlan:
    """A validated X-LoRA: config, expert directories (name -> path), classifier tensors (CPU, fp32)."""

    name: str
    path: str
    config: XLoRAConfig
    expert_paths: dict[str, str]
    classifier: list[tuple[torch.Tensor, torch.Tensor]]  # (weight, bias) per Linear, in order
    modules: tuple[tuple[int, str], ...] = ()  # the experts' LoRA modules in PEFT's order (set at registration)

    def expert_names(self) -> tuple[str, ...]:
        """Registry names of the experts: ``<x-lora name>/<expert>``."""
        return tuple(f"{self.name}/{e}" for e in self.config.experts)


def _expert_dir(root: Path, index: int, name: str, configured: str) -> Path:
    tried = [root / name, root / str(index)]
    if configured:
        p = Path(os.path.expanduser(configured))  # Path.expanduser raises on "~unknown-user"
        tried.append(p if p.is_absolute() else root / p)
    for p in tried:
        if (p / "adapter_config.json").is_file():
            return p
    raise ValueError(f"expert {name!r}: no LoRA adapter directory at {', '.join(map(str, tried))}")


def inspect_xlora(name: str, path: str | Path, hidden_size: int) -> XLoRAPlan:
    """Read and validate an X-LoRA directory's config and classifier; raise ``ValueError("adapter …")``."""
    root = Path(path)

    def refuse(why: str) -> ValueError:
        return ValueError(f"adapter {name!r} ({root}): {why}")

    raw = json.loads((root / "adapter_config.json").read_text())
    adapters = raw.get("adapters") or {}
    if not isinstance(adapters, dict) or not adapters:
        raise refuse("an X-LoRA config needs a non-empty `adapters` mapping (its LoRA experts)")
    cfg = XLoRAConfig(experts=tuple(adapters), hidden_size=int(raw.get("hidden_size") or hidden_size),
                      **{k: raw[k] for k in XLoRAConfig.__dataclass_fields__
                         if k not in ("experts", "hidden_size") and raw.get(k) is not None})
    if cfg.hidden_size != hidden_size:
        raise refuse(f"hidden_size {cfg.hidden_size} does not match the base model's {hidden_size}")
    if cfg.top_k_lora is not None and not 1 <= cfg.top_k_lora <= len(cfg.experts):
        raise refuse(f"top_k_lora {cfg.top_k_lora} is not in [1, {len(cfg.experts)}]")
    try:
        experts = {e: str(_expert_dir(root, i, e, adapters[e])) for i, e in enumerate(cfg.experts)}
    except ValueError as err:
        raise refuse(str(err)) from None
    weights_file = root / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise refuse("no adapter_model.safetensors (the X-LoRA classifier)")
    from safetensors.torch import load_file

    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        m = _CLASSIFIER_KEY.search(key)
        if m is None:
            raise refuse(f"tensor {key!r} is not part of an X-LoRA classifier")
        found.setdefault(int(m.group(1) or 0), {})[m.group(2)] = tensor.float()
    linears = [found[i] for i in sorted(found)]
    if len(linears) != cfg.xlora_depth or any(set(w) != {"weight", "bias"} for w in linears):
        raise refuse(f"the classifier has {len(linears)} linear layers (weight+bias), xlora_depth is "
                     f"{cfg.xlora_depth}")
    dims = [hidden_size] + [w["weight"].shape[0] for w in linears]
    if any(w["weight"].shape[1] != d for w, d in zip(linears, dims)):
        raise refuse(f"classifier shapes {[tuple(w['weight'].shape) for w in linears]} do not chain from "
                     f"hidden_size {hidden_size}")
    return XLoRAPlan(name, str(root), cfg, experts, [(w["weight"], w["bias"]) for w in linears])


def check_classifier(plan: XLoRAPlan, n_modules: int) -> None:
    """The classifier's last layer must give one logit per expert (per LoRA module if ``layerwise_scalings``)."""
    cfg, n_experts = plan.config, len(plan.config.experts)
    out = plan.classifier[-1][0].shape[0]
    want = classifier_outputs(cfg, n_modules)
    if out != want:
        raise ValueError(f"adapter {plan.name!r}: the classifier gives {out} outputs, expected {want} ({n_experts} "
                         f"experts x {n_modules if cfg.layerwise_scalings else 1} LoRA modules)")


def module_order(expert_plans: list[LoRAPlan]) -> list[tuple[int, str]]:
    """PEFT numbers the LoRA-wrapped linears (any expert targets them) in module order: layer, then q, k, v, o,
    gate, up, down. Classifier outputs are laid out by that number."""
    keys = {(e.layer, e.module) for p in expert_plans for e in p.entries}
    return sorted(keys, key=lambda k: (k[0], MODULES.index(k[1])))


