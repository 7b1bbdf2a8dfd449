"""Turning logits into tokens: penalties, temperature/top-k/top-p/min-p, seeded draws, logprobs."""
from loraplex.sampling.sampler import Sampler

__all__ = ["Sampler"]
