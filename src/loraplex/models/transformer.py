"""The decoder shared by the Llama, Mistral, Qwen2 and Qwen3 families (switches come from :class:`ModelSpec`).

Tokens of all sequences in a step are flattened to one axis ``T``; attention finds each sequence's context
through :class:`AttentionMetadata`. q/k/v and gate/up projections are stacked into one matmul each.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from loraplex import ops
from loraplex.layers.attention import AttentionMetadata, paged_attention
from loraplex.layers.linear import Linear
from loraplex.layers.lora import LoRAStack
from loraplex.layers.norm import RMSNorm
from loraplex.layers.projections import PROJECTION_OF, PROJECTIONS
from loraplex.layers.quant_linear import Int4Linear, Int8Linear
from loraplex.layers.row_tiled import RowTiled
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.models.model_config import ModelSpec
from loraplex.ops import decode_step_cpu, dense_cpu
from loraplex.ops.lora_batch import Bgmv, LoRABatch


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding, dtype, device) -> None:
        super().__init__()
        self.spec = spec
        self.rotary = rotary
        self.scale = spec.head_dim ** -0.5
        self.qkv_proj = Linear(spec.hidden_size, spec.q_size + 2 * spec.kv_size, spec.qkv_bias, dtype, device)
        self.o_proj = Linear(spec.q_size, spec.hidden_size, spec.o_bias, dtype, device)
        self.lora = nn.ModuleDict()  # projection name -> LoRAStack, filled by DecoderLM.enable_lora
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype, device)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                lora: LoRABatch | None = None) -> torch.Tensor:
        s = self.spec
        h, hkv = s.num_heads, s.num_kv_heads
        qkv = self.qkv_proj(x)
        if lora is not None:
            self.lora["qkv_proj"](qkv, x, lora)
        qkv = qkv.view(-1, h + 2 * hkv, s.head_dim)  # [T, H + 2 Hkv, D]
        qk = qkv[:, :h + hkv]
        if s.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :h]), self.k_norm(qk[:, h:])], dim=1)
        qk = self.rotary.apply(qk, rope)  # q and k heads rotate together
        o = paged_attention(qk[:, :h], qk[:, h:], qkv[:, h + hkv:], kv_cache[0], kv_cache[1], meta, self.scale)
        o = o.reshape(-1, s.q_size)
        out = self.o_proj(o)
        if lora is not None:
            self.lora["o_proj"](out, o, lora)
        return out


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` with gate and up stacked."""

    def __init__(self, spec: ModelSpec, dtype, device) -> None:
        super().__init__()
        self.gate_up_proj = Linear(spec.hidden_size, 2 * spec.intermediate_size, spec.mlp_bias, dtype, device)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, spec.mlp_bias, dtype, device)
        self.lora = nn.ModuleDict()  # projection name -> LoRAStack, filled by DecoderLM.enable_lora

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if lora is not None:
            self.lora["gate_up_proj"](gate_up, x, lora)
        act = ops.silu_mul(gate_up)  # silu(gate) * up
        out = self.down_proj(act)
        if lora is not None:
            self.lora["down_proj"](out, act, lora)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding, dtype, device) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        self.self_attn = Attention(spec, rotary, dtype, device)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        self.mlp = MLP(spec, dtype, device)

    def forward(self, rope, h, delta, kv_cache, meta, lora=None) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's input is the residual stream ``h + delta`` (``delta`` None: ``h``); returns the stream after
        attention and the MLP's output, whose sum is the next layer's input (each add fused with the next norm)."""
        h, x = self.input_layernorm.add_forward(h, delta)
        h, x = self.post_attention_layernorm.add_forward(h, self.self_attn(rope, x, kv_cache, meta, lora))
        return h, self.mlp(x, lora)


class DecoderLM(nn.Module):
    """Embedding → N decoder layers → final norm → LM head (tied or not)."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: str | torch.device, max_positions: int,
                 skeleton: bool = False) -> None:
        """``skeleton``: the embedding, layers, norm and LM head on ``meta`` (no memory), for the quantizing loader
        (``models.quant_load``) to replace tensor by tensor; the rotary tables are real either way."""
        super().__init__()
        self.spec = spec
        self.dtype, self.device = dtype, torch.device(device)
        self.head: Int8Linear | None = None  # quantized models: the LM head in int8 (quant_load)
        self.embed_q: Int8Linear | None = None  # ... and the embedding (the same table when tied)
        self.row_tile = 0  # > 0: batch-invariant (make_batch_invariant)
        self._fused_table = None  # (key, the fused decode step's layer table, what it points into), built at first use
        self._fused_ok: dict[int, bool] = {}  # step size -> can the fused step take every projection (first use)
        self._fused_lora: bool | None = None  # every LoRA stack readable by the C BGMV kernel (idem)
        self.rotary = RotaryEmbedding(spec.head_dim, max_positions, spec.rope_theta, spec.rope_scaling, dtype, device)
        wdev = "meta" if skeleton else device
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype, device=wdev)
        self.embed_tokens.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(spec, self.rotary, dtype, wdev) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, wdev)
        if spec.tie_word_embeddings:
            self.lm_head_weight = self.embed_tokens.weight
        else:
            self.lm_head = Linear(spec.hidden_size, spec.vocab_size, False, dtype, wdev)
            self.lm_head_weight = self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                lora: LoRABatch | None = None) -> torch.Tensor:
        """``input_ids, positions: [T]`` → final hidden states ``[T, hidden]``; ``lora`` None = base only."""
        h = self.embed_tokens(input_ids) if self.embed_tokens is not None else self.embed_q.embed(input_ids, self.dtype)
        rope = self.rotary.tables(positions)
        if self._fused_serves(h, meta, lora):
            return self._fused_step(h, rope, kv_caches, meta, lora)
        delta = None
        for layer, kv in zip(self.layers, kv_caches):
            h, delta = layer(rope, h, delta, kv, meta, lora)
        return self.norm.add_forward(h, delta)[1]

    def _fused_serves(self, h: torch.Tensor, meta: AttentionMetadata, lora: LoRABatch | None) -> bool:
        """Can the one-call decode step (``ops.decode_step_cpu``) take this step: all rows decodes, few enough for
        the C GEMV (``ops.cpu_gemv``), plain float weights, and LoRA (if any) per token in the BGMV form?"""
        t = h.shape[0]
        if not (t <= ops.gemv_rows() and meta.num_decodes == t and not meta.prefills and meta.rows is None
                and meta.token_rows is None and meta.decode_lens is not None and not self.row_tile
                and self._fused_kernels_ok(h, t)):
            return False
        return lora is None or (isinstance(lora.decodes, Bgmv) and not lora.segments and not lora.xlora
                                and not lora.row_tile and self._fused_lora_ok())

    def fused_takes_lora(self, num_decodes: int) -> bool:
        """Would the one-call decode step take a step of ``num_decodes`` decodes whose LoRA is per-token BGMV (the
        C kernels built for this dtype on this device, every projection served for that many rows, every LoRA
        stack readable by the C BGMV kernel)? The step-size limit (``ops.cpu_gemv``) is the caller's."""
        return self._fused_kernels_ok(self.norm.weight, num_decodes) and self._fused_lora_ok()

    def _fused_kernels_ok(self, x: torch.Tensor, t: int) -> bool:
        """The fused step's C library built for tensors like ``x`` and every projection served for ``t`` rows."""
        return decode_step_cpu.available(x) and self._fused_weights_ok(x.dtype, t)

    def _stacks(self) -> list[list[LoRAStack | None]]:
        """Each layer's LoRA stacks in projection order (None where LoRA is not enabled)."""
        blocks = [{"self_attn": layer.self_attn.lora, "mlp": layer.mlp.lora} for layer in self.layers]
        return [[b[p.block][p.name] if p.name in b[p.block] else None for p in PROJECTIONS] for b in blocks]

    def _fused_weights_ok(self, dtype: torch.dtype, t: int) -> bool:
        """Every projection a plain ``Linear`` of ``dtype`` (not row-tiled), or quantized with its C GEMV the
        measured path for ``t`` rows (``engine.quant_plan``); checked once per step size."""
        if t not in self._fused_ok:
            linears = [getattr(getattr(layer, p.block), p.name) for layer in self.layers for p in PROJECTIONS]
            self._fused_ok[t] = all(isinstance(m, Linear) and m.weight.dtype == dtype
                                    or isinstance(m, (Int8Linear, Int4Linear)) and m.c_gemv_for(t) for m in linears)
        return self._fused_ok[t]

    def _fused_lora_ok(self) -> bool:
        """Every LoRA stack readable by the C BGMV kernel (B stored transposed); checked once."""
        if self._fused_lora is None:
            stacks = [s for layer in self._stacks() for s in layer]
            self._fused_lora = all(s is not None and s.buffers() is not None for s in stacks)
        return self._fused_lora

    def _fused_step(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                    kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                    lora: LoRABatch | None) -> torch.Tensor:
        key = (kv_caches[0][0].data_ptr(), LoRAStack.generation)
        if self._fused_table is None or self._fused_table[0] != key:  # rebuilt when a buffer moves
            keep: list = []
            loras = [[None if s is None else s.buffers() for s in stacks] for stacks in self._stacks()]
            table = decode_step_cpu.layer_table([self._fused_tensors(layer, kv) for layer, kv in
                                                 zip(self.layers, kv_caches)], loras, h.dtype, keep)
            self._fused_table = (key, table, keep)
        s = self.spec
        bgmv = lora.decodes if lora is not None else None
        return decode_step_cpu.decode_layers(
            self._fused_table[1], h.contiguous(), self.norm.weight, (s.num_heads, s.num_kv_heads, s.head_dim),
            s.intermediate_size, s.rms_norm_eps, s.head_dim ** -0.5, rope[0], rope[1], meta.slot_mapping,
            meta.decode_kv_slots, meta.decode_lens, None if bgmv is None else bgmv.slots,
            None if bgmv is None else bgmv.weights)

    @staticmethod
    def _fused_tensors(layer: DecoderLayer, kv: tuple[torch.Tensor, torch.Tensor]) -> dict:
        attn, mlp = layer.self_attn, layer.mlp
        qk = (attn.q_norm.weight, attn.k_norm.weight) if attn.spec.qk_norm else (None, None)
        projs = [_fused_proj(getattr(getattr(layer, p.block), p.name)) for p in PROJECTIONS]
        return {"ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight, "proj": projs,
                "q_norm": qk[0], "k_norm": qk[1], "k_cache": kv[0], "v_cache": kv[1]}

    def enable_lora(self, max_loras: int, max_rank: int) -> None:
        """Attach ``max_loras`` LoRA slots of rank ``max_rank`` beside every projection of every layer."""
        dtype, device = self.dtype, self.device
        shapes = self.spec.module_shapes
        self._fused_lora = self._fused_table = None
        for i, layer in enumerate(self.layers):
            for p in PROJECTIONS:
                getattr(layer, p.block).lora[p.name] = LoRAStack(p, shapes, max_loras, max_rank, dtype, device, i)

    def set_lora_slot(self, slot: int, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy one adapter (``(layer, module) -> (A, B·scale)``) into device slot ``slot`` of every layer."""
        per_layer: list[dict] = [{} for _ in self.layers]
        for (i, module), ab in weights.items():
            per_layer[i][module] = ab
        for layer, w in zip(self.layers, per_layer):
            for p in PROJECTIONS:
                getattr(layer, p.block).lora[p.name].set_slot(slot, w)

    def make_batch_invariant(self, tile: int) -> None:
        """Run every token-row GEMM (the projections, quantized or not, and the LM head) on row tiles of ``tile``
        rows, so a token's bits do not depend on the other tokens of its step (``ops.batch_invariant``)."""
        self.row_tile = tile
        for layer in self.layers:
            for module, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                 (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
                setattr(module, name, RowTiled(getattr(module, name), tile))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[S, hidden]`` → fp32 logits ``[S, vocab]``."""
        if self.row_tile:
            return ops.row_tiled(self._logits, hidden, self.row_tile)
        return self._logits(hidden)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            return self.head(hidden).float()
        return ops.linear(hidden, self.lm_head_weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into our (partly stacked) parameters; raise on unknown or missing ones."""
        params = dict(self.named_parameters(remove_duplicate=False))
        shapes = self.spec.module_shapes
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.spec.tie_word_embeddings:
                continue
            parts = name.split(".")
            shard = shapes.shard(parts[-2]) if len(parts) >= 2 and parts[-2] in PROJECTION_OF else None
            if shard is not None:  # rows of a stacked projection (q|k|v, gate|up) or a whole one
                pname = ".".join(parts[:-2] + [shard.projection.name, parts[-1]])
                if pname not in params:
                    raise ValueError(f"model: checkpoint tensor {name!r} has no place in a {self.spec.model_type} model")
                dst = params[pname].data.narrow(0, shard.offset, shard.size)
            else:
                pname = name
                if pname not in params:
                    raise ValueError(f"model: checkpoint tensor {name!r} has no place in a {self.spec.model_type} model")
                dst = params[pname].data
            if dst.shape != tensor.shape:
                raise ValueError(f"model: checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add(f"{pname}#{shard.index if shard else 0}")
        stacked = {p.name: len(p.modules) for p in PROJECTIONS}
        expected = {f"{n}#{i}" for n in params if n != "lm_head_weight"
                    for i in range(stacked.get(n.split(".")[-2], 1) if "." in n else 1)}
        if self.spec.tie_word_embeddings:
            expected.discard("lm_head.weight#0")
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"model: checkpoint lacks tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _fused_proj(m: nn.Module) -> decode_step_cpu.Proj:
    """A projection's base weight as the fused step's table takes it."""
    tiled = m.tiled_steps(dense_cpu.GEMV_MAX_ROWS) if isinstance(m, (Int8Linear, Int4Linear)) else 0
    if isinstance(m, Int8Linear):
        return decode_step_cpu.Proj("int8", m.wq, m.bias, m.scales, tiled_steps=tiled)
    if isinstance(m, Int4Linear):
        return decode_step_cpu.Proj("int4", m.packed, m.bias, m.so, m.group, tiled)
    return decode_step_cpu.Proj("dense", m.weight, m.bias)
