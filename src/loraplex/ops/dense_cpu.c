/* The small-step dense ops of a decoder on the CPU, one call each where eager torch runs several: a GEMV that
 * streams the weight once for up to GEMV_MAX_ROWS tokens, the residual add fused with RMSNorm, and RoPE in place.
 * Built at first use by ops/dense_cpu.py (ops/cpu_ext.py, with -ffp-contract=off: no fused multiply-adds
 * where the reference rounds between a product and a sum); ops/dense_cpu.py holds each op's torch reference.
 *
 * Semantics (fp32 accumulation; for bf16 tensors every reference rounding to bf16 is kept, named r() below):
 *   gemv:          y[m, n] = r(sum_k W[n, k] * x[m, k] + b[n])                      (m < M, the dot in any order)
 *   gemv_int8:     y[m, n] = r(s[n] * sum_k Wq[n, k] * x[m, k] + b[n])      (Wq int8, s fp32: weight-only int8)
 *   add_rms_norm:  h' = r(h + d) (h' = h when d is NULL);  y = r(w * r(h' * rsqrt(mean(h'^2) + eps)))
 *   rope:          x[t, j, i] = r(r(x[t,j,i] * cos[t,i]) + r(x[t,j,(i+D/2)%D] * sin[t,i]))   (in place, sin signed)
 *   silu_mul:      y[t, i] = r(r(g / (1 + exp(-g))) * u)  with g = x[t, i], u = x[t, I + i]
 */
#include <stdlib.h>

#include "cpu_common.h"

/* ---- GEMV ---------------------------------------------------------------------------------------------------- */

/* x [M, K] rows of stride xs; W [N, K] contiguous; b [N] or NULL; y [M, N] rows of stride ys. Each weight row is
 * read from memory once and reused from L1 for the M tokens; OpenMP over output rows. */
#define DEFINE_GEMV(NAME, T_, DOT, LOAD, STORE)                                                                     \
void NAME(const T_ *x, int64_t xs, int64_t M, const T_ *W, const T_ *b, T_ *y, int64_t ys, int64_t N, int64_t K,  \
          int n_threads) {                                                                                         \
    _Pragma("omp parallel for num_threads(n_threads) schedule(guided)")                                             \
    for (int64_t n = 0; n < N; n++) {                                                                              \
        const T_ *w = W + n * K;                                                                                   \
        float bias = b ? LOAD(b[n]) : 0.0f;                                                                        \
        for (int64_t m = 0; m < M; m++) y[m * ys + n] = STORE(DOT(w, x + m * xs, K) + bias);                       \
    }                                                                                                              \
}

DEFINE_GEMV(gemv_f32, float, dot_f32, id_f32, id_f32)
DEFINE_GEMV(gemv_bf16, uint16_t, dot_bf16, bf16_to_f32, f32_to_bf16)

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
void NAME(const T_ *x, int64_t xs, int64_t M, const int8_t *W, const float *s, const T_ *b, T_ *y, int64_t ys,   \
          int64_t N, int64_t K, int n_threads) {                                                                   \
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
DEFINE_GEMV_INT8(gemv_int8_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

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
