/* The small-step dense ops of a decoder on the CPU, one call each where eager torch runs several: a GEMV that
 * streams the weight once for up to GEMV_MAX_ROWS tokens, the residual add fused with RMSNorm, and RoPE in place.
 * Built at first use by ops/dense_cpu.py (ops/cpu_ext.py, with -ffp-contract=off: no fused multiply-adds
 * where the reference rounds between a product and a sum); ops/dense_cpu.py holds each op's torch reference.
 *
 * Semantics (fp32 accumulation; for bf16 tensors every reference rounding to bf16 is kept, named r() below):
 *   gemv:          y[m, n] = r(sum_k W[n, k] * x[m, k] + b[n])                      (m < M, the dot in any order)
 *   gemv_int8:     y[m, n] = r(s[n] * sum_k Wq[n, k] * x[m, k] + b[n])      (Wq int8, s fp32: weight-only int8)
 *   gemv_int4:     y[m, n] = r(sum_k (q[n, k] * sc[n, k / g] + off[n, k / g]) * x[m, k] + b[n])
 *                  (q in 0..15 in 16-row panels, see INT4 PANEL LAYOUT; sc, off fp32 pairs; the dot in any order)
 *   dequant_int4:  W[n, k] = r(q[n, k] * sc[n, k / g] + off[n, k / g])                 (rows n0..n1 of the weight)
 *   dequant_int8:  W[n, k] = r(Wq[n, k] * s[n])                                         (rows n0..n1 of the weight)
 *   add_rms_norm:  h' = r(h + d) (h' = h when d is NULL);  y = r(w * r(h' * rsqrt(mean(h'^2) + eps)))
 *   rope:          x[t, j, i] = r(r(x[t,j,i] * cos[t,i]) + r(x[t,j,(i+D/2)%D] * sin[t,i]))   (in place, sin signed)
 *   silu_mul:      y[t, i] = r(r(g / (1 + exp(-g))) * u)  with g = x[t, i], u = x[t, I + i]
 */
#include <stdlib.h>

#include "cpu_common.h"

#define GEMV_TOKENS 8 /* tokens per pass of a quantized GEMV's pass form over its weights (more: NAME##_chunks) */
#define INT8_ROWS 8   /* weight rows per scheduling chunk of the int8 GEMV's pass form */
#define INT4_PF 2048  /* the int4 GEMV fetches weight bytes this far ahead (the prefetchers alone leave it short) */

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
 * INT4 PANEL LAYOUT (ops/quant.py pack_int4): the rows in panels of 16 (the last panel holds the R = N % 16 rows
 * left, if any). A panel of R rows starting at row n0 holds, for each octet o of inputs (k = 8 o .. 8 o + 7) in
 * turn, R little-endian 32-bit words, word r for row n0 + r: bits 4 j .. 4 j + 3 hold q[8 o + 2 j] and bits
 * 16 + 4 j .. 16 + 4 j + 3 hold q[8 o + 2 j + 1] (j = 0..3, the word's four "planes"). The panel's bytes are rows
 * n0 .. n0 + R of an [N, K / 2] view. Its (scale, offset) pairs likewise: per group of g inputs (g = 32, 64 or 128;
 * octets never straddle a group) R scales, then R offsets: rows n0 .. n0 + R of an [N, K / g, 2] view, fp32, or fp16
 * (`half`) where every pair is exact in it (GGUF's Q4_0 / Q4_1, our own quantizer): 4 bytes a group, not 8.
 * W = q * scale + offset. Lanes are rows: a panel's dots need no horizontal sums and its scales load as vectors.
 * With AVX512-BF16 and bf16 activations a plane widens to bf16 pairs in one or two instructions: OR-ing the nibbles
 * into the pattern of 128 (0x4300) gives exactly 128 + q, so vdpbf16ps against the broadcast pair (x[8 o + 2 j],
 * x[8 o + 2 j + 1]) sums D = sum (128 + q) x exactly per product for 16 rows at once, and per group
 * sum W x = scale * D + (offset - 128 scale) * S, S = sum x over the group (once per call).
 * Tokens go through a panel INT4_TOKENS at a time (the panel re-read from cache), each token with its own two
 * chains per group (planes 0 + 2, 1 + 3) in one fixed order: a token's bits do not depend on the step's other
 * tokens. Two chains, not four: a single token is bound by memory either way (measured), and 8 tokens' chains still
 * fit the registers, so larger steps widen each weight once per 8 tokens (-11 % at 8 and 32 tokens). */
#define INT4_TOKENS 8  /* tokens per pass over a panel */

/* Per-group sums S [M, G] of x (G = K / g groups of g; rows of stride xs). */
#define DEFINE_GROUP_SUMS(NAME, T_, LOAD)                                                                          \
static void NAME(const T_ *x, int64_t xs, int64_t M, int64_t K, int64_t g, float *S) {                           \
    for (int64_t m = 0; m < M; m++)                                                                                \
        for (int64_t G0 = 0; G0 < K / g; G0++) {                                                                   \
            float s = 0.0f;                                                                                        \
            _Pragma("omp simd reduction(+:s)")                                                                     \
            for (int64_t k = G0 * g; k < (G0 + 1) * g; k++) s += LOAD(x[m * xs + k]);                              \
            S[m * (K / g) + G0] = s;                                                                               \
        }                                                                                                          \
}
DEFINE_GROUP_SUMS(group_sums_f32, float, id_f32)
DEFINE_GROUP_SUMS(group_sums_bf16, uint16_t, bf16_to_f32)

/* q of word w's input j (0..7 within its octet). */
static inline uint32_t int4_nibble(uint32_t w, int j) { return (w >> (4 * (j >> 1) + 16 * (j & 1))) & 15u; }

static inline float f16_to_f32(uint16_t h) { /* IEEE half -> float, exactly */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    if (e == 0) {                                                          /* zero, subnormal: m * 2^-24 */
        float f = (float)m * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    u = sign | (e == 31 ? 0x7f800000u : (e + 112u) << 23) | (m << 13);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Element i of the scale/offset array (fp32, or fp16 when half). */
static inline const void *so_at(const void *so, int half, int64_t i) { return (const char *)so + i * (half ? 2 : 4); }
static inline float so_get(const void *so, int half, int64_t i) {
    return half ? f16_to_f32(((const uint16_t *)so)[i]) : ((const float *)so)[i];
}

/* Portable form, one panel P of R rows (scale/offset pairs so), MT tokens of fp32 x (rows of stride xs), S their
 * group sums [MT, G]: per group and token D = sum q x, then out[m][r] += scale D + offset S. */
static void int4_panel_f32(const uint32_t *P, const void *so, int half, int64_t R, const float *x, int64_t xs,
                           const float *S, int MT, int64_t K, int64_t g, float out[INT4_TOKENS][16]) {
    int64_t G = K / g;
    for (int m = 0; m < MT; m++)
        for (int r = 0; r < 16; r++) out[m][r] = 0.0f;
    for (int64_t G0 = 0; G0 < G; G0++) {
        float sc[16], off[16];
        for (int64_t r = 0; r < R; r++) {
            sc[r] = so_get(so, half, G0 * 2 * R + r);
            off[r] = so_get(so, half, G0 * 2 * R + R + r);
        }
        for (int m = 0; m < MT; m++) {
            float d[16] = {0.0f};
            for (int64_t o = G0 * g / 8; o < (G0 + 1) * g / 8; o++)
                for (int j = 0; j < 8; j++) {
                    float xv = x[m * xs + 8 * o + j];
                    const uint32_t *w = P + o * R;
                    _Pragma("omp simd")
                    for (int64_t r = 0; r < R; r++) d[r] += (float)int4_nibble(w[r], j) * xv;
                }
            for (int64_t r = 0; r < R; r++) out[m][r] += sc[r] * d[r] + off[r] * S[m * G + G0];
        }
    }
}

#ifdef __AVX512BF16__
static inline __m512 so_load(const void *so, int half, int64_t i, __mmask16 lanes) { /* 16 lanes from element i */
    return half ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, (const uint16_t *)so + i))
                : _mm512_maskz_loadu_ps(lanes, (const float *)so + i);
}

/* The AVX512-BF16 form for bf16 x, one panel and MT tokens (a constant at each call site: the 2 MT chains and MT
 * sums stay in registers). */
static inline __attribute__((always_inline)) void int4_panel_bf16_avx(
        const uint32_t *P, const void *so, int half, int64_t R, const uint16_t *x, int64_t xs, const float *S,
        const int MT, int64_t K, int64_t g, float out[INT4_TOKENS][16]) {
    const __m512i nib = _mm512_set1_epi32(0x000f000f), b128 = _mm512_set1_epi32(0x43004300);
    const __mmask16 lanes = R == 16 ? (__mmask16)0xffff : (__mmask16)((1u << R) - 1);
    int64_t G = K / g, O = g / 8;
    __m512 tot[INT4_TOKENS];
    for (int m = 0; m < MT; m++) tot[m] = _mm512_setzero_ps();
    for (int64_t G0 = 0; G0 < G; G0++) {
        __m512 a[INT4_TOKENS][2];
        for (int m = 0; m < MT; m++)
            for (int j = 0; j < 2; j++) a[m][j] = _mm512_setzero_ps();
        for (int64_t o = G0 * O; o < (G0 + 1) * O; o++) {
            const uint32_t *w = P + o * R;
            _mm_prefetch((const char *)w + INT4_PF, _MM_HINT_T0);
            __m512i v = _mm512_maskz_loadu_epi32(lanes, w);
            for (int j = 0; j < 4; j++) {
                __m512i pj = _mm512_ternarylogic_epi32(j ? _mm512_srli_epi32(v, 4 * j) : v, nib, b128, 0xEA);
                for (int m = 0; m < MT; m++) {
                    int32_t pair;
                    memcpy(&pair, x + m * xs + 8 * o + 2 * j, sizeof pair);
                    a[m][j & 1] = _mm512_dpbf16_ps(a[m][j & 1], (__m512bh)pj, (__m512bh)_mm512_set1_epi32(pair));
                }
            }
        }
        __m512 sc = so_load(so, half, G0 * 2 * R, lanes);
        __m512 c = _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), sc, so_load(so, half, G0 * 2 * R + R, lanes));
        for (int m = 0; m < MT; m++) {
            __m512 d = _mm512_add_ps(a[m][0], a[m][1]);
            tot[m] = _mm512_fmadd_ps(c, _mm512_set1_ps(S[m * G + G0]), _mm512_fmadd_ps(d, sc, tot[m]));
        }
    }
    for (int m = 0; m < MT; m++) _mm512_storeu_ps(out[m], tot[m]);
}

static const int int4_bf16_panel_direct = 1;
static void int4_bf16_panel(const uint32_t *P, const void *so, int half, int64_t R, const uint16_t *x,
                            const float *xf, int64_t xs, const float *S, int MT, int64_t K, int64_t g,
                            float out[INT4_TOKENS][16]) {
    (void)xf;
    switch (MT) {                                                              /* constant token counts */
    case 1: int4_panel_bf16_avx(P, so, half, R, x, xs, S, 1, K, g, out); break;
    case 2: int4_panel_bf16_avx(P, so, half, R, x, xs, S, 2, K, g, out); break;
    case 3: int4_panel_bf16_avx(P, so, half, R, x, xs, S, 3, K, g, out); break;
    case 4: int4_panel_bf16_avx(P, so, half, R, x, xs, S, 4, K, g, out); break;
    case 5: int4_panel_bf16_avx(P, so, half, R, x, xs, S, 5, K, g, out); break;
    case 6: int4_panel_bf16_avx(P, so, half, R, x, xs, S, 6, K, g, out); break;
    case 7: int4_panel_bf16_avx(P, so, half, R, x, xs, S, 7, K, g, out); break;
    default: int4_panel_bf16_avx(P, so, half, R, x, xs, S, 8, K, g, out); break;
    }
}
#else
static const int int4_bf16_panel_direct = 0;
static void int4_bf16_panel(const uint32_t *P, const void *so, int half, int64_t R, const uint16_t *x,
                            const float *xf, int64_t xs, const float *S, int MT, int64_t K, int64_t g,
                            float out[INT4_TOKENS][16]) {
    (void)x; (void)xs;
    int4_panel_f32(P, so, half, R, xf, K, S, MT, K, g, out);
}
#endif
static const int int4_f32_panel_direct = 1;
static void int4_f32_panel(const uint32_t *P, const void *so, int half, int64_t R, const float *x, const float *xf,
                           int64_t xs, const float *S, int MT, int64_t K, int64_t g, float out[INT4_TOKENS][16]) {
    (void)xf;
    int4_panel_f32(P, so, half, R, x, xs, S, MT, K, g, out);
}

/* x [M, K] rows of stride xs; W [N, K / 2] and so [N, K / g, 2] (fp16 when half) in panels; b [N] or NULL; y [M, N]
 * of stride ys. OpenMP over panels; PANEL_direct: the panel kernel reads x itself (else xf, x in fp32). */
#define DEFINE_GEMV_INT4(NAME, T_, LOAD, STORE, GROUP_SUMS, PANEL)                                                 \
void NAME(const T_ *x, int64_t xs, int64_t M, const uint8_t *W, const void *so, int64_t half, int64_t g,          \
          const T_ *b, T_ *y, int64_t ys, int64_t N, int64_t K, int n_threads) {                                  \
    int64_t G = K / g;                                                                                           \
    float *S = (float *)malloc(sizeof(float) * (size_t)(M * G));                                                 \
    GROUP_SUMS(x, xs, M, K, g, S);                                                                               \
    float *xf = NULL;                                                                                            \
    if (!PANEL##_direct) {                                                                                       \
        xf = (float *)malloc(sizeof(float) * (size_t)(M * K));                                                   \
        for (int64_t m = 0; m < M; m++)                                                                          \
            for (int64_t k = 0; k < K; k++) xf[m * K + k] = LOAD(x[m * xs + k]);                                 \
    }                                                                                                            \
    _Pragma("omp parallel for num_threads(n_threads) schedule(guided)")                                           \
    for (int64_t n0 = 0; n0 < N; n0 += 16) {                                                                     \
        int64_t R = N - n0 < 16 ? N - n0 : 16;                                                                   \
        const uint32_t *P = (const uint32_t *)(W + n0 * (K / 2));                                                \
        for (int64_t m0 = 0; m0 < M; m0 += INT4_TOKENS) {                                                        \
            int mt = M - m0 < INT4_TOKENS ? (int)(M - m0) : INT4_TOKENS;                                         \
            float out[INT4_TOKENS][16];                                                                          \
            PANEL(P, so_at(so, (int)half, n0 * G * 2), (int)half, R, x + m0 * xs, xf ? xf + m0 * K : NULL, xs,  \
                  S + m0 * G, mt, K, g, out);                                                                    \
            for (int64_t r = 0; r < R; r++) {                                                                    \
                float bias = b ? LOAD(b[n0 + r]) : 0.0f;                                                         \
                for (int m = 0; m < mt; m++) y[(m0 + m) * ys + n0 + r] = STORE(out[m][r] + bias);               \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
    free(xf);                                                                                                    \
    free(S);                                                                                                     \
}
DEFINE_GEMV_INT4(gemv_int4_f32, float, id_f32, id_f32, group_sums_f32, int4_f32_panel)
DEFINE_GEMV_INT4(gemv_int4_bf16, uint16_t, bf16_to_f32, f32_to_bf16, group_sums_bf16, int4_bf16_panel)

/* Rows n0..n1 of the N-row weight in the compute dtype, out [(n1 - n0), K] contiguous, W = r(q * scale + offset)
 * (the large-batch path's GEMM): per row and group a table of the 16 values. */
#define DEFINE_DEQUANT_INT4(NAME, T_, STORE)                                                                      \
void NAME(const uint8_t *W, const void *so, int64_t half, int64_t g, int64_t n0, int64_t n1, int64_t N,         \
          int64_t K, T_ *out, int n_threads) {                                                                   \
    int64_t G = K / g;                                                                                           \
    _Pragma("omp parallel for num_threads(n_threads) schedule(static)")                                           \
    for (int64_t n = n0; n < n1; n++) {                                                                          \
        int64_t p0 = n / 16 * 16, R = N - p0 < 16 ? N - p0 : 16, r = n - p0;                                     \
        const uint32_t *P = (const uint32_t *)(W + p0 * (K / 2));                                                \
        int64_t at = p0 * G * 2;                                                                                 \
        T_ *o = out + (n - n0) * K, lut[16];                                                                     \
        for (int64_t G0 = 0; G0 < G; G0++) {                                                                     \
            float sc = so_get(so, (int)half, at + G0 * 2 * R + r);                                               \
            float off = so_get(so, (int)half, at + G0 * 2 * R + R + r);                                          \
            for (int q = 0; q < 16; q++) lut[q] = STORE((float)q * sc + off);                                    \
            for (int64_t oc = G0 * g / 8; oc < (G0 + 1) * g / 8; oc++) {                                        \
                uint32_t w = P[oc * R + r];                                                                      \
                for (int j = 0; j < 8; j++) o[8 * oc + j] = lut[int4_nibble(w, j)];                              \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
}
DEFINE_DEQUANT_INT4(dequant_int4_f32, float, id_f32)
DEFINE_DEQUANT_INT4(dequant_int4_bf16, uint16_t, f32_to_bf16)

#ifdef __AVX512BF16__
/* ---- int8 GEMV for bf16 x: each int8 weight as two nibbles widened to bf16 -----------------------------------------
 * 64 int8 weights are 32 16-bit lanes; lane j holds weights 2j (low byte) and 2j+1 (high byte). Their four nibbles
 * widen to bf16 as int4's planes do (OR 0x4300: exactly 128 + nibble), the high nibbles with bit 3 flipped (XOR 0x4308: 128 +
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
        _Pragma("omp simd reduction(+:sum)")
        for (int64_t k = 0; k < K64; k++) sum += bf16_to_f32(xm[k]);
        _Pragma("omp simd")
        for (int64_t j = 0; j < half; j++) {                    /* 16 x is exact: a power of two */
            uint16_t e = xm[2 * j], o = xm[2 * j + 1];
            Xm[j] = e;
            Xm[half + j] = f32_to_bf16(16.0f * bf16_to_f32(e));
            Xm[2 * half + j] = o;
            Xm[3 * half + j] = f32_to_bf16(16.0f * bf16_to_f32(o));
        }
        S[m] = sum;
    }
    _Pragma("omp parallel for num_threads(n_threads) schedule(guided)")
    for (int64_t n0 = 0; n0 < N; n0 += INT8_ROWS) {
        int64_t rows = n0 + INT8_ROWS < N ? INT8_ROWS : N - n0;
        float out[INT8_ROWS * GEMV_TOKENS];
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
    (void)row; (void)sc; (void)K; (void)o;
    return 0;
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

/* ---- the int8 GEMV's entry points ------------------------------------------------------------------------------
 * Two forms, the caller's choice (`tiled`; measured per machine, shape and step size by engine/quant_plan.py). The
 * pass form widens in registers as above, one pass over the weights per GEMV_TOKENS tokens (bandwidth-bound small
 * steps). The tiled form (with AVX-512; else the pass form) expands each GEMM_NR weight rows once into a per-thread
 * scratch in the compute dtype -- the exact q, its row scale applied to the fp32 dot -- then runs the dense register
 * tiles over them for every token, so a weight is widened once per step, not once per GEMV_TOKENS tokens. Within a
 * form a token's bits do not depend on the step's other tokens. (int4 needs no tiled form: its panels serve every
 * step size with one dot instruction per 32 products, see INT4 PANEL LAYOUT.) */

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
/* int8 rows expanded as their exact q (scale 1: |q| <= 127 fits bf16's 8-bit significand) */
#define INT8_EXPAND_f32(n, o) int8_row_to_f32(W + (n) * K, 1.0f, K, o)
#define INT8_EXPAND_bf16(n, o) int8_row_to_bf16(W + (n) * K, 1.0f, K, o)
#define INT8_ROW_SCALE(n) s[n]
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

/* The int8 tiled form for one compute dtype (SFX f32 / bf16: its tile, loads and stores). */
#define DEFINE_QUANT_TILED_FORMS(SFX, T_, LOAD, STORE)                                                              \
DEFINE_GEMV_QUANT_TILED(gemv_int8_##SFX##_tiled, T_, int8_t, INT8_Q_PARAMS, gemm_tile_##SFX, INT8_EXPAND_##SFX,   \
                        INT8_ROW_SCALE, LOAD, STORE)
#if defined(__AVX512F__)
DEFINE_QUANT_TILED_FORMS(f32, float, id_f32, id_f32)
#else
#define gemv_int8_f32_tiled gemv_int8_f32_chunks
#endif
#if defined(__AVX512BF16__)
DEFINE_QUANT_TILED_FORMS(bf16, uint16_t, bf16_to_f32, f32_to_bf16)
#else
#define gemv_int8_bf16_tiled gemv_int8_bf16_chunks
#endif
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
