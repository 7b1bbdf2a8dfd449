"""Repetition (prompt + output), presence and frequency (output only) penalties, in place on one row of logits."""
from __future__ import annotations

import torch

from loraplex.sampling_params import SamplingParams


def apply_penalties(logits: torch.Tensor, sp: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> None:
    """``logits: [V]`` fp32, modified in place.

    Semantics: for every token t seen in prompt or output, ``l[t] = l[t] / r if l[t] > 0 else l[t] * r``;
    then ``l[t] -= frequency * count_out[t] + presence * (count_out[t] > 0)``.
    """
    vocab = logits.shape[-1]
    if sp.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        seen = seen[seen < vocab]
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
    if output_ids and (sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0):
        out = torch.tensor(output_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(out[out < vocab], minlength=vocab).to(logits.dtype)
        logits -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(logits.dtype)
