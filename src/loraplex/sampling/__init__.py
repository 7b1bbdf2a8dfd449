"""Turning logits into tokens: penalties, temperature/top-k/top-p/min-p, seeded draws, logprobs."""
from loraplex.sampling.sampler import Sampler, score_tokens

__all__ = ["Sampler", "score_tokens"]
