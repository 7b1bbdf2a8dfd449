"""Per-step LoRA records handed from the model runner to the ops: which adapter (device slot) each token uses.

A step's tokens are decodes first (``num_decodes`` of them, one token per row), then prefill chunks. The decodes
take exactly one of three forms (or none when no decode uses an adapter); prefill chunks (and a step whose decodes
all share one adapter) are :class:`Segment` s. The runner chooses the form (``engine.lora_batch``); ``ops.add_lora``
dispatches on its type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class Segment(NamedTuple):
    """Tokens ``start .. end - 1`` of the step share one adapter: SGMV, one matmul pair (``weight`` for a mixture's
    share; a mixture's chunk appears once per adapter)."""

    start: int
    end: int
    slot: int
    weight: float = 1.0


@dataclass(frozen=True)
class Bgmv:
    """Gather per token: ``slots: [nd, K]`` (K (slot, weight) pairs per token, padded with the zero slot) and
    ``weights: [nd, K]`` (None = all ones)."""

    slots: torch.Tensor
    weights: torch.Tensor | None = None


@dataclass(frozen=True)
class Dense:
    """Few distinct adapters for many decode tokens, each adapter read once: ``slots: [D]`` and ``index: [nd]`` the
    position of each token's slot in ``slots``."""

    slots: torch.Tensor
    index: torch.Tensor


@dataclass(frozen=True)
class DenseWeighted:
    """The dense form for mixtures: ``slots: [D]`` and ``weights: [nd, D]`` each token's weight on each slot."""

    slots: torch.Tensor
    weights: torch.Tensor


DecodeLoRA = Bgmv | Dense | DenseWeighted


class TokenGroup(NamedTuple):
    """Batch-invariant form (``--deterministic``): the step tokens ``rows: [n]`` (long) that use ``slot`` for one
    of their (slot, weight) pairs, with ``weights: [n]`` (None = all ones). A step in this form lists every token's
    pairs as groups, a token's pairs in the request's order."""

    rows: torch.Tensor
    slot: int
    weights: torch.Tensor | None = None


@dataclass(frozen=True)
class XLoRAGroup:
    """Tokens of one X-LoRA this step: ``rows: [Tx]`` their positions on the step's token axis, ``slots: [E]`` the
    experts' device slots, ``weights: [Tx, L, 7, E]`` each token's weight per (layer, module, expert)."""

    rows: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor


@dataclass(frozen=True)
class LoRABatch:
    """Which adapter each token of the step uses. ``used_slots`` lists every slot anywhere in the step (a LoRA
    stack none of whose adapters is used skips the step); ``xlora`` holds the per-token gated groups.
    ``row_tile`` > 0 (``--deterministic``): every token is in ``groups`` (no ``decodes``/``segments``) and every
    LoRA GEMM runs on row tiles of that size (``ops.batch_invariant``)."""

    num_decodes: int
    decodes: DecodeLoRA | None = None
    segments: tuple[Segment, ...] = ()
    used_slots: frozenset[int] = frozenset()
    xlora: tuple[XLoRAGroup, ...] = ()
    groups: tuple[TokenGroup, ...] = ()
    row_tile: int = 0
