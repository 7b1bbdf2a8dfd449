/* The small-step dense ops of a decoder on the CPU, one call each where eager torch runs several: a GEMV that
 * streams the weight once for up to GEMV_MAX_ROWS tokens, the residual add fused with RMSNorm, and RoPE in place.
 * Built at first use by ops/dense_cpu.py (ops/cpu_ext.py, with -ffp-contract=off: no fused multiply-adds
 * where the reference rounds between a product and a sum); ops/dense_cpu.py holds each op's torch reference.
 *
 * Semantics (fp32 accumulation; for bf16 tensors every reference rounding to bf16 is kept, named r() below):
 *   gemv:          y[m, n] = r(sum_k W[n, k] * x[m, k] + b[n])                      (m < M, the dot in any order)
 *   gemv_int8:     y[m, n] = r(s[n] * sum_k Wq[n, k] * x[m, k] + b[n])      (Wq int8, s fp32: weight-only int8)
 *   gemv_int4:     y[m, n] = r(sum_k (q[n, k] * sc[n, k / g] + off[n, k / g]) * x[m, k] + b[n])
 *                  (q in 0..15 in nibble blocks, see INT4 LAYOUT; sc, off fp32 pairs; the dot in any order; the
 *                  tiled form rounds each weight to the compute dtype first, as dequant_int4 does)
 *   dequant_int4:  W[n, k] = r(q[n, k] * sc[n, k / g] + off[n, k / g])                 (rows n0..n1 of the weight)
 *   dequant_int8:  W[n, k] = r(Wq[n, k] * s[n])                                         (rows n0..n1 of the weight)
 *   add_rms_norm:  h' = r(h + d) (h' = h when d is NULL);  y = r(w * r(h' * rsqrt(mean(h'^2) + eps)))
 *   rope:          x[t, j, i] = r(r(x[t,j,i] * cos[t,i]) + r(x[t,j,(i+D/2)%D] * sin[t,i]))   (in place, sin signed)
 *   silu_mul:      y[t, i] = r(r(g / (1 + exp(-g))) * u)  with g = x[t, i], u = x[t, I + i]
 */
#include <stdlib.h>

#include "cpu_common.h"

#define GEMV_TOKENS 8 /* tokens per pass of a quantized GEMV's pass form over its weights (more: NAME##_chunks) */
#define INT4_ROWS 8   /* weight rows per scheduling chunk of the int4 GEMV */

/* ---- GEMV ---------------------------------------------------------------------------------------------------- */

/* x [M, K] rows of stride xs; W [N, K] contiguous; b [N] or NULL; y [M, N] rows of stride ys; OpenMP over weight
 * rows. Two forms: steps of at most GEMV_ROW_TOKENS tokens (bandwidth-bound) read one weight row at a time, a dot
 * per token over it from L1 (the row streams in at the first token's pace); larger steps (compute-bound, with
 * AVX-512) take register tiles of GEMM_NR rows x GEMM_MR tokens, each weight vector used GEMM_MR times from a
 * register, the next rows fetched into cache ahead. The tiled form sums each dot in one fixed order (K in
 * vector-wide steps in one chain per (token, row), then the lanes by halving), so within it a token's bits do not
 * depend on the step's other tokens. */
#define GEMV_ROW_TOKENS 4  /* steps of at most this many tokens take the row form */
#define GEMM_MR 4          /* tokens per register tile */
#define GEMM_NR 4          /* weight rows per register tile */
#define GEMV_CHUNK 16      /* weight rows per scheduling chunk of the tiled form */
#define GEMV_PF 2          /* the tiled form fetches weight rows this many tiles ahead */

#define DEFINE_GEMV_ROWS(NAME, T_, DOT, LOAD, STORE)                                                                \
static void NAME(const T_ *x, int64_t xs, int64_t M, const T_ *W, const T_ *b, T_ *y, int64_t ys, int64_t N,      \
                 int64_t K, int n_threads) {                                                                       \
    _Pragma("omp parallel for num_threads(n_threads) schedule(guided)")                                             \
    for (int64_t n = 0; n < N; n++) {                                                                              \
        const T_ *w = W + n * K;                                                                                   \
        float bias = b ? LOAD(b[n]) : 0.0f;                                                                        \
        for (int64_t m = 0; m < M; m++) y[m * ys + n] = STORE(DOT(w, x + m * xs, K) + bias);                       \
    }                                                                                                              \
}
DEFINE_GEMV_ROWS(gemv_rows_f32, float, dot_f32, id_f32, id_f32)
DEFINE_GEMV_ROWS(gemv_rows_bf16, uint16_t, dot_bf16, bf16_to_f32, f32_to_bf16)

#if defined(__AVX512F__)
/* The four sums of a, b, c, d's lanes, each by halving (lane i + lane i + 8, then + 4, + 2, + 1). */
static inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    u = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
    u = _mm512_add_ps(u, _mm512_permute_ps(u, 0xB1));
    return _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, u));
}

/* One register tile: MT (<= GEMM_MR) tokens of x (row stride xs) against GEMM_NR rows w[r] into out[m][r]; LANES
 * elements of K per step (VT vectors by LOAD(p, mask)), DOT(acc, w, x) one step, the last step masked. pf (or
 * NULL): GEMM_NR rows to fetch into cache along the way. */
#define DEFINE_GEMM_TILE(NAME, T_, VT, LANES, MASK_T, LOAD, DOT)                                                   \
static inline __attribute__((always_inline)) void NAME(const T_ *const *w, const T_ *pf, const T_ *x, int64_t xs,  \
                                                       const int MT, int64_t K, float out[GEMM_MR][GEMM_NR]) {     \
    __m512 acc[GEMM_MR][GEMM_NR];                                                                                \
    VT wv[GEMM_NR];                                                                                              \
    for (int m = 0; m < MT; m++)                                                                                  \
        for (int r = 0; r < GEMM_NR; r++) acc[m][r] = _mm512_setzero_ps();                                        \
    int64_t k = 0;                                                                                                \
    for (; k < K; k += LANES) {                                                                                   \
        MASK_T mk = K - k >= LANES ? (MASK_T)~(MASK_T)0 : (MASK_T)(((MASK_T)1 << (K - k)) - 1);                  \
        if (pf)                                                                                                   \
            for (int r = 0; r < GEMM_NR; r++) _mm_prefetch((const char *)(pf + r * K + k), _MM_HINT_T0);          \
        for (int r = 0; r < GEMM_NR; r++) wv[r] = LOAD(w[r] + k, mk);                                             \
        for (int m = 0; m < MT; m++) {                                                                            \
            VT xv = LOAD(x + m * xs + k, mk);                                                                     \
            for (int r = 0; r < GEMM_NR; r++) acc[m][r] = DOT(acc[m][r], wv[r], xv);                              \
        }                                                                                                         \
    }                                                                                                             \
    for (int m = 0; m < MT; m++) _mm_storeu_ps(out[m], hsum4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));        \
}
static inline __m512 load_f32(const float *p, __mmask16 mk) { return _mm512_maskz_loadu_ps(mk, p); }
static inline __m512 dot_step_f32(__m512 acc, __m512 w, __m512 x) { return _mm512_fmadd_ps(w, x, acc); }
DEFINE_GEMM_TILE(gemm_tile_f32, float, __m512, 16, __mmask16, load_f32, dot_step_f32)
#if defined(__AVX512BF16__)
static inline __m512i load_bf16(const uint16_t *p, __mmask32 mk) { return _mm512_maskz_loadu_epi16(mk, p); }
static inline __m512 dot_step_bf16(__m512 acc, __m512i w, __m512i x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
}
DEFINE_GEMM_TILE(gemm_tile_bf16, uint16_t, __m512i, 32, __mmask32, load_bf16, dot_step_bf16)
#endif

/* The tile's token count as a constant (the compiler unrolls each case). */
#define GEMM_TILE_CASES(TILE, w, pf, x, xs, MT, K, out)                                                           \
    switch (MT) {                                                                                                 \
    case 1: TILE(w, pf, x, xs, 1, K, out); break;                                                                 \
    case 2: TILE(w, pf, x, xs, 2, K, out); break;                                                                 \
    case 3: TILE(w, pf, x, xs, 3, K, out); break;                                                                 \
    default: TILE(w, pf, x, xs, 4, K, out); break;                                                                \
    }

#define DEFINE_GEMV_TILED(NAME, T_, TILE, LOAD, STORE)                                                              \
static void NAME(const T_ *x, int64_t xs, int64_t M, const T_ *W, const T_ *b, T_ *y, int64_t ys, int64_t N,      \
                 int64_t K, int n_threads) {                                                                       \
    _Pragma("omp parallel for num_threads(n_threads) schedule(guided)")                                             \
    for (int64_t c = 0; c < N; c += GEMV_CHUNK) {                                                                  \
        for (int64_t n0 = c; n0 < N && n0 < c + GEMV_CHUNK; n0 += GEMM_NR) {                                      \
            const T_ *w[GEMM_NR];                                                                                  \
            for (int r = 0; r < GEMM_NR; r++) w[r] = W + (n0 + r < N ? n0 + r : N - 1) * K; /* past N: unused */   \
            const T_ *pf = n0 + (GEMV_PF + 1) * GEMM_NR <= N ? W + (n0 + GEMV_PF * GEMM_NR) * K : NULL;           \
            for (int64_t m0 = 0; m0 < M; m0 += GEMM_MR) {                                                         \
                float out[GEMM_MR][GEMM_NR];                                                                       \
                int mt = M - m0 < GEMM_MR ? (int)(M - m0) : GEMM_MR;                                               \
                GEMM_TILE_CASES(TILE, w, m0 == 0 ? pf : NULL, x + m0 * xs, xs, mt, K, out)                         \
                for (int r = 0; r < GEMM_NR && n0 + r < N; r++) {                                                  \
                    float bias = b ? LOAD(b[n0 + r]) : 0.0f;                                                       \
                    for (int m = 0; m < mt; m++) y[(m0 + m) * ys + n0 + r] = STORE(out[m][r] + bias);             \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
    }                                                                                                              \
}
DEFINE_GEMV_TILED(gemv_tiled_f32, float, gemm_tile_f32, id_f32, id_f32)
#if defined(__AVX512BF16__)
DEFINE_GEMV_TILED(gemv_tiled_bf16, uint16_t, gemm_tile_bf16, bf16_to_f32, f32_to_bf16)
#else
#define gemv_tiled_bf16 gemv_rows_bf16
#endif
#else
#define gemv_tiled_f32 gemv_rows_f32
#define gemv_tiled_bf16 gemv_rows_bf16
#endif

#define DEFINE_GEMV(NAME, T_, SFX)                                                                                  \
void NAME(const T_ *x, int64_t xs, int64_t M, const T_ *W, const T_ *b, T_ *y, int64_t ys, int64_t N, int64_t K,  \
          int n_threads) {                                                                                         \
    (M <= GEMV_ROW_TOKENS ? gemv_rows_##SFX : gemv_tiled_##SFX)(x, xs, M, W, b, y, ys, N, K, n_threads);          \
}
DEFINE_GEMV(gemv_f32, float, f32)
DEFINE_GEMV(gemv_bf16, uint16_t, bf16)

/* int8 weights widened to fp32 in registers (16 per instruction) against x converted to fp32 once per call. */
static inline float dot_i8(const int8_t *w, const float *x, int64_t K) {
    int64_t k = 0;
    float s = 0.0f;
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; k + 64 <= K; k += 64) {
        __m512i v = _mm512_loadu_si512(w + k);
        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 0))),
                             _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 1))),
                             _mm512_loadu_ps(x + k + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 2))),
                             _mm512_loadu_ps(x + k + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 3))),
                             _mm512_loadu_ps(x + k + 48), a3);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
    float t = 0.0f;
    _Pragma("omp simd reduction(+:t)")
    for (int64_t j = k; j < K; j++) t += (float)w[j] * x[j];
    return s + t;
}

/* x [M, K] rows of stride xs; Wq [N, K] int8 contiguous; s [N] fp32; b [N] or NULL; y [M, N] rows of stride ys. */
#define DEFINE_GEMV_INT8(NAME, T_, LOAD, STORE)                                                                    \
static void NAME##_pass(const T_ *x, int64_t xs, int64_t M, const int8_t *W, const float *s, const T_ *b, T_ *y,  \
                       int64_t ys, int64_t N, int64_t K, int n_threads) {                                          \
    _Pragma("omp parallel num_threads(n_threads)")                                                                 \
    {                                                                                                              \
        float *xf = (float *)malloc(sizeof(float) * (size_t)(M * K));                                              \
        for (int64_t m = 0; m < M; m++)                                                                            \
            for (int64_t k = 0; k < K; k++) xf[m * K + k] = LOAD(x[m * xs + k]);                                   \
        _Pragma("omp for schedule(guided)")                                                                         \
        for (int64_t n = 0; n < N; n++) {                                                                          \
            const int8_t *w = W + n * K;                                                                           \
            float bias = b ? LOAD(b[n]) : 0.0f;                                                                    \
            for (int64_t m = 0; m < M; m++) y[m * ys + n] = STORE(s[n] * dot_i8(w, xf + m * K, K) + bias);         \
        }                                                                                                          \
        free(xf);                                                                                                  \
    }                                                                                                              \
}

DEFINE_GEMV_INT8(gemv_int8_f32, float, id_f32, id_f32)
#ifndef __AVX512BF16__
DEFINE_GEMV_INT8(gemv_int8_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
#endif

/* ---- int4 GEMV ------------------------------------------------------------------------------------------------
 * INT4 LAYOUT (ops/quant.py pack_int4): each row's K/2 bytes hold blocks of 4 L weights in 2 L bytes, read as L
 * little-endian 16-bit lanes: lane j of a block starting at weight k0 holds q[k0 + L p + j] in bits 4p..4p+3 (the
 * four "planes" p = 0..3). Blocks of 128 (L = 32) while 128 weights are left, then one of 64 (L = 16) if 64 are
 * left, then one of 32 (L = 8). Groups (g = 32, 64 or 128 weights) hold one (scale, offset) fp32 pair each:
 * W = q * scale + offset; blocks and planes never straddle a group.
 * With AVX512-BF16 and bf16 activations a plane widens to bf16 in one or two instructions: OR-ing the nibble into the
 * pattern of 128 (0x4300) gives exactly 128 + q, so vdpbf16ps sums D = sum (128 + q) x exactly per product, and
 * sum W x = scale * D + (offset - 128 scale) * S per group, S = sum x over the group (once per call). */

/* The lanes L of the block holding weight k (a multiple of 32) of a K-wide row, and that block's first weight. */
static inline int64_t int4_block(int64_t K, int64_t k, int64_t *base) {
    int64_t f128 = K / 128 * 128;
    if (k < f128) { *base = k / 128 * 128; return 32; }
    if (K - f128 >= 64 && k < f128 + 64) { *base = f128; return 16; }
    *base = K - 32;
    return 8;
}

/* q[k0 .. k0 + 32) of a row (k0 a multiple of 32; always inside one block: 1, 2 or 4 planes of it) as floats. */
static inline void int4_unpack32(const uint8_t *row, int64_t K, int64_t k0, float *w) {
    int64_t base, L = int4_block(K, k0, &base);
    const uint16_t *lanes = (const uint16_t *)(row + base / 2);           /* little-endian hosts only (x86, arm) */
    int p0 = (int)((k0 - base) / L);
    if (L == 32) {
        _Pragma("omp simd")
        for (int j = 0; j < 32; j++) w[j] = (float)((lanes[j] >> (4 * p0)) & 0xf);
    } else {
        for (int i = 0; i < 32 / L; i++)
            for (int j = 0; j < L; j++) w[i * L + j] = (float)((lanes[j] >> (4 * (p0 + i))) & 0xf);
    }
}

/* Per-group sums S_g of x (G groups of g) for M rows of stride xs as pairs (-128 S_g, S_g): SS [M, 2 G]. */
#define DEFINE_GROUP_SUMS(NAME, T_, LOAD)                                                                          \
static void NAME(const T_ *x, int64_t xs, int64_t M, int64_t K, int64_t g, float *S) {                           \
    for (int64_t m = 0; m < M; m++)                                                                                \
        for (int64_t G0 = 0; G0 < K / g; G0++) {                                                                   \
            float s = 0.0f;                                                                                        \
            for (int64_t k = G0 * g; k < (G0 + 1) * g; k++) s += LOAD(x[m * xs + k]);                              \
            S[m * 2 * (K / g) + 2 * G0] = -128.0f * s;                                                             \
            S[m * 2 * (K / g) + 2 * G0 + 1] = s;                                                                   \
        }                                                                                                          \
}
DEFINE_GROUP_SUMS(group_sums_f32, float, id_f32)
DEFINE_GROUP_SUMS(group_sums_bf16, uint16_t, bf16_to_f32)

/* Portable form, one row: D[m, group] = sum q x over the row's groups, then scale * D + offset * S. */
static void int4_row_f32(const uint8_t *row, const float *so, const float *xf, const float *S, int64_t M, int64_t K,
                         int64_t g, float *out) {
    float w[32];
    for (int64_t m = 0; m < M; m++) out[m] = 0.0f;
    for (int64_t G0 = 0; G0 < K / g; G0++) {
        float sc = so[2 * G0], off = so[2 * G0 + 1];
        for (int64_t k0 = G0 * g; k0 < (G0 + 1) * g; k0 += 32) {
            int4_unpack32(row, K, k0, w);
            for (int64_t m = 0; m < M; m++) {
                const float *xm = xf + m * K + k0;
                float d = 0.0f;
                _Pragma("omp simd reduction(+:d)")
                for (int64_t i = 0; i < 32; i++) d += w[i] * xm[i];
                out[m] += sc * d;
            }
        }
        for (int64_t m = 0; m < M; m++) out[m] += off * S[m * 2 * (K / g) + 2 * G0 + 1];
    }
}

#ifdef __AVX512BF16__
static inline __m512i int4_plane(__m512i v, int q) { /* plane q of a block's lanes as bf16 128 + nibble */
    const __m512i nib = _mm512_set1_epi16(0x000f), b128 = _mm512_set1_epi16(0x4300);
    if (q == 3) return _mm512_or_si512(_mm512_srli_epi16(v, 12), b128);
    return _mm512_ternarylogic_epi32(q ? _mm512_srli_epi16(v, 4 * q) : v, nib, b128, 0xEA); /* (v & 0xf) | 0x4300 */
}

/* The AVX512-BF16 form for bf16 x, one row, MT tokens and PER = g / 32 planes of a 128-block per group (constants
 * at each call site: the accumulators stay in registers). Per group and token one chain of vdpbf16ps from zero,
 * scaled into one of two running sums; the offsets' share sum_g (offset - 128 scale) S_g is one dot of the row's
 * (scale, offset) pairs with SS [MT, 2 G] = (-128 S_g, S_g) pairs, made once per call. */
static inline __attribute__((always_inline)) void int4_row_bf16_avx(
        const uint8_t *row, const float *so, const uint16_t *x, int64_t xs, const float *SS, const int MT,
        const int PER, int64_t K, int64_t g, float *out) {
    __m512 tot[GEMV_TOKENS][2];
    for (int m = 0; m < MT; m++) tot[m][0] = tot[m][1] = _mm512_setzero_ps();
    int64_t f128 = K / 128 * 128, G0 = 0;
    for (int64_t k = 0; k < f128; k += 128) {
        __m512i v = _mm512_loadu_si512(row + k / 2), p[4];
        for (int q = 0; q < 4; q++) p[q] = int4_plane(v, q);
        for (int q0 = 0; q0 < 4; q0 += PER, G0++) {
            __m512 sc = _mm512_set1_ps(so[2 * G0]);
            for (int m = 0; m < MT; m++) {
                __m512 a = _mm512_setzero_ps();
                for (int q = q0; q < q0 + PER; q++)
                    a = _mm512_dpbf16_ps(a, (__m512bh)p[q], (__m512bh)_mm512_loadu_si512(x + m * xs + k + 32 * q));
                tot[m][G0 & 1] = _mm512_fmadd_ps(a, sc, tot[m][G0 & 1]);
            }
        }
    }
    for (int64_t k = f128; k < K;) {                                    /* a block of 64 (L = 16), then of 32 (L = 8) */
        int64_t L = K - k >= 64 ? 16 : 8, done = 0;
        __mmask32 lanes = ((__mmask32)1 << L) - 1;
        __mmask16 sums = (__mmask16)((1u << (L / 2)) - 1);
        __m512i v = _mm512_maskz_loadu_epi16(lanes, row + k / 2);
        __m512 a[GEMV_TOKENS];
        for (int m = 0; m < MT; m++) a[m] = _mm512_setzero_ps();
        for (int q = 0; q < 4; q++) {
            __m512i pq = int4_plane(v, q);
            for (int m = 0; m < MT; m++)
                a[m] = _mm512_mask_dpbf16_ps(a[m], sums, (__m512bh)pq,
                                             (__m512bh)_mm512_maskz_loadu_epi16(lanes, x + m * xs + k + L * q));
            if ((done += L) == g) {
                __m512 sc = _mm512_set1_ps(so[2 * G0++]);
                for (int m = 0; m < MT; m++) {
                    tot[m][0] = _mm512_fmadd_ps(a[m], sc, tot[m][0]);
                    a[m] = _mm512_setzero_ps();
                }
                done = 0;
            }
        }
        k += 4 * L;
    }
    int64_t n2 = 2 * (K / g);
    for (int m = 0; m < MT; m++) {
        __m512 z = _mm512_setzero_ps();
        for (int64_t i = 0; i < n2; i += 16) {
            __mmask16 km = n2 - i >= 16 ? 0xffff : (__mmask16)((1u << (n2 - i)) - 1);
            z = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(km, so + i),
                                _mm512_maskz_loadu_ps(km, SS + m * n2 + i), z);
        }
        out[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(tot[m][0], tot[m][1]), z));
    }
}
#endif

/* x [M, K] rows of stride xs; Wp [N, K / 2] packed; so [N, K / g, 2] fp32; b [N] or NULL; y [M, N] of stride ys. */
#define DEFINE_GEMV_INT4(NAME, T_, LOAD, STORE, GROUP_SUMS, ROW)                                                  \
static void NAME##_pass(const T_ *x, int64_t xs, int64_t M, const uint8_t *W, const float *so, int64_t g, const T_ *b,      \
          T_ *y, int64_t ys, int64_t N, int64_t K, int n_threads) {                                              \
    float *S = (float *)malloc(sizeof(float) * (size_t)(M * 2 * (K / g)));                                       \
    GROUP_SUMS(x, xs, M, K, g, S);                                                                               \
    float *xf = NULL;                                                                                            \
    if (!ROW##_direct) {                                                                                         \
        xf = (float *)malloc(sizeof(float) * (size_t)(M * K));                                                   \
        for (int64_t m = 0; m < M; m++)                                                                          \
            for (int64_t k = 0; k < K; k++) xf[m * K + k] = LOAD(x[m * xs + k]);                                 \
    }                                                                                                            \
    _Pragma("omp parallel for num_threads(n_threads) schedule(guided)")                                           \
    for (int64_t n0 = 0; n0 < N; n0 += INT4_ROWS) {                                                              \
        int64_t n1 = n0 + INT4_ROWS < N ? n0 + INT4_ROWS : N;                                                    \
        float out[INT4_ROWS * GEMV_TOKENS];                                                                      \
        ROW(W + n0 * (K / 2), so + n0 * (K / g) * 2, n1 - n0, x, xs, xf, S, M, K, g, out);                       \
        for (int64_t n = n0; n < n1; n++) {                                                                      \
            float bias = b ? LOAD(b[n]) : 0.0f;                                                                  \
            for (int64_t m = 0; m < M; m++) y[m * ys + n] = STORE(out[(n - n0) * GEMV_TOKENS + m] + bias);       \
        }                                                                                                        \
    }                                                                                                            \
    free(xf);                                                                                                    \
    free(S);                                                                                                     \
}

/* ROW(W, so, rows, x, xs, xf, S, M, K, g, out): rows consecutive rows into out [rows, GEMV_TOKENS]; ROW_direct:
 * whether it reads x itself (else xf, x in fp32). */
static const int int4_f32_row_direct = 0;
static inline void int4_f32_row(const uint8_t *W, const float *so, int64_t rows, const float *x, int64_t xs,
                                const float *xf, const float *S, int64_t M, int64_t K, int64_t g, float *out) {
    (void)x; (void)xs;
    for (int64_t r = 0; r < rows; r++)
        int4_row_f32(W + r * (K / 2), so + r * (K / g) * 2, xf, S, M, K, g, out + r * GEMV_TOKENS);
}

#ifdef __AVX512BF16__
static const int int4_bf16_row_direct = 1;
#define INT4_ROWS_PER(MT, PER)                                                                                     \
    for (int64_t r = 0; r < rows; r++)                                                                             \
        int4_row_bf16_avx(W + r * (K / 2), so + r * (K / g) * 2, x, xs, S, MT, PER, K, g, out + r * GEMV_TOKENS);
#define INT4_ROW_CASE(MT)                                                                                          \
    case MT:                                                                                                       \
        if (g == 32) { INT4_ROWS_PER(MT, 1) }                                                                      \
        else if (g == 64) { INT4_ROWS_PER(MT, 2) }                                                                 \
        else { INT4_ROWS_PER(MT, 4) }                                                                              \
        break;
static void int4_bf16_row(const uint8_t *W, const float *so, int64_t rows, const uint16_t *x, int64_t xs,
                          const float *xf, const float *S, int64_t M, int64_t K, int64_t g, float *out) {
    (void)xf;
    switch (M) {                                                        /* constant token counts and group sizes */
    INT4_ROW_CASE(1) INT4_ROW_CASE(2) INT4_ROW_CASE(3) INT4_ROW_CASE(4)
    INT4_ROW_CASE(5) INT4_ROW_CASE(6) INT4_ROW_CASE(7) INT4_ROW_CASE(8)
    }
}
#else
static const int int4_bf16_row_direct = 0;
static inline void int4_bf16_row(const uint8_t *W, const float *so, int64_t rows, const uint16_t *x, int64_t xs,
                                 const float *xf, const float *S, int64_t M, int64_t K, int64_t g, float *out) {
    (void)x; (void)xs;
    for (int64_t r = 0; r < rows; r++)
        int4_row_f32(W + r * (K / 2), so + r * (K / g) * 2, xf, S, M, K, g, out + r * GEMV_TOKENS);
}
#endif

DEFINE_GEMV_INT4(gemv_int4_f32, float, id_f32, id_f32, group_sums_f32, int4_f32_row)
DEFINE_GEMV_INT4(gemv_int4_bf16, uint16_t, bf16_to_f32, f32_to_bf16, group_sums_bf16, int4_bf16_row)

/* One row of the weight in the compute dtype: out [K] (the large-batch path's GEMM, the tiled GEMV's scratch). FAST
 * takes the row's blocks and returns how many weights it wrote; the rest here, 32 at a time. */
#define DEFINE_DEQUANT_INT4_ROW(NAME, T_, STORE, FAST)                                                            \
static inline void NAME(const uint8_t *row, const float *s, int64_t g, int64_t K, T_ *o) {                       \
    float w[32];                                                                                                 \
    for (int64_t k0 = FAST(row, s, g, K, o); k0 < K; k0 += 32) {                                                 \
        float sc = s[2 * (k0 / g)], off = s[2 * (k0 / g) + 1];                                                   \
        int4_unpack32(row, K, k0, w);                                                                            \
        for (int i = 0; i < 32; i++) o[k0 + i] = STORE(w[i] * sc + off);                                         \
    }                                                                                                            \
}

/* Rows n0..n1 of the weight in the compute dtype: out [(n1 - n0), K] contiguous. */
#define DEFINE_DEQUANT_INT4(NAME, T_, ROW)                                                                        \
void NAME(const uint8_t *W, const float *so, int64_t g, int64_t n0, int64_t n1, int64_t K, T_ *out,             \
          int n_threads) {                                                                                       \
    _Pragma("omp parallel for num_threads(n_threads) schedule(static)")                                           \
    for (int64_t n = n0; n < n1; n++) ROW(W + n * (K / 2), so + n * (K / g) * 2, g, K, out + (n - n0) * K);     \
}

static inline int64_t dequant_none(const uint8_t *row, const float *s, int64_t g, int64_t K, void *o) {
    (void)row; (void)s; (void)g; (void)K; (void)o;
    return 0;
}

#ifdef __AVX512BF16__
/* A row to bf16 by table: per group the 16 values r(r(q * scale) + offset), q = 0..15 (the reference's roundings),
 * then one vpermw per plane (of 32, 16 or 8 weights: masked to the block's lanes). */
static inline int64_t dequant_bf16_blocks(const uint8_t *row, const float *s, int64_t g, int64_t K, void *out) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i nib = _mm512_set1_epi16(0x000f);
    uint16_t *o = (uint16_t *)out;
    int64_t G0 = -1;
    __m512i lut = _mm512_setzero_si512();
    for (int64_t k = 0; k < K;) {
        int64_t base, L = int4_block(K, k, &base);
        __mmask32 lanes = L == 32 ? 0xffffffffu : ((__mmask32)1 << L) - 1;
        __m512i v = _mm512_maskz_loadu_epi16(lanes, row + k / 2);
        for (int q = 0; q < 4; q++) {
            int64_t G = (k + L * q) / g;
            if (G != G0) {
                __m512 t = _mm512_add_ps(_mm512_mul_ps(iota, _mm512_set1_ps(s[2 * G])), _mm512_set1_ps(s[2 * G + 1]));
                lut = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(t));
                G0 = G;
            }
            __m512i idx = _mm512_and_si512(q ? _mm512_srli_epi16(v, 4 * q) : v, nib);
            _mm512_mask_storeu_epi16(o + k + L * q, lanes, _mm512_permutexvar_epi16(idx, lut));
        }
        k += 4 * L;
    }
    return K;
}
#else
#define dequant_bf16_blocks dequant_none
#endif

DEFINE_DEQUANT_INT4_ROW(int4_row_to_f32, float, id_f32, dequant_none)
DEFINE_DEQUANT_INT4_ROW(int4_row_to_bf16, uint16_t, f32_to_bf16, dequant_bf16_blocks)
DEFINE_DEQUANT_INT4(dequant_int4_f32, float, int4_row_to_f32)
DEFINE_DEQUANT_INT4(dequant_int4_bf16, uint16_t, int4_row_to_bf16)

#ifdef __AVX512BF16__
/* ---- int8 GEMV for bf16 x: each int8 weight as two nibbles widened like int4's ------------------------------------
 * 64 int8 weights are 32 16-bit lanes; lane j holds weights 2j (low byte) and 2j+1 (high byte). Their four nibbles
 * widen to bf16 as int4's planes do, the high nibbles with bit 3 flipped (XOR 0x4308 instead of OR 0x4300: 128 +
 * h + 8 for the signed high nibble h), so a weight b = 16 h + l contributes (128 + h + 8) * 16 x + (128 + l) * x and
 * sum b x = D - 2304 S, with D the vdpbf16ps sum against x's even / odd elements and 16 times them (exact in bf16),
 * laid out per 64-block once per call, and S = sum x. */
static inline __m512i int8_plane(__m512i v, int q) {
    const __m512i nib = _mm512_set1_epi16(0x000f), lo = _mm512_set1_epi16(0x4300), hi = _mm512_set1_epi16(0x4308);
    if (q == 3) return _mm512_xor_si512(_mm512_srli_epi16(v, 12), hi);
    __m512i t = q ? _mm512_srli_epi16(v, 4 * q) : v;
    return q == 1 ? _mm512_ternarylogic_epi32(t, nib, hi, 0x6A)          /* (t & 0xf) ^ 0x4308 */
                  : _mm512_ternarylogic_epi32(t, nib, lo, 0xEA);         /* (t & 0xf) | 0x4300 */
}

/* One row, MT tokens: X [MT, 4, K64 / 2] the even, 16 * even, odd, 16 * odd elements per 64-block (plane order). */
static inline __attribute__((always_inline)) void int8_row_bf16_avx(const int8_t *w, const uint16_t *X, const int MT,
                                                                    int64_t K64, float *out) {
    const int C = MT == 1 ? 4 : MT < 4 ? 2 : 1;
    __m512 acc[GEMV_TOKENS][4];
    for (int m = 0; m < MT; m++)
        for (int c = 0; c < C; c++) acc[m][c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K64; k += 64) {
        __m512i v = _mm512_loadu_si512(w + k);
        for (int q = 0; q < 4; q++) {
            __m512i p = int8_plane(v, q);
            for (int m = 0; m < MT; m++)
                acc[m][q % C] = _mm512_dpbf16_ps(acc[m][q % C], (__m512bh)p,
                                                 (__m512bh)_mm512_loadu_si512(X + (m * 4 + q) * (K64 / 2) + k / 2));
        }
    }
    for (int m = 0; m < MT; m++) {
        __m512 a = acc[m][0];
        for (int c = 1; c < C; c++) a = _mm512_add_ps(a, acc[m][c]);
        out[m] = _mm512_reduce_add_ps(a);
    }
}

#define INT8_ROW_CASE(MT)                                                                                          \
    case MT:                                                                                                       \
        for (int64_t r = 0; r < rows; r++) int8_row_bf16_avx(W + r * K, X, MT, K64, out + r * GEMV_TOKENS);      \
        break;

/* x [M, K] bf16 rows of stride xs; Wq [N, K] int8; s [N] fp32; b [N] or NULL; y [M, N] rows of stride ys. */
static void gemv_int8_bf16_pass(const uint16_t *x, int64_t xs, int64_t M, const int8_t *W, const float *s,
                                const uint16_t *b, uint16_t *y, int64_t ys, int64_t N, int64_t K, int n_threads) {
    int64_t K64 = K / 64 * 64, half = K64 / 2;
    uint16_t *X = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(M * 2 * K64 + 1));
    float S[GEMV_TOKENS];
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *xm = x + m * xs;
        uint16_t *Xm = X + m * 2 * K64;           /* planes: even, 16 even, odd, 16 odd elements, half each */
        float sum = 0.0f;
        for (int64_t k = 0; k < K64; k++) {
            float f = bf16_to_f32(xm[k]);
            sum += f;
            int64_t at = (k & 1) * 2 * half + k / 2;
            Xm[at] = xm[k];
            Xm[at + half] = f32_to_bf16(16.0f * f);   /* exact: a power of two */
        }
        S[m] = sum;
    }
    _Pragma("omp parallel for num_threads(n_threads) schedule(guided)")
    for (int64_t n0 = 0; n0 < N; n0 += INT4_ROWS) {
        int64_t rows = n0 + INT4_ROWS < N ? INT4_ROWS : N - n0;
        float out[INT4_ROWS * GEMV_TOKENS];
        const int8_t *Wr = W + n0 * K;
        {
            const int8_t *W = Wr;
            switch (M) {
            INT8_ROW_CASE(1) INT8_ROW_CASE(2) INT8_ROW_CASE(3) INT8_ROW_CASE(4)
            INT8_ROW_CASE(5) INT8_ROW_CASE(6) INT8_ROW_CASE(7) default: INT8_ROW_CASE(8)
            }
        }
        for (int64_t r = 0; r < rows; r++) {
            int64_t n = n0 + r;
            float bias = b ? bf16_to_f32(b[n]) : 0.0f;
            for (int64_t m = 0; m < M; m++) {
                float d = out[r * GEMV_TOKENS + m] - 2304.0f * S[m];
                for (int64_t k = K64; k < K; k++) d += (float)W[n * K + k] * bf16_to_f32(x[m * xs + k]);
                y[m * ys + n] = f32_to_bf16(s[n] * d + bias);
            }
        }
    }
    free(X);
}
#endif

/* One int8 row in the compute dtype, o[k] = r(Wq[k] * sc): FAST writes what it can and returns how many. */
#define DEFINE_DEQUANT_INT8_ROW(NAME, T_, STORE, FAST)                                                            \
static inline void NAME(const int8_t *row, float sc, int64_t K, T_ *o) {                                         \
    int64_t k = FAST(row, sc, K, o);                                                                             \
    for (; k < K; k++) o[k] = STORE((float)row[k] * sc);                                                         \
}
/* Rows n0..n1 of an int8 weight, W[n, k] = r(Wq[n, k] * s[n]): out [(n1 - n0), K] contiguous. */
#define DEFINE_DEQUANT_INT8(NAME, T_, ROW)                                                                        \
void NAME(const int8_t *W, const float *s, int64_t n0, int64_t n1, int64_t K, T_ *out, int n_threads) {          \
    _Pragma("omp parallel for num_threads(n_threads) schedule(static)")                                           \
    for (int64_t n = n0; n < n1; n++) ROW(W + n * K, s[n], K, out + (n - n0) * K);                               \
}
static inline int64_t dequant_int8_none(const int8_t *row, float sc, int64_t K, void *o) {
    (void)sc;
    return dequant_none((const uint8_t *)row, NULL, 0, K, o);
}

#ifdef __AVX512BF16__
static inline int64_t dequant_int8_bf16_fast(const int8_t *row, float sc, int64_t K, void *out) {  /* 16 at a time */
    uint16_t *o = (uint16_t *)out;
    __m512 vs = _mm512_set1_ps(sc);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + k))));
        _mm256_storeu_si256((__m256i *)(o + k), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(f, vs)));
    }
    return k;
}
#else
#define dequant_int8_bf16_fast dequant_int8_none
#endif

DEFINE_DEQUANT_INT8_ROW(int8_row_to_f32, float, id_f32, dequant_int8_none)
DEFINE_DEQUANT_INT8_ROW(int8_row_to_bf16, uint16_t, f32_to_bf16, dequant_int8_bf16_fast)
DEFINE_DEQUANT_INT8(dequant_int8_f32, float, int8_row_to_f32)
DEFINE_DEQUANT_INT8(dequant_int8_bf16, uint16_t, int8_row_to_bf16)

/* ---- the quantized GEMVs' entry points ------------------------------------------------------------------------
 * Two forms, the caller's choice (`tiled`; measured per machine, shape and step size by engine/quant_plan.py). The
 * pass form widens in registers as above, one pass over the weights per GEMV_TOKENS tokens (bandwidth-bound small
 * steps). The tiled form (with AVX-512; else the pass form) expands each GEMM_NR weight rows once into a per-thread
 * scratch in the compute dtype -- int4 as dequant_int4 writes them, r(r(q * scale) + offset); int8 as the exact q,
 * its row scale applied to the fp32 dot -- then runs the dense register tiles over them for every token, so a
 * weight is widened once per step, not once per GEMV_TOKENS tokens. Within a form a token's bits do not depend on
 * the step's other tokens. */

/* EXPAND(n, out): weight row n into out [K] (W, the Q_PARAMS and K in scope); ROW_SCALE(n): the factor on row n's
 * dot, before the bias. */
#define DEFINE_GEMV_QUANT_TILED(NAME, T_, WT, Q_PARAMS, TILE, EXPAND, ROW_SCALE, LOAD, STORE)                        \
static void NAME(const T_ *x, int64_t xs, int64_t M, const WT *W, Q_PARAMS, const T_ *b, T_ *y, int64_t ys,       \
                 int64_t N, int64_t K, int n_threads) {                                                            \
    _Pragma("omp parallel num_threads(n_threads)")                                                                 \
    {                                                                                                              \
        T_ *scratch = (T_ *)malloc(sizeof(T_) * (size_t)(GEMM_NR * K));                                             \
        _Pragma("omp for schedule(guided)")                                                                        \
        for (int64_t c = 0; c < N; c += GEMV_CHUNK) {                                                              \
            for (int64_t n0 = c; n0 < N && n0 < c + GEMV_CHUNK; n0 += GEMM_NR) {                                  \
                const T_ *w[GEMM_NR];                                                                              \
                for (int r = 0; r < GEMM_NR; r++) {                                                                \
                    if (n0 + r < N) EXPAND(n0 + r, scratch + r * K);                                               \
                    w[r] = scratch + (n0 + r < N ? r : 0) * K;                               /* past N: unused */  \
                }                                                                                                  \
                for (int64_t m0 = 0; m0 < M; m0 += GEMM_MR) {                                                     \
                    float out[GEMM_MR][GEMM_NR];                                                                   \
                    int mt = M - m0 < GEMM_MR ? (int)(M - m0) : GEMM_MR;                                           \
                    GEMM_TILE_CASES(TILE, w, NULL, x + m0 * xs, xs, mt, K, out)                                    \
                    for (int r = 0; r < GEMM_NR && n0 + r < N; r++) {                                              \
                        float f = ROW_SCALE(n0 + r), bias = b ? LOAD(b[n0 + r]) : 0.0f;                            \
                        for (int m = 0; m < mt; m++) y[(m0 + m) * ys + n0 + r] = STORE(f * out[m][r] + bias);     \
                    }                                                                                              \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
        free(scratch);                                                                                             \
    }                                                                                                              \
}
#define INT4_EXPAND_f32(n, o) int4_row_to_f32(W + (n) * (K / 2), so + (n) * (K / g) * 2, g, K, o)
#define INT4_EXPAND_bf16(n, o) int4_row_to_bf16(W + (n) * (K / 2), so + (n) * (K / g) * 2, g, K, o)
#define INT4_ROW_SCALE(n) 1.0f
/* int8 rows expanded as their exact q (scale 1: |q| <= 127 fits bf16's 8-bit significand) */
#define INT8_EXPAND_f32(n, o) int8_row_to_f32(W + (n) * K, 1.0f, K, o)
#define INT8_EXPAND_bf16(n, o) int8_row_to_bf16(W + (n) * K, 1.0f, K, o)
#define INT8_ROW_SCALE(n) s[n]
#define INT4_Q_PARAMS const float *so, int64_t g
#define INT4_Q_ARGS so, g
#define INT8_Q_PARAMS const float *s
#define INT8_Q_ARGS s

/* NAME: LARGE (the tiled form) when `tiled`, else NAME##_chunks (passes of NAME##_pass, GEMV_TOKENS tokens each). */
#define DEFINE_QUANT_GEMV(NAME, T_, WT, Q_PARAMS, Q_ARGS, LARGE)                                                     \
static void NAME##_chunks(const T_ *x, int64_t xs, int64_t M, const WT *W, Q_PARAMS, const T_ *b, T_ *y,          \
                          int64_t ys, int64_t N, int64_t K, int n_threads) {                                       \
    for (int64_t m0 = 0; m0 < M; m0 += GEMV_TOKENS)                                                               \
        NAME##_pass(x + m0 * xs, xs, M - m0 < GEMV_TOKENS ? M - m0 : GEMV_TOKENS, W, Q_ARGS, b, y + m0 * ys, ys, N, \
                    K, n_threads);                                                                                 \
}                                                                                                                  \
void NAME(const T_ *x, int64_t xs, int64_t M, const WT *W, Q_PARAMS, const T_ *b, T_ *y, int64_t ys, int64_t N,   \
          int64_t K, int64_t tiled, int n_threads) {                                                               \
    (tiled ? LARGE : NAME##_chunks)(x, xs, M, W, Q_ARGS, b, y, ys, N, K, n_threads);                               \
}

/* Both formats' tiled forms for one compute dtype (SFX f32 / bf16: its tile, loads and stores). */
#define DEFINE_QUANT_TILED_FORMS(SFX, T_, LOAD, STORE)                                                              \
DEFINE_GEMV_QUANT_TILED(gemv_int4_##SFX##_tiled, T_, uint8_t, INT4_Q_PARAMS, gemm_tile_##SFX, INT4_EXPAND_##SFX,  \
                        INT4_ROW_SCALE, LOAD, STORE)                                                               \
DEFINE_GEMV_QUANT_TILED(gemv_int8_##SFX##_tiled, T_, int8_t, INT8_Q_PARAMS, gemm_tile_##SFX, INT8_EXPAND_##SFX,   \
                        INT8_ROW_SCALE, LOAD, STORE)
#if defined(__AVX512F__)
DEFINE_QUANT_TILED_FORMS(f32, float, id_f32, id_f32)
#else
#define gemv_int4_f32_tiled gemv_int4_f32_chunks
#define gemv_int8_f32_tiled gemv_int8_f32_chunks
#endif
#if defined(__AVX512BF16__)
DEFINE_QUANT_TILED_FORMS(bf16, uint16_t, bf16_to_f32, f32_to_bf16)
#else
#define gemv_int4_bf16_tiled gemv_int4_bf16_chunks
#define gemv_int8_bf16_tiled gemv_int8_bf16_chunks
#endif
DEFINE_QUANT_GEMV(gemv_int4_f32, float, uint8_t, INT4_Q_PARAMS, INT4_Q_ARGS, gemv_int4_f32_tiled)
DEFINE_QUANT_GEMV(gemv_int4_bf16, uint16_t, uint8_t, INT4_Q_PARAMS, INT4_Q_ARGS, gemv_int4_bf16_tiled)
DEFINE_QUANT_GEMV(gemv_int8_f32, float, int8_t, INT8_Q_PARAMS, INT8_Q_ARGS, gemv_int8_f32_tiled)
DEFINE_QUANT_GEMV(gemv_int8_bf16, uint16_t, int8_t, INT8_Q_PARAMS, INT8_Q_ARGS, gemv_int8_bf16_tiled)

/* ---- residual add + RMSNorm ------------------------------------------------------------------------------------ */

/* h [T, D] rows of stride hs; d [T, D] rows of stride ds or NULL; w [D]; h_out [T, D] contiguous (the new residual
 * stream, unused when d is NULL) and y [T, D] contiguous. */
#define DEFINE_ADD_RMS_NORM(NAME, T_, LOAD, STORE, ROUND)                                                          \
void NAME(const T_ *h, int64_t hs, const T_ *d, int64_t ds, const T_ *w, T_ *h_out, T_ *y, int64_t T,            \
          int64_t D, float eps, int n_threads) {                                                                   \
    _Pragma("omp parallel for num_threads(n_threads) schedule(static) if(T * D >= 65536)")                         \
    for (int64_t t = 0; t < T; t++) {                                                                              \
        const T_ *ht = h + t * hs;                                                                                 \
        T_ *yt = y + t * D;                                                                                        \
        float ss = 0.0f;                                                                                           \
        if (d) {                                                                                                   \
            const T_ *dt = d + t * ds;                                                                             \
            T_ *ot = h_out + t * D;                                                                                \
            _Pragma("omp simd reduction(+:ss)")                                                                    \
            for (int64_t i = 0; i < D; i++) {                                                                      \
                float v = ROUND(LOAD(ht[i]) + LOAD(dt[i]));                                                        \
                ot[i] = STORE(v);                                                                                  \
                ss += v * v;                                                                                       \
            }                                                                                                      \
            ht = ot;                                                                                               \
        } else {                                                                                                   \
            _Pragma("omp simd reduction(+:ss)")                                                                    \
            for (int64_t i = 0; i < D; i++) ss += LOAD(ht[i]) * LOAD(ht[i]);                                       \
        }                                                                                                          \
        float r = 1.0f / sqrtf(ss / (float)D + eps);                                                               \
        _Pragma("omp simd")                                                                                        \
        for (int64_t i = 0; i < D; i++) yt[i] = STORE(LOAD(w[i]) * ROUND(LOAD(ht[i]) * r));                        \
    }                                                                                                              \
}

DEFINE_ADD_RMS_NORM(add_rms_norm_f32, float, id_f32, id_f32, id_f32)
DEFINE_ADD_RMS_NORM(add_rms_norm_bf16, uint16_t, bf16_to_f32, f32_to_bf16, round_bf16)

/* ---- RoPE (NeoX half-split layout), in place ------------------------------------------------------------------- */

/* x: T tokens of stride ts, H heads of D contiguous values each; cos, sin: [T, D] contiguous (sin signed: -sin on
 * the first half). */
#define DEFINE_ROPE(NAME, T_, LOAD, STORE, ROUND)                                                                  \
void NAME(T_ *x, int64_t ts, int64_t T, int64_t H, int64_t D, const T_ *cos_, const T_ *sin_, int n_threads) {    \
    int64_t half = D / 2;                                                                                          \
    _Pragma("omp parallel for num_threads(n_threads) schedule(static) if(T * H * D >= 65536)")                     \
    for (int64_t t = 0; t < T; t++) {                                                                              \
        const T_ *c = cos_ + t * D, *s = sin_ + t * D;                                                             \
        for (int64_t j = 0; j < H; j++) {                                                                          \
            T_ *v = x + t * ts + j * D;                                                                            \
            _Pragma("omp simd")                                                                                    \
            for (int64_t i = 0; i < half; i++) {                                                                   \
                float x1 = LOAD(v[i]), x2 = LOAD(v[i + half]);                                                     \
                v[i] = STORE(ROUND(x1 * LOAD(c[i])) + ROUND(x2 * LOAD(s[i])));                                     \
                v[i + half] = STORE(ROUND(x2 * LOAD(c[i + half])) + ROUND(x1 * LOAD(s[i + half])));                \
            }                                                                                                      \
        }                                                                                                          \
    }                                                                                                              \
}

DEFINE_ROPE(rope_f32, float, id_f32, id_f32, id_f32)
DEFINE_ROPE(rope_bf16, uint16_t, bf16_to_f32, f32_to_bf16, round_bf16)

/* ---- SwiGLU's silu(gate) * up ---------------------------------------------------------------------------------- */

/* x: T rows of stride xs holding gate (I values) then up (I values); y [T, I] contiguous. exp(-g) by the vectorised
 * exp of cpu_common.h (via a scratch row), the quotient and the products rounded where the reference rounds. */
#define DEFINE_SILU_MUL(NAME, T_, LOAD, STORE, ROUND)                                                             \
void NAME(const T_ *x, int64_t xs, T_ *y, int64_t T, int64_t I, int n_threads) {                                  \
    _Pragma("omp parallel num_threads(n_threads) if(T * I >= 65536)")                                             \
    {                                                                                                             \
        float *e = (float *)malloc(sizeof(float) * (size_t)I);                                                    \
        _Pragma("omp for schedule(static)")                                                                       \
        for (int64_t t = 0; t < T; t++) {                                                                         \
            const T_ *g = x + t * xs, *u = g + I;                                                                 \
            for (int64_t i = 0; i < I; i++) e[i] = -LOAD(g[i]);                                                   \
            exp_shifted_sum(e, I, 0.0f);                                                                          \
            T_ *yt = y + t * I;                                                                                   \
            _Pragma("omp simd")                                                                                   \
            for (int64_t i = 0; i < I; i++) yt[i] = STORE(ROUND(LOAD(g[i]) / (1.0f + e[i])) * LOAD(u[i]));        \
        }                                                                                                         \
        free(e);                                                                                                  \
    }                                                                                                             \
}

DEFINE_SILU_MUL(silu_mul_f32, float, id_f32, id_f32, id_f32)
DEFINE_SILU_MUL(silu_mul_bf16, uint16_t, bf16_to_f32, f32_to_bf16, round_bf16)
