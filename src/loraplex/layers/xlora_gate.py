"""X-LoRA's gate (PEFT ``XLoraConfig`` semantics): the classifier over the scaling pass's final hidden states and
PEFT's post-processing of its logits into per-token weights for every (layer, module, expert)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loraplex.layers.projections import MODULES


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


def classifier_outputs(config: XLoRAConfig, n_modules: int) -> int:
    """The classifier's last layer gives one logit per expert (per LoRA module if ``layerwise_scalings``)."""
    return len(config.experts) * (n_modules if config.layerwise_scalings else 1)


class XLoRAGate(nn.Module):
    """The classifier plus PEFT's post-processing: hidden ``[T, H]`` → weights ``[T, L, 7, E]``.

    ``L`` is the model's layer count and 7 the module order ``MODULES``: weight of expert ``e`` at
    layer ``l``, module ``m`` for token ``t``, already multiplied by ``global_scaling_weight``; zero where no expert
    has a LoRA.
    """

    def __init__(self, config: XLoRAConfig, classifier: list[tuple[torch.Tensor, torch.Tensor]],
                 modules: list[tuple[int, str]], num_layers: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.config = config
        self.num_layers = num_layers
        self.n_modules = len(modules)
        self.n_experts = len(config.experts)
        if classifier[-1][0].shape[0] != classifier_outputs(config, len(modules)):
            raise ValueError(f"the classifier gives {classifier[-1][0].shape[0]} outputs, expected "
                             f"{classifier_outputs(config, len(modules))}")
        layers: list[nn.Module] = []
        for i, (w, b) in enumerate(classifier):
            lin = nn.Linear(w.shape[1], w.shape[0], dtype=dtype, device=device)
            lin.weight.data.copy_(w)
            lin.bias.data.copy_(b)
            layers += [lin] if i == len(classifier) - 1 else [lin, nn.ReLU()]
        self.layers = nn.Sequential(*layers).requires_grad_(False)
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
