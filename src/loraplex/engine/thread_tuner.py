"""How many CPU threads a step should use, chosen by timing steps while serving (not by a constant per CPU).

A batch-1 decode on a small model streams its weights; a second OpenMP thread helps only when the core it needs is
free. Beside an HTTP server's event loop and a local client, or a busy neighbour, that core is often taken: each
parallel region then waits for the descheduled thread, and two threads run slower than one (docs/benchmarks.md,
"Threads per step"), while on a quiet machine two win. So the runner times its
steps per size bucket under each candidate thread count and uses the fastest, trying the others again now and then
as the load changes.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Step sizes (tokens) that share a choice: a batch-1 decode, a few decodes, a batch, prefill-sized steps.
BUCKET_EDGES = (1, 4, 32)


@dataclass
class _Bucket:
    cost: dict[int, float] = field(default_factory=dict)  # threads -> EMA of seconds per token
    tries: dict[int, int] = field(default_factory=dict)
    last: dict[int, int] = field(default_factory=dict)  # threads -> the step it last ran
    steps: int = 0


class ThreadTuner:
    """``choose(num_tokens)`` before a step, ``record(num_tokens, threads, seconds)`` after it.

    Each bucket first runs ``trials`` steps with every candidate (round robin), then the candidate with the lowest
    moving average of seconds per token; each other candidate runs once more after ``explore_every`` steps times
    how much slower it was (at most 64×), so a change of load (a second client, a busy neighbour) is noticed while
    re-trying costs about ``1 / explore_every`` of the time."""

    def __init__(self, max_threads: int, trials: int = 3, explore_every: int = 64, alpha: float = 0.25) -> None:
        self.candidates = sorted({1, max(1, max_threads // 2), max_threads})
        self.trials, self.explore_every, self.alpha = trials, explore_every, alpha
        self._buckets = [_Bucket() for _ in range(len(BUCKET_EDGES) + 1)]

    def _bucket(self, num_tokens: int) -> _Bucket:
        return self._buckets[bisect.bisect_left(BUCKET_EDGES, num_tokens)]

    def choose(self, num_tokens: int) -> int:
        b = self._bucket(num_tokens)
        if len(self.candidates) == 1:
            return self.candidates[0]
        for c in self.candidates:  # not measured enough yet
            if b.tries.get(c, 0) < self.trials:
                return c
        best = min(self.candidates, key=lambda c: b.cost[c])
        for c in self.candidates:  # now and then, one step with each of the others
            ratio = min(max(b.cost[c] / max(b.cost[best], 1e-9), 1.0), 64.0)
            if c != best and b.steps - b.last.get(c, 0) >= self.explore_every * ratio:
                return c
        return best

    def record(self, num_tokens: int, threads: int, seconds: float) -> None:
        b = self._bucket(num_tokens)
        per_token = seconds / max(num_tokens, 1)
        prev = b.cost.get(threads)
        b.cost[threads] = per_token if prev is None else prev + self.alpha * (per_token - prev)
        b.tries[threads] = b.tries.get(threads, 0) + 1
        b.last[threads] = b.steps
        b.steps += 1

    def summary(self) -> dict[str, dict[int, float]]:
        """Per bucket (``"<=1"``, ``"<=4"``, …, ``">32"``): threads -> ms per token, as measured so far."""
        names = [f"<={e}" for e in BUCKET_EDGES] + [f">{BUCKET_EDGES[-1]}"]
        # NOTE: list() copies each dict in one C call, so another thread may read while the engine records
        return {n: {c: round(v * 1e3, 3) for c, v in list(b.cost.items())} for n, b in zip(names, self._buckets)
                if b.cost}
