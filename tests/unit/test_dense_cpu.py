"""The C kernels of a decode step (``ops.dense_cpu``: GEMV, residual add + RMSNorm, RoPE; ``ops.attention_cpu``:
KV write, paged decode attention) against their torch references, and the dispatch in ``ops``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex import ops
from loraplex.ops import attention_cpu, dense_cpu, quant

pytestmark = pytest.mark.skipif(not dense_cpu.available(torch.zeros(1)), reason="no C compiler on this machine")
DTYPES = [torch.float32, torch.bfloat16]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Within a few units of the last place of ``dtype`` (relative to the values' scale; sums of ~1 500 products
    carry ~40 ulp in fp32, as torch's own GEMMs do)."""
    tol = 5e-5 if dtype == torch.float32 else 1.6e-2
    err = ((got.double() - want.double()).abs() / (want.double().abs() + 1)).max().item()
    assert err < tol, f"max relative error {err:.3g} >= {tol}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 5, 13, dense_cpu.GEMV_MAX_ROWS])
@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (100, 37), (7, 1), (33, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear(dtype, rows, shape, bias):
    torch.manual_seed(rows * 1000 + shape[1])
    n, k = shape
    x_wide = torch.randn(rows, k + 5).to(dtype)
    x = x_wide[:, 2:k + 2]  # rows of a wider tensor: a row stride that is not the width
    w = torch.randn(n, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    got = dense_cpu.gemv(x, w, b)
    assert got.shape == (rows, n) and got.dtype == dtype
    _close(got, F.linear(x.double(), w.double(), None if b is None else b.double()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(960, 576), (101, 70)])
def test_gemv_tiled_steps_do_not_change_a_tokens_bits(dtype, shape):
    """Steps larger than the row form's (register tiles of 4 rows x 4 tokens): a token's result is the same bits
    whichever tile, and whatever step size, it comes in."""
    n, k = shape
    x, w = torch.randn(dense_cpu.GEMV_MAX_ROWS, k).to(dtype), torch.randn(n, k).to(dtype)
    full = dense_cpu.gemv(x, w)
    for m in (5, 6, 7, 8, 13):
        assert torch.equal(dense_cpu.gemv(x[-m:], w), full[-m:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 11, dense_cpu.GEMV_MAX_ROWS])
@pytest.mark.parametrize("k,group", [(576, 64), (1536, 128), (96, 32), (160, 32), (256, 128), (64, 64), (320, 64)])
@pytest.mark.parametrize("n", [70, 16, 5])
@pytest.mark.parametrize("so_dtype", [torch.float16, torch.float32])
def test_gemv_int4_matches_the_dequantized_product(dtype, rows, k, group, n, so_dtype):
    """Every group size, whole 16-row panels and a last one of fewer rows (70 = 4 x 16 + 6; 5), token counts around
    the 8 a pass takes, both activation dtypes (bf16: the nibbles widened to bf16 in registers), scale/offset pairs
    in fp16 (our quantizer's) and fp32 (values fp16 cannot hold), a bias, rows of a wider tensor; the large-batch
    path's rows from inside and across panels."""
    torch.manual_seed(rows * 7 + k + n)
    w = torch.randn(n, k) * 0.05 + 0.01
    q, so = quant.quantize_int4(w, group)
    if so_dtype == torch.float32:
        so = so * (1 + 2 ** -20)  # no longer exact in fp16
    packed, so_p = quant.pack_int4(q, so)
    assert so_p.dtype == so_dtype
    assert all(torch.equal(a, b) for a, b in zip(quant.unpack_int4(packed, so_p), (q, so)))
    x = torch.randn(rows, k + 3).to(dtype)[:, 1:k + 1]
    b = torch.randn(n).to(dtype)
    want = F.linear(x.double(), quant.dequantize_int4(q, so, group).double(), b.double())
    _close(dense_cpu.gemv_int4(x, packed, so_p, group, b), want, dtype)
    for at in ((0, n), (3, n - 1), (n - 2, n)):  # the large-batch path's rows, each weight rounded once
        got = dense_cpu.dequant_int4(packed, so_p, group, at, dtype)
        assert torch.equal(got, quant.dequantize_int4(q, so, group)[at[0]:at[1]].to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 4, 13, dense_cpu.GEMV_MAX_ROWS])
@pytest.mark.parametrize("k", [576, 1536, 100, 64, 37])
@pytest.mark.parametrize("tiled", [False, True])
def test_gemv_int8_matches_the_dequantized_product(dtype, rows, k, tiled):
    """Every int8 value (the bf16 form splits each into a signed high and an unsigned low nibble), widths with and
    without a tail beyond the last 64, a bias, rows of a wider tensor."""
    torch.manual_seed(rows * 11 + k)
    wq = torch.randint(-128, 128, (90, k), dtype=torch.int8)
    wq[0, :] = -128  # the extremes
    wq[1, :] = 127
    s = torch.rand(90) / 100
    x = (torch.randn(rows, k + 4) * 2).to(dtype)[:, 2:k + 2]
    b = torch.randn(90).to(dtype)
    want = F.linear(x.double(), wq.double() * s.double()[:, None], b.double())
    _close(dense_cpu.gemv_int8(x, wq, s, b, tiled=tiled), want, dtype)
    scratch = torch.empty(90, k, dtype=dtype)  # the large-batch path's rows: r(Wq · s), bit for bit
    got = dense_cpu.dequant_int8(wq, s, (7, 61), dtype, scratch)
    assert torch.equal(got, (wq.float() * s[:, None])[7:61].to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiled", [False, True])
def test_quantized_gemv_steps_do_not_change_a_tokens_bits(dtype, tiled):
    """In either form of the int8 GEMV (passes of 8 tokens, or rows expanded once for register tiles of 4 tokens) and
    in the int4 GEMV (panels, 8 tokens a pass) a token's result is the same bits whatever its step's size and its
    place in it."""
    n, k, group = 101, 320, 64
    x = torch.randn(dense_cpu.GEMV_MAX_ROWS, k).to(dtype)
    packed, so = quant.pack_int4(*quant.quantize_int4(torch.randn(n, k), group))
    wq, s = quant.quantize_int8(torch.randn(n, k))
    int4 = dense_cpu.gemv_int4(x, packed, so, group)
    int8 = dense_cpu.gemv_int8(x, wq, s, tiled=tiled)
    for m in (1, 3, 5, 8, 9, 13):
        assert torch.equal(dense_cpu.gemv_int4(x[-m:], packed, so, group), int4[-m:])
        assert torch.equal(dense_cpu.gemv_int8(x[-m:], wq, s, tiled=tiled), int8[-m:])


def test_int4_layout_is_the_documented_one():
    """Per 16-row panel (the last: the rows left) and octet o of inputs, one little-endian 32-bit word per row, q[8o +
    2j] in bits 4j.., q[8o + 2j + 1] in bits 16 + 4j..; per panel and group the rows' scales, then their offsets."""
    n, k, group = 21, 64, 32  # a panel of 16 rows, then one of 5
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    so = torch.randn(n, k // group, 2)
    packed, so_p = quant.pack_int4(q, so)
    words = packed.view(-1).view(torch.int32).to(torch.int64) % (1 << 32)
    flat_so = so_p.view(-1)
    for row in range(n):
        p0, rows = (0, 16) if row < 16 else (16, 5)
        for o in range(k // 8):
            word = int(words[p0 * k // 8 + o * rows + row - p0])
            for j in range(8):
                assert (word >> (4 * (j // 2) + 16 * (j % 2))) & 15 == int(q[row, 8 * o + j])
        for g in range(k // group):
            at = p0 * (k // group) * 2 + g * 2 * rows + row - p0
            assert float(flat_so[at]) == float(so[row, g, 0]) and float(flat_so[at + rows]) == float(so[row, g, 1])


def test_gemv_refuses_what_it_cannot_take():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="gemv"):
        dense_cpu.gemv(torch.randn(dense_cpu.GEMV_MAX_ROWS + 1, 16), w)
    with pytest.raises(ValueError, match="gemv"):
        dense_cpu.gemv(torch.randn(1, 16), w.t().contiguous().t())  # not contiguous
    with pytest.raises(ValueError, match="gemv"):
        dense_cpu.gemv(torch.randn(1, 16).bfloat16(), w)  # dtypes differ


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (7, 64), (300, 576), (3, 5)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_rounds_like_the_reference(dtype, shape, with_delta):
    torch.manual_seed(shape[0])
    h = torch.randn(*shape).to(dtype) * 3
    delta = torch.randn(*shape).to(dtype) if with_delta else None
    w = torch.randn(shape[1]).to(dtype)
    got_h, got = dense_cpu.add_rms_norm(h, delta, w, 1e-6)
    want_h, want = dense_cpu.add_rms_norm_reference(h, delta, w, 1e-6)
    assert torch.equal(got_h, want_h)  # one rounding of a sum: exact
    if dtype == torch.bfloat16:
        assert (got != want).float().mean() < 1e-3  # the fp32 mean may differ in its last bit, rarely seen in bf16
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 4, 200])
def test_rope_in_place_is_the_reference_bit_for_bit(dtype, tokens):
    from loraplex.layers.rotary import RotaryEmbedding

    torch.manual_seed(tokens)
    rotary = RotaryEmbedding(64, 512, 10000.0, None, dtype)
    tables = rotary.tables(torch.randint(0, 512, (tokens,)))
    qkv = torch.randn(tokens, 9 + 2 * 3, 64).to(dtype)
    qk = qkv[:, :12]
    want = dense_cpu.rope_reference(qk, *tables)
    v_before = qkv[:, 12:].clone()
    assert dense_cpu.rope_(qk, *tables) is qk
    assert torch.equal(qkv[:, :12], want) and torch.equal(qkv[:, 12:], v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(9, 3), (4, 4), (8, 1)])
def test_decode_attention_matches_the_reference(dtype, heads):
    torch.manual_seed(sum(heads))
    h, hkv = heads
    d, n_slots, width = 32, 512, 70
    k_cache, v_cache = (torch.randn(n_slots, hkv, d).to(dtype) for _ in range(2))
    qkv = torch.randn(4, h + 2 * hkv, d).to(dtype)
    q = qkv[:, :h]
    lens = torch.tensor([1, 70, 33, 5])
    slots = torch.randint(0, n_slots, (4, width))
    got = attention_cpu.decode_attention(q, k_cache, v_cache, slots, lens, d ** -0.5)
    want = attention_cpu.decode_attention_reference(q, k_cache, v_cache, slots, lens, d ** -0.5)
    _close(got, want, dtype)
    # the SDPA form the layer falls back to: the same within the dtype's rounding
    mask = (torch.arange(width)[None] < lens[:, None])[:, None, None]
    kk = k_cache[slots].transpose(1, 2)
    vv = v_cache[slots].transpose(1, 2)
    sdpa = F.scaled_dot_product_attention(q.view(4, hkv, h // hkv, d).float(), kk.float(), vv.float(),
                                          attn_mask=mask, scale=d ** -0.5).reshape(4, h, d)
    _close(got, sdpa, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_write_is_index_copy(dtype):
    k_cache, v_cache = torch.randn(64, 3, 16).to(dtype), torch.randn(64, 3, 16).to(dtype)
    qkv = torch.randn(5, 15, 16).to(dtype)
    k, v = qkv[:, 9:12], qkv[:, 12:]
    slots = torch.tensor([7, 0, 63, 12, 30])
    want_k, want_v = k_cache.clone().index_copy_(0, slots, k), v_cache.clone().index_copy_(0, slots, v)
    attention_cpu.kv_write(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_linear_takes_the_gemv_only_inside_cpu_gemv(monkeypatch):
    calls = []
    monkeypatch.setattr(dense_cpu, "gemv", lambda x, w, b=None, checked=False: calls.append(x.shape[0]) or F.linear(x, w, b))
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    ops.linear(x, w)
    with ops.cpu_gemv(2):
        ops.linear(x[:2], w)
        ops.linear(x, w)  # 3 rows > 2: the torch GEMM
    with ops.cpu_gemv(0):
        ops.linear(x[:1], w)
    assert calls == [2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 3, 100])
def test_silu_mul_matches_the_reference(dtype, tokens):
    torch.manual_seed(tokens)
    wide = (torch.randn(tokens, 2 * 1536 + 8) * 4).to(dtype)
    wide[0, 4:10] = torch.tensor([0.0, -100.0, 100.0, -0.0, 1e-30, -88.0]).to(dtype)  # the exp's edges
    gate_up = wide[:, 4:4 + 2 * 1536]  # rows of a wider tensor
    got, want = dense_cpu.silu_mul(gate_up), dense_cpu.silu_mul_reference(gate_up)
    assert got.shape == (tokens, 1536)
    if dtype == torch.bfloat16:
        assert (got != want).float().mean() < 1e-3  # exp differs from torch's in its last bits, rarely seen in bf16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-6)
