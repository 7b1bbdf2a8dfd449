"""Rotary position embeddings (RoPE) with the default, linear and llama3 frequency schedules."""
from __future__ import annotations

import math

import torch
from torch import nn

from loraplex import ops


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[head_dim // 2]`` (fp32) and the attention scaling factor for ``scaling``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported (default, linear, llama3 are)")


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by absolute position (NeoX/HF half-split layout).

    Semantics: ``x' = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``, computed as
    ``x * cos + roll(x, D/2) * [-sin | sin]`` (the same products, one op fewer).
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None,
                 dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.half = head_dim // 2
        inv_freq, attn_scale = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        sin = emb.sin() * attn_scale
        sin[:, :self.half] *= -1
        self.register_buffer("cos", (emb.cos() * attn_scale).to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("sin_signed", sin.to(dtype=dtype, device=device), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``(cos, signed sin)``, each ``[T, 1, D]``; looked up once per step for all layers."""
        return self.cos[positions].unsqueeze(1), self.sin_signed[positions].unsqueeze(1)

    def apply(self, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x: [T, heads, D]`` rotated by each token's position (in place where the C kernel serves: use the result,
        not ``x``)."""
        return ops.rope_(x, *tables)
