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
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loraplex.lora.peft_format import MODULES, LoRAPlan

_CLASSIFIER_KEY = re.compile(r"internal_xlora_classifier\.layers\.(?:(\d+)\.)?(weight|bias)$")


def is_xlora_dir(path: str | Path) -> bool:
    cfg = Path(path) / "adapter_config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("peft_type") == "XLORA"
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class XLoRAConfig:
    """The fields of PEFT's ``XLoraConfig`` that change inference."""

    experts: tuple[str, ...]
    hidden_size: int
    xlora_depth: int = 1
    layerwise_scalings: bool = False
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0


@dataclass
class XLoRAPlan:
    """A validated X-LoRA: config, expert directories (name -> path), classifier tensors (CPU, fp32)."""

    name: str
    path: str
    config: XLoRAConfig
    expert_paths: dict[str, str]
    classifier: list[tuple[torch.Tensor, torch.Tensor]]  # (weight, bias) per Linear, in order

    def expert_names(self) -> tuple[str, ...]:
        """Registry names of the experts: ``<x-lora name>/<expert>``."""
        return tuple(f"{self.name}/{e}" for e in self.config.experts)


def _expert_dir(root: Path, index: int, name: str, configured: str) -> Path:
    tried = [root / name, root / str(index)]
    if configured:
        p = Path(configured).expanduser()
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
    want = n_experts * (n_modules if cfg.layerwise_scalings else 1)
    if out != want:
        raise ValueError(f"adapter {plan.name!r}: the classifier gives {out} outputs, expected {want} ({n_experts} "
                         f"experts x {n_modules if cfg.layerwise_scalings else 1} LoRA modules)")


def module_order(expert_plans: list[LoRAPlan]) -> list[tuple[int, str]]:
    """PEFT numbers the LoRA-wrapped linears (any expert targets them) in module order: layer, then q, k, v, o,
    gate, up, down. Classifier outputs are laid out by that number."""
    keys = {(e[0], e[1]) for p in expert_plans for e in p.entries}
    return sorted(keys, key=lambda k: (k[0], MODULES.index(k[1])))


class XLoRAGate(nn.Module):
    """The classifier plus PEFT's post-processing: hidden ``[T, H]`` → weights ``[T, L, 7, E]``.

    ``L`` is the model's layer count and 7 our module order (``peft_format.MODULES``): weight of expert ``e`` at
    layer ``l``, module ``m`` for token ``t``, already multiplied by ``global_scaling_weight``; zero where no expert
    has a LoRA.
    """

    def __init__(self, plan: XLoRAPlan, modules: list[tuple[int, str]], num_layers: int, dtype: torch.dtype,
                 device) -> None:
        super().__init__()
        self.config = plan.config
        self.num_layers = num_layers
        self.n_modules = len(modules)
        self.n_experts = len(plan.config.experts)
        layers: list[nn.Module] = []
        for i, (w, b) in enumerate(plan.classifier):
            lin = nn.Linear(w.shape[1], w.shape[0], dtype=dtype, device=device)
            lin.weight.data.copy_(w)
            lin.bias.data.copy_(b)
            layers += [lin] if i == len(plan.classifier) - 1 else [lin, nn.ReLU()]
        self.layers = nn.Sequential(*layers).requires_grad_(False)
        check_classifier(plan, len(modules))
        self.register_buffer("layer_idx", torch.tensor([l for l, _ in modules], device=device), persistent=False)
        self.register_buffer("module_idx", torch.tensor([MODULES.index(m) for _, m in modules], device=device),
                             persistent=False)

    def postprocess(self, scalings: torch.Tensor) -> torch.Tensor:
        """PEFT's per-layer top-k mask and top-k softmax on ``[T, n_modules, E]``, then the global weight."""
        cfg = self.config
        if cfg.top_k_lora is not None:
            idx = torch.topk(scalings, k=cfg.top_k_lora, dim=-1).indices
            scalings = scalings * torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, idx, True)
        if cfg.enable_softmax_topk:
            nonzero = scalings != 0
            scalings = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
        return scalings * cfg.global_scaling_weight

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[T, H]`` final hidden states of the scaling pass → ``[T, n_modules, E]`` processed weights."""
        logits = self.layers(hidden).view(hidden.shape[0], -1, self.n_experts)
        logits = logits.expand(-1, self.n_modules, -1) if not self.config.layerwise_scalings else logits
        if self.config.enable_softmax:
            logits = torch.softmax(logits / self.config.softmax_temperature, dim=-1)
        return self.postprocess(logits)

    def scaling_pass_weights(self, n_tokens: int) -> torch.Tensor | None:
        """Weights of the scaling pass (``scaling_pass_value`` everywhere, through the same top-k rules) or None when
        they are all zero (the scaling pass is then the base model)."""
        value = torch.full((1, self.n_modules, self.n_experts), float(self.config.scaling_pass_value),
                           dtype=self.layers[0].weight.dtype, device=self.layer_idx.device)
        w = self.postprocess(value)
        return None if not w.any() else w.expand(n_tokens, -1, -1)

    def spread(self, w: torch.Tensor) -> torch.Tensor:
        """``[T, n_modules, E]`` → ``[T, L, 7, E]`` in our (layer, module) layout."""
        out = w.new_zeros(w.shape[0], self.num_layers, len(MODULES), self.n_experts)
        out[:, self.layer_idx, self.module_idx] = w
        return out
