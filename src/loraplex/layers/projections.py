"""The decoder layer's linears as data: which HF modules stack into which matmul, and their shapes.

Stated once here; the loader (stacking checkpoint tensors), the LoRA slots, the PEFT reader, X-LoRA and merge read
it. ``MODULES`` is also PEFT's order of the LoRA-wrapped modules inside a layer.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Projection(NamedTuple):
    """One matmul of a decoder layer: our parameter ``name``, its HF parent ``block`` and the HF ``modules`` whose
    outputs it concatenates (in that order)."""

    name: str
    block: str
    modules: tuple[str, ...]


PROJECTIONS = (
    Projection("qkv_proj", "self_attn", ("q_proj", "k_proj", "v_proj")),
    Projection("o_proj", "self_attn", ("o_proj",)),
    Projection("gate_up_proj", "mlp", ("gate_proj", "up_proj")),
    Projection("down_proj", "mlp", ("down_proj",)),
)
PROJECTION_OF = {m: p for p in PROJECTIONS for m in p.modules}  # HF module -> the projection it is part of


class Shard(NamedTuple):
    """Where an HF module's rows sit inside its projection's weight."""

    projection: Projection
    index: int
    offset: int
    size: int


@dataclass(frozen=True)
class ModuleShapes:
    """``shapes[module] = (in_features, out_features)`` for the 7 modules of every layer, and the layer count."""

    num_layers: int
    shapes: Mapping[str, tuple[int, int]]

    @classmethod
    def of(cls, num_layers: int, hidden_size: int, intermediate_size: int, q_size: int,
           kv_size: int) -> "ModuleShapes":
        h, i = hidden_size, intermediate_size
        return cls(num_layers, {"q_proj": (h, q_size), "k_proj": (h, kv_size), "v_proj": (h, kv_size),
                                "o_proj": (q_size, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)})

    @property
    def hidden_size(self) -> int:
        return self.shapes["q_proj"][0]

    def in_features(self, projection: Projection) -> int:
        return self.shapes[projection.modules[0]][0]

    def out_sizes(self, projection: Projection) -> list[int]:
        return [self.shapes[m][1] for m in projection.modules]

    def shard(self, module: str) -> Shard:
        p = PROJECTION_OF[module]
        i = p.modules.index(module)
        sizes = self.out_sizes(p)
        return Shard(p, i, sum(sizes[:i]), sizes[i])


def hf_module_path(layer: int, module: str) -> str:
    """HF's dotted name of a layer's module, without the ``model.`` prefix: ``layers.3.self_attn.q_proj``."""
    return f"layers.{layer}.{PROJECTION_OF[module].block}.{module}"
