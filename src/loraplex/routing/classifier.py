"""The base as a competing class, learnt: a softmax classifier over the cards and the general card, fitted on the
scorer's text vectors whenever the cards change (no labels beyond "this text is on that card").

Classes: 0 = the base (the general card's prompts), k = card k (its description and examples). Vectors are centred
on the general prompts' mean and L2-normalised again (embedding spaces are anisotropic: e5's cosines all live in
0.7–0.9; centring spreads them). Each class weighs the same in total (a card's three examples as much as the
general card's few hundred prompts), and the weights are L2-regularised:

    minimise  Σ_i w_i · CE(softmax(W x_i + b), y_i) + LAMBDA / 2 · |W|²      w_i = 1 / (K + 1) / |class of i|
    lead(q, k) = z_k − z_0    where z = W x_q + b  (the card's log-odds against the base)

A card wins when its lead is the highest and above 0 (it beats the base class); the router's margin then applies
to the runner-up card. What the classifier learns that a similarity cannot: which directions separate a domain
from general prompts (a card's examples share "how do I…" with many general prompts; that direction is discounted).
``LAMBDA`` was chosen on the development sets (tests/routing/eval_set.json, dev_domains.json) and on 5-fold
cross-validation of the general card (how many left-out general prompts stay on the base).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAMBDA = 0.003  # dev sets: 0.001 routes fewer in-domain prompts (0.90 vs 0.92), 0.01 keeps fewer general (0.87)
ITERATIONS = 400  # Nesterov gradient steps; the loss is smooth with curvature ≤ 1/2 + LAMBDA
MARGIN = 0.0  # over the runner-up card, in log-odds (dev sets: 0.1 changed nothing, 0.5 lost 7 points in-domain)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-9)


@dataclass(frozen=True)
class CompetingClasses:
    """A fitted classifier: ``names[k - 1]`` is class k, class 0 the base."""

    names: tuple[str, ...]
    mean: np.ndarray  # [dim] the general prompts' mean vector
    weights: np.ndarray  # [K + 1, dim]
    bias: np.ndarray  # [K + 1]

    @classmethod
    def fit(cls, general: np.ndarray, cards: dict[str, np.ndarray], lam: float = LAMBDA,
            iterations: int = ITERATIONS) -> CompetingClasses:
        """``general``: ``[n, dim]`` the general card's vectors; ``cards``: each card's ``[m, dim]`` vectors."""
        mean = general.mean(0)
        blocks = [general, *cards.values()]
        x = _normalise(np.concatenate(blocks).astype(np.float64) - mean)  # [N, dim]
        y = np.concatenate([np.full(len(b), k) for k, b in enumerate(blocks)])  # [N]
        w = np.concatenate([np.full(len(b), 1.0 / len(b) / len(blocks)) for b in blocks])  # [N], sums to 1
        onehot = np.eye(len(blocks))[y]  # [N, K + 1]
        W = np.zeros((len(blocks), x.shape[1]))
        b = np.zeros(len(blocks))
        W_prev, b_prev = W, b
        step = 1.0 / (0.5 + lam)
        for it in range(iterations):
            m = it / (it + 3)
            Wl, bl = W + m * (W - W_prev), b + m * (b - b_prev)
            z = x @ Wl.T + bl
            p = np.exp(z - z.max(1, keepdims=True))
            r = (p / p.sum(1, keepdims=True) - onehot) * w[:, None]  # dLoss/dz
            W_prev, b_prev = W, b
            W, b = Wl - step * (r.T @ x + lam * Wl), bl - step * r.sum(0)
        return cls(tuple(cards), mean, W.astype(np.float32), b.astype(np.float32))

    def leads(self, vectors: np.ndarray) -> np.ndarray:
        """``[n, K]``: each vector's log-odds for each card against the base."""
        z = _normalise(np.atleast_2d(vectors).astype(np.float32) - self.mean) @ self.weights.T + self.bias
        return z[:, 1:] - z[:, :1]
