"""Fill a :class:`DecoderLM` skeleton (weights on ``meta``) with quantized weights, one checkpoint tensor at a time.

Each projection's rows are quantized as their tensor arrives (in row chunks) into the final int8 / int4 buffers, so
peak memory ≈ the quantized model + one tensor in its file format + one chunk in fp32; no full-precision model exists.
A projection's format is a :class:`Target` chosen before loading (``targets``): from ``--quantization`` alone for
safetensors, and from the tensors' GGUF types too for GGUF (``gguf_tensors.GGUF_KERNELS``).
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

import torch
from torch import nn

from loraplex.layers.linear import Linear
from loraplex.layers.projections import PROJECTION_OF, PROJECTIONS
from loraplex.layers.quant_linear import Int4Linear, Int8Linear
from loraplex.models.gguf_tensors import EXACT_INT4, FLOAT_TYPES
from loraplex.ops import hugepages
from loraplex.ops.quant import (
    PANEL,
    half_if_exact,
    int4_group_size,
    pack_int4,
    quantize_int4,
    quantize_int8,
    scale_offset,
)

log = logging.getLogger("loraplex.engine")


CHUNK = 1 << 20  # elements dequantized at once (4 MB in fp32; the quantizers make a few temporaries of it)
PlanFor = Callable[[str, int, int], list[tuple[int, str]]]


class Source(Protocol):
    """A checkpoint tensor not read yet: a dense one (:class:`Dense`) or a GGUF one (``gguf_tensors.GGUFTensor``)."""

    qtype: str
    shape: tuple[int, ...]

    def float_rows(self, lo: int, hi: int) -> torch.Tensor: ...
    def int4_exact(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def release(self) -> None: ...


class Dense:
    """A dense tensor of a safetensors file, read row range by row range (``readinto``, no memory map): a 150k-row
    embedding never sits whole in memory beside its quantized table."""

    DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}

    def __init__(self, file, offset: int, dtype: str, shape: list[int]) -> None:
        if dtype not in self.DTYPES:
            raise ValueError(f"model: safetensors dtype {dtype} is not read here (one of {', '.join(self.DTYPES)})")
        self.file, self.offset, self.dtype = file, offset, self.DTYPES[dtype]
        self.shape, self.qtype = tuple(shape), "dense"
        self.row_bytes = self.dtype.itemsize * (self.shape[1] if len(self.shape) > 1 else 1)

    def float_rows(self, lo: int, hi: int) -> torch.Tensor:
        buf = torch.empty((hi - lo) * self.row_bytes, dtype=torch.uint8)
        self.file.seek(self.offset + lo * self.row_bytes)
        self.file.readinto(memoryview(buf.numpy()))
        return buf.view(self.dtype).view(hi - lo, *self.shape[1:]).float()

    def int4_exact(self):
        raise ValueError("a dense tensor has no exact int4 form")

    def release(self) -> None:
        pass


class Target(NamedTuple):
    """What one projection (or the embedding / LM head) becomes: ``kind`` int8 | int4 | float, int4's ``group``."""

    kind: str
    group: int = 0


def targets(method: str, spec, types: dict[str, str]) -> dict[str, Target]:
    """``key -> Target`` for every projection key ``"{layer}.{projection}"`` and for ``"embed"`` / ``"head"``.

    ``types``: HF weight name -> GGUF type (empty for safetensors). ``int8`` / ``int4``: every projection so, int4 in
    groups of 32 where a part is stored Q4 (kept exact) and of 128 otherwise. ``gguf``: the nearest format — int4/32
    when every part is Q4, the compute dtype when every part is float, else int8. The embedding and the LM head go
    to int8 per row (whatever the method: 4 bits lose too much there), or stay float under ``gguf`` when stored so."""
    shapes = spec.module_shapes
    out: dict[str, Target] = {}
    for i in range(spec.num_layers):
        for p in PROJECTIONS:
            parts = [types.get(f"model.layers.{i}.{p.block}.{m}.weight", "dense") for m in p.modules]
            exact = all(t in EXACT_INT4 for t in parts)
            if method == "gguf":
                kind = "int4" if exact else "float" if all(t in FLOAT_TYPES for t in parts) else "int8"
            else:
                kind = method
            group = 32 if any(t in EXACT_INT4 for t in parts) else int4_group_size(shapes.in_features(p), 128)
            out[f"{i}.{p.name}"] = Target(kind, group if kind == "int4" else 0)
    for key, name in (("embed", "model.embed_tokens.weight"), ("head", "lm_head.weight")):
        stored = types.get(name, types.get("model.embed_tokens.weight", "dense"))
        out[key] = Target("float" if method == "gguf" and stored in FLOAT_TYPES else "int8")
    return out


class Fill:
    """The rows of one projection (its HF modules stacked) arriving module by module, each quantized into the final
    buffers as it arrives; :meth:`build` makes the module once every part is in."""

    def __init__(self, target: Target, n_in: int, sizes: list[int], bias: bool, dtype, device) -> None:
        self.target, self.n_in, self.dtype, self.device = target, n_in, dtype, device
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.waiting = {("weight", i) for i in range(len(sizes))} | ({("bias", i) for i in range(len(sizes))}
                                                                     if bias else set())
        n_out = sum(sizes)
        self.bias = torch.empty(n_out, dtype=dtype, device=device) if bias else None
        if target.kind == "int8":
            self.wq = torch.empty(n_out, n_in, dtype=torch.int8, device=device)
            self.scales = torch.empty(n_out, device=device)
        elif target.kind == "int4":
            self.packed = torch.empty(n_out, n_in // 2, dtype=torch.uint8)
            self.so = torch.empty(n_out, n_in // target.group, 2)
            # rows pack in 16-row panels: a stack whose parts start inside a panel gathers q and packs at build
            self.q = torch.empty(n_out, n_in, dtype=torch.uint8) if any(o % PANEL for o in self.offsets) else None
        else:
            self.w = torch.empty(n_out, n_in, dtype=dtype, device=device)

    def put(self, name: str, what: str, index: int, src: Source) -> None:
        """Quantize checkpoint tensor ``name`` (part ``index`` of the stack's ``what``: weight or bias) into place."""
        if (what, index) not in self.waiting:
            raise ValueError(f"model: checkpoint tensor {name!r} appears twice")
        self.waiting.discard((what, index))
        off, rows = self.offsets[index], src.shape[0]
        if what == "bias":
            self.bias[off:off + rows] = src.float_rows(0, rows).to(self.dtype)
        elif self.target.kind == "int4" and self.target.group == 32 and src.qtype in EXACT_INT4:
            q, scale, offset = src.int4_exact()
            self._put_int4(off, q, scale_offset(scale, offset))
        else:
            step = max(1, CHUNK // self.n_in)
            if self.target.kind == "int4":  # chunks of whole panels
                step = max(PANEL, step // PANEL * PANEL)
            for lo in range(0, rows, step):
                w, at = src.float_rows(lo, min(rows, lo + step)), slice(off + lo, off + min(rows, lo + step))
                if self.target.kind == "int8":
                    self.wq[at], self.scales[at] = quantize_int8(w)
                elif self.target.kind == "int4":
                    self._put_int4(off + lo, *quantize_int4(w, self.target.group))
                else:
                    self.w[at] = w
        src.release()

    def _put_int4(self, at: int, q: torch.Tensor, so: torch.Tensor) -> None:
        rows = slice(at, at + q.shape[0])
        if self.q is not None:
            self.q[rows], self.so[rows] = q, so
        else:  # at a panel's first row (every part does), whole panels or the stack's last rows
            self.packed[rows], self.so[rows] = pack_int4(q, so, compact=False)

    @property
    def complete(self) -> bool:
        return not self.waiting

    def build(self, plan_for: PlanFor) -> nn.Module:
        if self.target.kind == "int8":
            return Int8Linear(self.wq, self.scales, self.bias, plan_for("int8", self.n_in, self.wq.shape[0]))
        if self.target.kind == "int4":
            if self.q is not None:
                (self.packed, self.so), self.q = pack_int4(self.q, self.so), None
            else:
                self.so = half_if_exact(self.so)
            return Int4Linear(self.packed, self.so, self.target.group, self.bias,
                              plan_for("int4", self.n_in, self.packed.shape[0]))
        linear = Linear(self.n_in, self.w.shape[0], self.bias is not None, self.w.dtype, "meta")
        linear.weight = nn.Parameter(self.w, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias, requires_grad=False)
        return linear


def fill_quantized(model, tensors: Iterable[tuple[str, Source]], kinds: dict[str, Target],
                   plan_for: PlanFor) -> Counter:
    """Load ``tensors`` (HF names) into ``model``, a ``DecoderLM`` built with ``skeleton=True``; returns how many
    projections got each format. Raises on unknown, duplicate or missing tensors."""
    spec, shapes, dtype, device = model.spec, model.spec.module_shapes, model.dtype, model.device
    if device.type != "cpu" and any(t.kind == "int4" for t in kinds.values()):
        raise ValueError("quantization: int4 runs on CPU only for now (use int8 on CUDA)")
    plans: dict[tuple, list[tuple[int, str]]] = {}
    plan_for = (lambda f: lambda *key: plans[key] if key in plans else plans.setdefault(key, f(*key)))(plan_for)
    fills: dict[str, Fill] = {}
    built: Counter = Counter()
    for hf_name, src in tensors:
        name = hf_name.removeprefix("model.")
        parts = name.split(".")
        if "rotary_emb" in name or (name == "lm_head.weight" and spec.tie_word_embeddings):
            continue
        if len(parts) == 5 and parts[0] == "layers" and parts[3] in PROJECTION_OF:
            shard = shapes.shard(parts[3])
            key, block = f"{parts[1]}.{shard.projection.name}", getattr(model.layers[int(parts[1])], parts[2])
            if key not in fills:
                skel = getattr(block, shard.projection.name)
                fills[key] = Fill(kinds[key], shapes.in_features(shard.projection), shapes.out_sizes(
                    shard.projection), getattr(skel, "bias", None) is not None, dtype, device)
            _check_shape(hf_name, src, (shard.size, shapes.in_features(shard.projection))[:len(src.shape)])
            fills[key].put(hf_name, parts[4], shard.index, src)
            hugepages.release_freed()
            if fills[key].complete:
                setattr(block, shard.projection.name, fills.pop(key).build(plan_for))
                built[kinds[key].kind] += 1
        elif name in ("embed_tokens.weight", "lm_head.weight"):
            key = "embed" if name == "embed_tokens.weight" else "head"
            _check_shape(hf_name, src, (spec.vocab_size, spec.hidden_size))
            fill = Fill(kinds[key], spec.hidden_size, [spec.vocab_size], False, dtype, device)
            fill.put(hf_name, "weight", 0, src)
            _set_table(model, key, fill, plan_for)
            hugepages.release_freed()
        else:
            _materialize(model, hf_name, name, src, dtype)
    if fills:
        raise ValueError(f"model: checkpoint lacks parts of {sorted(fills)[:5]}")
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"model: checkpoint lacks tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return built


def _check_shape(hf_name: str, src: Source, want: tuple[int, ...]) -> None:
    if tuple(src.shape) != tuple(want):
        raise ValueError(f"model: checkpoint tensor {hf_name!r} has shape {tuple(src.shape)}, expected {want}")


def _set_table(model, key: str, fill: Fill, plan_for: PlanFor) -> None:
    """The embedding or LM head: an int8 table (a tied pair shares it) or a float parameter."""
    tied = model.spec.tie_word_embeddings
    if fill.target.kind == "int8":
        plan = plan_for("int8", fill.n_in, fill.wq.shape[0])
        table = Int8Linear(fill.wq, fill.scales, None, plan)
        if key == "head" or tied:
            model.head, model.lm_head_weight = table, None
            if hasattr(model, "lm_head"):
                del model.lm_head
        if key == "embed":
            model.embed_q, model.embed_tokens = table, None
        return
    weight = nn.Parameter(fill.w, requires_grad=False)
    if key == "embed":
        model.embed_tokens.weight = weight
        if tied:
            model.lm_head_weight = weight
    else:
        model.lm_head.weight = weight
        model.lm_head_weight = weight


def _materialize(model, hf_name: str, name: str, src: Source, dtype) -> None:
    """A small dense tensor (a norm's weight, a bias of an unstacked linear): replaces the skeleton's ``meta`` one."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
        old = getattr(module, attr)
    except AttributeError:
        old = None
    if not isinstance(old, nn.Parameter):
        raise ValueError(f"model: checkpoint tensor {hf_name!r} has no place in a {model.spec.model_type} model")
    _check_shape(hf_name, src, tuple(old.shape))
    value = src.float_rows(0, src.shape[0]).reshape(old.shape).to(dtype=dtype, device=model.device)
    setattr(module, attr, nn.Parameter(value, requires_grad=False))
    src.release()
