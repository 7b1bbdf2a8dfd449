"""Fixed-size LoRA slot buffers beside each (stacked) base linear; loading an adapter is a copy into a slot.

Slot ``max_loras`` (the last) stays zero: tokens without an adapter point there when a step mixes base and adapter
rows. The buffers are as wide as the largest rank loaded so far (grown on demand, up to ``max_lora_rank``): smaller
ranks are zero-padded to it, so rows of different ranks share one batched op, and a server of rank-16 adapters pays
for rank 16, not for ``max_lora_rank``.
"""
from __future__ import annotations

import torch
from torch import nn

from loraplex import ops
from loraplex.layers.projections import MODULES, ModuleShapes, Projection
from loraplex.ops.lora_batch import LoRABatch


class LoRAStack(nn.Module):
    """LoRA for one projection whose output is the concatenation of its modules' outputs (e.g. q|k|v).

    ``lora_a: [S + 1, n_slices · R, in]`` (slice i's A in rows ``i·R .. i·R + r``), ``lora_b[i]: [S + 1, size_i, R]``
    with ``R = self.rank``, the largest rank written so far (at most ``max_rank``).
    """

    # NOTE: bumped whenever any stack reallocates its buffers (``_grow``): what holds their addresses (the fused
    # decode step's table) rebuilds when it changes.
    generation = 0

    def __init__(self, projection: Projection, shapes: ModuleShapes, max_loras: int, max_rank: int,
                 dtype: torch.dtype, device, layer: int = 0) -> None:
        super().__init__()
        self.modules_ = projection.modules
        in_features, out_sizes = shapes.in_features(projection), shapes.out_sizes(projection)
        self.layer = layer  # X-LoRA weights are per (layer, module)
        self.module_pos = [MODULES.index(m) for m in projection.modules]
        self.max_rank = max_rank
        self.rank = 1  # R: the buffers' width; grows to the largest rank written (``_grow``)
        self.out_slices = [(sum(out_sizes[:i]), n) for i, n in enumerate(out_sizes)]
        self.lora_a = torch.zeros(max_loras + 1, len(self.modules_), in_features, dtype=dtype, device=device)
        self.transposed_b = ops.cpu_bgmv_serves(self.lora_a)
        self.lora_bt: list[torch.Tensor] | None = [None] * len(out_sizes) if self.transposed_b else None
        self.lora_b = [self._new_b(max_loras + 1, n, 1, i) for i, n in enumerate(out_sizes)]
        self.occupied: set[int] = set()  # slots whose adapter targets at least one of this stack's modules
        self.ranks = torch.zeros(max_loras + 1, dtype=torch.int32, device=device)  # true rank per slot (kernels)
        self.rank_of = [0] * (max_loras + 1)  # the same as ints (the torch forms narrow to it)

    def _new_b(self, slots: int, size: int, rank: int, i: int) -> torch.Tensor:
        """A zero B buffer ``[slots, size, rank]`` for slice ``i`` (a view of the transposed storage when the C
        kernel serves)."""
        if not self.transposed_b:
            return self.lora_a.new_zeros(slots, size, rank)
        self.lora_bt[i] = self.lora_a.new_zeros(slots, rank, size)
        return self.lora_bt[i].transpose(1, 2)

    def _grow(self, rank: int) -> None:
        """Widen the buffers to ``rank`` (every slot keeps its weights; the new columns are zero)."""
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} > max_lora_rank {self.max_rank}")
        s, n, old = self.lora_a.shape[0], len(self.modules_), self.rank
        a = self.lora_a.new_zeros(s, n * rank, self.lora_a.shape[-1])
        a.view(s, n, rank, -1)[:, :, :old].copy_(self.lora_a.view(s, n, old, -1))
        self.lora_a = a
        for i, b in enumerate(self.lora_b):
            self.lora_b[i] = self._new_b(s, b.shape[1], rank, i)
            self.lora_b[i][:, :, :old].copy_(b)
        self.rank = rank
        LoRAStack.generation += 1

    def buffers(self) -> tuple[torch.Tensor, list[torch.Tensor], list[tuple[int, int]], torch.Tensor] | None:
        """What the C BGMV kernel reads: ``(lora_a, [Bᵀ per slice], out_slices, ranks)``; None where the B buffers
        are not stored transposed (the C kernel does not serve this dtype or device)."""
        return (self.lora_a, self.lora_bt, self.out_slices, self.ranks) if self.transposed_b else None

    def set_slot(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write one adapter's (A, B·scale) per module name into ``slot``; absent modules stay zero."""
        needed = max((a.shape[0] for m, (a, _) in weights.items() if m in self.modules_), default=0)
        if needed > self.rank:
            self._grow(needed)
        self.lora_a[slot].zero_()
        self.occupied.discard(slot)
        self.ranks[slot] = self.rank_of[slot] = needed
        for i, module in enumerate(self.modules_):
            self.lora_b[i][slot].zero_()
            if module in weights:
                a, b = weights[module]
                r = a.shape[0]
                self.lora_a[slot, i * self.rank:i * self.rank + r].copy_(a)
                self.lora_b[i][slot, :, :r].copy_(b)
                self.occupied.add(slot)

    def forward(self, y: torch.Tensor, x: torch.Tensor, batch: LoRABatch) -> None:
        if self.occupied.isdisjoint(batch.used_slots):  # e.g. attention-only adapters skip the MLP stacks
            return
        ops.add_lora(y, x, self.lora_a, self.lora_b, self.out_slices, batch, self.ranks, self.rank_of, self.lora_bt)
        for group in batch.xlora:
            ops.add_lora_gated(y, x, self.lora_a, self.lora_b, self.out_slices, group,
                               group.weights[:, self.layer, self.module_pos], batch.row_tile, self.rank_of)
