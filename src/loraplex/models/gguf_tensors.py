"""GGUF tensors read one at a time from the memory-mapped file (``gguf.GGUFReader``), kept in their blocks until the
quantizing loader asks for rows.

What each GGUF type becomes is one table, :data:`GGUF_KERNELS` (the README's table is this one):

- ``Q4_0``, ``Q4_1``, ``Q4_K`` → int4, groups of 32 (``q · scale + offset``), exact: a Q4_K super-block is 8 sub-blocks
  of 32 with their own scale and min, so every 32 weights share one affine map;
- ``Q5_0``, ``Q5_1``, ``Q5_K``, ``Q6_K``, ``Q8_0`` → int8 per output row, requantized from the dequantized rows (5–8 bits
  per weight have no exact int4 form, and int8 rows cost about what the blocks cost);
- ``F32``, ``F16``, ``BF16`` → the compute dtype;
- anything else (``Q2_K``, ``Q3_K``, ``IQ*``, ``TQ*``, ``MXFP4`` …) is refused by name: dequantize it instead.

Semantics of the exact int4 form, per row ``r`` and group ``j`` of 32 input columns:
``W[r, 32 j + i] = q[r, 32 j + i] · scale[r, j] + offset[r, j]`` — equal to ``gguf.quants.dequantize`` (the
reference the tests compare with).
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
import torch

# GGUF type -> (our kernel format, how): "int4" exact (groups of 32) / "int8" requantized per row / "float" dequantized
GGUF_KERNELS = {
    "Q4_0": ("int4", "exact"), "Q4_1": ("int4", "exact"), "Q4_K": ("int4", "exact"),
    "Q5_0": ("int8", "requantized"), "Q5_1": ("int8", "requantized"), "Q5_K": ("int8", "requantized"),
    "Q6_K": ("int8", "requantized"), "Q8_0": ("int8", "requantized"),
    "F32": ("float", "dequantized"), "F16": ("float", "dequantized"), "BF16": ("float", "dequantized"),
}
EXACT_INT4 = frozenset(t for t, (kind, _) in GGUF_KERNELS.items() if kind == "int4")
FLOAT_TYPES = frozenset(t for t, (kind, _) in GGUF_KERNELS.items() if kind == "float")

# GGUF name (inside blk.N.) -> HF name (inside layers.N.); names outside the blocks in GLOBAL_NAMES
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
SKIPPED = {"rope_freqs"}  # llama3's rope table: we compute it from the config


def _f16(raw: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte ``at`` of every block of ``raw: [..., bytes]`` as fp32 ``[..., 1]``."""
    return raw[..., at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[..., 16 · k]`` packed bytes → ``[..., 2, 16 · k]``: the low nibbles (first half of the values), then the high."""
    return torch.stack([qs & 0xF, qs >> 4], dim=-2)


def _q4k_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes of 6-bit scales and mins → two ``[..., 8]`` (ggml's ``get_scale_min_k4``)."""
    s = s.to(torch.int32)
    lo_sc, lo_m = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    hi_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], -1).float(), torch.cat([lo_m, hi_m], -1).float()


def int4_from_blocks(raw: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``raw: [rows, blocks, bytes]`` uint8 of ``qtype`` (Q4_0 / Q4_1 / Q4_K) → (``q`` uint8 ``[rows, in]`` in 0..15,
    ``scale``, ``offset`` fp32 ``[rows, in / 32]``) with ``W = q · scale + offset`` per group of 32."""
    rows = raw.shape[0]
    if qtype == "Q4_0":  # W = d · (q - 8)
        d = _f16(raw, 0)
        q, scale, offset = _nibbles(raw[..., 2:18]), d, -8 * d
    elif qtype == "Q4_1":  # W = d · q + m
        d, m = _f16(raw, 0), _f16(raw, 2)
        q, scale, offset = _nibbles(raw[..., 4:20]), d, m
    elif qtype == "Q4_K":  # W = d · sc[j] · q - dmin · m[j], j the sub-block of 32; qs: 4 × 32 bytes, lo then hi
        d, dmin = _f16(raw, 0), _f16(raw, 2)
        sc, mn = _q4k_scales_mins(raw[..., 4:16])
        q = _nibbles(raw[..., 16:144].reshape(rows, -1, 4, 32))  # [rows, blocks, 4, 2, 32]
        scale, offset = d * sc, -dmin * mn
    else:
        raise ValueError(f"GGUF type {qtype} has no exact int4 form (only {sorted(EXACT_INT4)})")
    return q.reshape(rows, -1), scale.reshape(rows, -1), offset.reshape(rows, -1)


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file, still in its blocks: ``shape`` in torch order (``[out, in]``), ``qtype`` the GGUF type
    name, ``perm`` a row permutation to apply (llama's q/k heads, which llama.cpp stores rotated)."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # the memory-mapped bytes (or values for F32/F16), one row per output row
    perm: torch.Tensor | None = None

    def _raw(self, lo: int, hi: int) -> np.ndarray:
        if self.perm is not None:
            return np.array(self.data[self.perm[lo:hi].numpy()])
        out = np.array(self.data[lo:hi])
        self._drop(self.data[lo:hi])
        return out

    def float_rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows ``lo:hi`` dequantized to fp32 (``gguf.quants.dequantize``)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        out = dequantize(self._raw(lo, hi), GGMLQuantizationType[self.qtype])
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(hi - lo, *self.shape[1:])

    def int4_exact(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole tensor in the exact int4 form (see :func:`int4_from_blocks`)."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        _, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[self.qtype]]
        raw = torch.from_numpy(self._raw(0, self.shape[0])).view(self.shape[0], -1, block_bytes)
        return int4_from_blocks(raw, self.qtype)

    def release(self) -> None:
        """Drop this tensor's pages from the process (they stay in the page cache): peak RSS ≈ what was built."""
        self._drop(self.data)

    @staticmethod
    def _drop(view: np.ndarray) -> None:
        mm = getattr(view, "_mmap", None)  # numpy.memmap views keep their file's mmap
        if mm is None or not hasattr(mmap, "MADV_DONTNEED") or view.nbytes == 0:
            return
        start = view.ctypes.data - np.frombuffer(mm, np.uint8, 1).ctypes.data
        lo = start // mmap.PAGESIZE * mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, lo, start + view.nbytes - lo)


def _llama_rotation(rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (transformers' ``_reverse_permute_weights``)."""
    dim = rows // n_head // 2
    return torch.arange(rows).view(n_head, dim, 2).transpose(1, 2).reshape(-1)


def read_gguf(path: str, num_heads: int, num_kv_heads: int) -> tuple[str, list[tuple[str, GGUFTensor]]]:
    """(architecture, ``[(HF name, tensor)]``) of a GGUF file, nothing read yet; a tensor of a type outside
    :data:`GGUF_KERNELS` or with a name we do not know is refused here, before anything is built."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    out = []
    for t in reader.tensors:
        qtype = t.tensor_type.name
        stem, _, suffix = t.name.rpartition(".")
        parts = stem.split(".")
        if parts[0] in SKIPPED:
            continue
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
            name = f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
        elif len(parts) == 1 and parts[0] in GLOBAL_NAMES:
            name = f"{'' if parts[0] == 'output' else 'model.'}{GLOBAL_NAMES[parts[0]]}.{suffix}"
        else:
            raise ValueError(f"model: GGUF tensor {t.name!r} has no place in a decoder we know ({arch})")
        if qtype not in GGUF_KERNELS:
            raise ValueError(f"model: GGUF tensor {t.name!r} has type {qtype}, which loraplex cannot keep quantized "
                             f"(it reads {', '.join(GGUF_KERNELS)}); run without --quantization to dequantize it to "
                             f"--dtype, or requantize the file with llama-quantize to Q4_K_M / Q8_0")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        perm = None
        if arch == "llama" and parts[-1] in ("attn_q", "attn_k"):
            perm = _llama_rotation(shape[0], num_heads if parts[-1] == "attn_q" else num_kv_heads)
        out.append((name, GGUFTensor(t.name, qtype, shape, t.data, perm)))
    return arch, out
