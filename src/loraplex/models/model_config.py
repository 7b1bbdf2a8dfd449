"""Normalise a transformers config of a supported family into one flat :class:`ModelSpec`.

Families are data, not subclasses: each row of ``FAMILIES`` says which switches of the one decoder it uses.
"""
from __future__ import annotations

from dataclasses import dataclass

from loraplex.layers.projections import ModuleShapes


def _llama(cfg) -> dict:
    bias = bool(getattr(cfg, "attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(cfg, "mlp_bias", False)), qk_norm=False)


FAMILIES = {
    # model_type: switches read from the config
    "llama": _llama,
    "mistral": lambda cfg: dict(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False),
    "qwen2": lambda cfg: dict(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False),
    "qwen3": lambda cfg: dict(qkv_bias=bool(getattr(cfg, "attention_bias", False)),
                              o_bias=bool(getattr(cfg, "attention_bias", False)), mlp_bias=False, qk_norm=True),
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything the decoder needs to know about a checkpoint's shape."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def module_shapes(self) -> ModuleShapes:
        """(in, out) features of every linear of a decoder layer (what adapters must fit)."""
        return ModuleShapes.of(self.num_layers, self.hidden_size, self.intermediate_size, self.q_size, self.kv_size)

    @classmethod
    def from_hf_config(cls, cfg) -> "ModelSpec":
        model_type = getattr(cfg, "model_type", None)
        if model_type not in FAMILIES:
            archs = getattr(cfg, "architectures", None) or [model_type]
            raise ValueError(f"model: unsupported architecture {archs[0]!r} (model_type {model_type!r}); "
                             f"supported model types: {', '.join(sorted(FAMILIES))}")
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"model: hidden_act {act!r} is not supported (only silu / SwiGLU)")
        # transformers >= 5 keeps rope settings in `rope_parameters`; 4.x in `rope_theta` + `rope_scaling`.
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        theta = rope.pop("rope_theta", None) or getattr(cfg, "rope_theta", 10000.0)
        scaling = rope or getattr(cfg, "rope_scaling", None)
        if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        sliding = getattr(cfg, "sliding_window", None)
        if model_type in ("qwen2", "qwen3") and not getattr(cfg, "use_sliding_window", False):
            sliding = None
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        return cls(
            model_type=model_type,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            sliding_window=sliding,
            **FAMILIES[model_type](cfg),
        )
