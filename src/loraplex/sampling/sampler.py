"""Batched sampling with per-request parameters and per-request RNGs.

Greedy rows take ``argmax``. Random rows go through temperature, top-k, top-p and min-p, then draw with the
exponential race ``argmax(p / q), q ~ Exp(1)`` — equivalent to sampling from ``p`` — where each seeded request's
``q`` comes from its own generator, so its tokens do not depend on which other requests share the batch.
Log-probabilities are the model's raw ones (before penalties and temperature), as in vLLM.
"""
from __future__ import annotations

import torch

from loraplex.sampling.grammar import allocate_bitmask, apply_grammar_masks
from loraplex.sampling.penalties import apply_penalties
from loraplex.scheduler.output import SampledToken, ScheduledRequest


def score_tokens(logprobs: torch.Tensor, token_ids: list[int], k: int) -> list[SampledToken]:
    """``logprobs: [N, V]`` (log-softmax, fp32) and one token per row → its log-probability, its rank (1 = most
    likely) and the row's ``k`` most likely tokens."""
    tgt = torch.tensor(token_ids, device=logprobs.device)
    chosen = logprobs.gather(1, tgt.unsqueeze(1)).squeeze(1)
    ranks = ((logprobs > chosen.unsqueeze(1)).sum(dim=-1) + 1).tolist()
    tops = [None] * len(token_ids)
    if k:
        vals, ids = logprobs.topk(k, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    return [SampledToken(t, lp, r, top) for t, lp, r, top in zip(token_ids, chosen.tolist(), ranks, tops)]


class Sampler:
    """Holds the RNG of every seeded request between steps; ``drop`` forgets finished ones."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generators: dict[str, torch.Generator] = {}
        self.shared = torch.Generator(device=device)
        self.shared.manual_seed(seed)
        self._bitmask: torch.Tensor | None = None  # grammar masks, reused across steps (grows with the batch)

    def drop(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.generators.pop(rid, None)

    def _generator(self, row: ScheduledRequest) -> torch.Generator:
        if row.seed is None:
            return self.shared
        g = self.generators.get(row.request_id)
        if g is None:
            g = self.generators[row.request_id] = torch.Generator(device=self.device)
            g.manual_seed(row.seed)
        return g

    def __call__(self, logits: torch.Tensor, rows: list[ScheduledRequest]) -> list[SampledToken]:
        """``logits: [S, V]`` fp32, one row per entry of ``rows`` → one token per row."""
        want_lp = [r.sampling_params.logprobs is not None for r in rows]
        raw_lp = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        for i, r in enumerate(rows):
            if r.sampling_params.needs_penalties:
                apply_penalties(logits[i], r.sampling_params, r.prompt_token_ids, r.output_token_ids)
        if any(r.grammar is not None for r in rows):
            self._mask(logits, rows)

        tokens = logits.argmax(dim=-1)
        rand = [i for i, r in enumerate(rows) if not r.sampling_params.greedy]
        if rand:
            tokens[rand] = self._sample(logits[rand], [rows[i] for i in rand])
        token_list = tokens.tolist()

        out = []
        for i, r in enumerate(rows):
            tok = token_list[i]
            if not want_lp[i]:
                out.append(SampledToken(tok))
                continue
            out.append(score_tokens(raw_lp[i:i + 1], [tok], r.sampling_params.logprobs)[0])
        return out

    def _mask(self, logits: torch.Tensor, rows: list[ScheduledRequest]) -> None:
        n, vocab = logits.shape
        if self._bitmask is None or self._bitmask.shape[0] < n or self._bitmask.shape[1] * 32 < vocab:
            self._bitmask = allocate_bitmask(max(n, 8), vocab)
        apply_grammar_masks(logits, [r.grammar for r in rows], self._bitmask,
                            [r.sampling_params.greedy for r in rows])

    def _sample(self, logits: torch.Tensor, rows: list[ScheduledRequest]) -> torch.Tensor:
        params = [r.sampling_params for r in rows]
        temp = torch.tensor([p.temperature for p in params], device=logits.device).unsqueeze(1)
        logits = logits / temp
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        if any(top_k) or any(p < 1.0 for p in top_p):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            vocab = logits.shape[-1]
            ks = torch.tensor([k if k > 0 else vocab for k in top_k], device=logits.device).unsqueeze(1)
            drop = torch.arange(vocab, device=logits.device).unsqueeze(0) >= ks
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            ps = torch.tensor(top_p, device=logits.device).unsqueeze(1)
            drop |= (probs.cumsum(dim=-1) - probs) > ps  # keeps the smallest prefix whose mass reaches top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        min_p = [p.min_p for p in params]
        if any(min_p):
            mp = torch.tensor(min_p, device=logits.device).unsqueeze(1)
            probs = probs.masked_fill(probs < mp * probs.max(dim=-1, keepdim=True).values, 0.0)
        q = torch.stack([torch.empty(probs.shape[-1], device=probs.device).exponential_(generator=self._generator(r))
                         for r in rows])
        return (probs / q).argmax(dim=-1)
