"""How a step's LoRA batch is formed: which form (BGMV gather, dense, weighted dense, segments) serves which tokens.

``build_lora_batch`` is a pure function of the step's rows and the adapters' device slots; the model runner adds
the X-LoRA groups (they need the classifier's scores, runner state) and hands the result to the model.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from loraplex.ops.lora_batch import Bgmv, Dense, DenseWeighted, LoRABatch, Segment, TokenGroup
from loraplex.scheduler.output import ScheduledRequest

# Decode tokens per distinct adapter from which the dense LoRA form (each adapter read once) beats per-token BGMV,
# where nothing measured it (``engine.kernel_choice`` measures it on each CPU).
DENSE_LORA_TOKENS_PER_ADAPTER = 4
# The most decode tokens per adapter that measurement covers: beyond it a lone adapter's decodes stay one segment
# (SGMV's GEMM pair), whatever the measured ratio says.
MEASURED_TOKENS_PER_ADAPTER = 16


def merge_segments(segments: list[Segment]) -> list[Segment]:
    """Join back-to-back token ranges on the same (slot, weight): one SGMV matmul pair instead of several (a step
    where every row uses one adapter becomes a single segment)."""
    merged: list[Segment] = []
    for seg in segments:
        last = merged[-1] if merged else None
        if last is not None and last.end == seg.start and (last.slot, last.weight) == (seg.slot, seg.weight):
            merged[-1] = last._replace(end=seg.end)
        else:
            merged.append(seg)
    return merged


def _mixture_decodes(decodes: Sequence[ScheduledRequest], slot_of: Mapping[str, int], zero_slot: int,
                     device, dense_ratio: float) -> Bgmv | DenseWeighted:
    """Mixtures among the decodes: K (slot, weight) pairs per token, or the dense form when few adapters serve many
    tokens."""
    unique = sorted({slot_of[n] for r in decodes for n, _ in r.loras})
    if len(unique) * dense_ratio <= len(decodes):  # few adapters: read each once
        pos = {s: j for j, s in enumerate(unique)}
        dense = torch.zeros(len(decodes), len(unique))
        for i, r in enumerate(decodes):
            for n, w in r.loras:
                dense[i, pos[slot_of[n]]] = w
        return DenseWeighted(torch.tensor(unique, device=device), dense.to(device))
    k = max(len(r.loras) for r in decodes)
    pairs = [[(slot_of[n], w) for n, w in r.loras] + [(zero_slot, 0.0)] * (k - len(r.loras)) for r in decodes]
    return Bgmv(torch.tensor([[s for s, _ in p] for p in pairs], device=device),
                torch.tensor([[w for _, w in p] for p in pairs], dtype=torch.float32, device=device))


def token_groups(rows: Sequence[ScheduledRequest], slot_of: Mapping[str, int],
                 device: torch.device | str = "cpu") -> tuple[TokenGroup, ...]:
    """The batch-invariant form: every adapter token of the step gathered by (pair index, slot), pair 0 of every
    token first, so each token's deltas are added in its request's order whatever else is in the step."""
    by_pair: dict[tuple[int, int], tuple[list[int], list[float]]] = {}  # (pair index, slot) -> token rows, weights
    start = 0
    for r in rows:
        for k, (name, w) in enumerate(r.loras):
            idx, weights = by_pair.setdefault((k, slot_of[name]), ([], []))
            idx.extend(range(start, start + r.num_tokens))
            weights.extend([w] * r.num_tokens)
        start += r.num_tokens
    return tuple(TokenGroup(torch.tensor(idx, device=device), slot,
                            None if all(w == 1.0 for w in ws) else torch.tensor(ws, dtype=torch.float32, device=device))
                 for (_, slot), (idx, ws) in sorted(by_pair.items()))


def build_lora_batch(rows: Sequence[ScheduledRequest], slot_of: Mapping[str, int], zero_slot: int,
                     device: torch.device | str = "cpu", row_tile: int = 0,
                     dense_ratio: float = DENSE_LORA_TOKENS_PER_ADAPTER, fused_decodes: int = 0) -> LoRABatch | None:
    """The step's LoRA batch (None when no row uses an adapter: the base pays nothing).

    ``rows`` are in step order (one-token decodes first); ``slot_of`` maps every adapter they name to its device
    slot; ``zero_slot`` is the all-zero slot base rows point at when they share a gather with adapter rows.
    X-LoRA rows contribute no form here (see ``ModelRunner.xlora_groups``), only their experts' ``used_slots``.
    ``row_tile`` > 0: the batch-invariant form (``token_groups``, GEMMs on row tiles of that size).
    ``dense_ratio``: decode tokens per distinct adapter from which the dense form serves them (else BGMV).
    ``fused_decodes``: a step of only decodes, at most this many, keeps them in the BGMV form whatever the ratio
    says — the model's one-call decode step (``ops.decode_step_cpu``) takes only that form, and the stack run op
    by op costs more than the other forms save (32 rows on one adapter, bf16, 2-core Zen 4: 0.92 of base-only
    with BGMV in the fused step, 0.71 as a segment; docs/benchmarks.md). 0: no fused step.
    """
    if not any(r.lora_names for r in rows):
        return None
    decodes = [r for r in rows if r.num_tokens == 1]
    used = frozenset(slot_of[n] for r in rows for n in r.lora_names)
    if row_tile:
        return LoRABatch(len(decodes), used_slots=used, groups=token_groups(rows, slot_of, device), row_tile=row_tile)
    segments: list[Segment] = []
    form = None
    fused = len(decodes) == len(rows) and len(decodes) <= fused_decodes
    ratio = math.inf if fused else dense_ratio
    lone_from = math.inf if fused else min(dense_ratio, MEASURED_TOKENS_PER_ADAPTER)
    if any(r.lora_mix for r in decodes):
        form = _mixture_decodes(decodes, slot_of, zero_slot, device, ratio)
    elif any(r.lora_name is not None for r in decodes):
        slots = [slot_of.get(r.lora_name, zero_slot) for r in decodes]
        unique = sorted(set(slots))
        if len(unique) == 1 and len(slots) >= lone_from:
            # one adapter for enough decodes that reading it once pays: a segment (merged with its prefills below)
            segments.append(Segment(0, len(decodes), unique[0]))
        elif len(unique) * ratio <= len(slots):
            pos = {s: i for i, s in enumerate(unique)}
            form = Dense(torch.tensor(unique, device=device), torch.tensor([pos[s] for s in slots], device=device))
        else:
            form = Bgmv(torch.tensor(slots, device=device).unsqueeze(1))  # [nd, 1]; weights None = all ones
    start = len(decodes)
    for r in rows[len(decodes):]:
        segments += [Segment(start, start + r.num_tokens, slot_of[n], w) for n, w in r.loras]
        start += r.num_tokens
    return LoRABatch(len(decodes), form, tuple(merge_segments(segments)), used)
