/* What the C kernels of ops/ share: bf16 <-> fp32 as torch rounds, dot products with fp32 accumulation, and a
 * vectorised exp. Sources that include it are rebuilt when it changes (ops/cpu_ext.py hashes the headers too). */
#ifndef LORAPLEX_CPU_COMMON_H
#define LORAPLEX_CPU_COMMON_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40u); /* NaN stays NaN */
    c.u += 0x7fffu + ((c.u >> 16) & 1u);
    return (uint16_t)(c.u >> 16);
}

static inline float id_f32(float v) { return v; } /* fp32's load, store and rounding: nothing to do */
static inline float round_bf16(float v) { return bf16_to_f32(f32_to_bf16(v)); }

static inline float dot_f32(const float *w, const float *x, int64_t K) {
    float s = 0.0f;
    _Pragma("omp simd reduction(+:s)")
    for (int64_t k = 0; k < K; k++) s += w[k] * x[k];
    return s;
}

/* sum_k w[k] * x[k] for bf16 vectors: with AVX512-BF16, 32 exact products per instruction in two fp32 chains. */
static inline float dot_bf16(const uint16_t *w, const uint16_t *x, int64_t K) {
#ifdef __AVX512BF16__
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
    }
    for (; k < K; k += 32) {
        __mmask32 m = K - k >= 32 ? 0xffffffffu : (((__mmask32)1 << (K - k)) - 1);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, w + k),
                              (__m512bh)_mm512_maskz_loadu_epi16(m, x + k));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
    float s = 0.0f;
    _Pragma("omp simd reduction(+:s)")
    for (int64_t k = 0; k < K; k++) s += bf16_to_f32(w[k]) * bf16_to_f32(x[k]);
    return s;
#endif
}

/* p[j] = exp(p[j] - m) for j < n; returns their sum. AVX-512: range reduction by ln 2 and a degree-6 polynomial
 * (relative error ~2e-7, like expf's), else expf. */
static inline float exp_shifted_sum(float *p, int64_t n, float m) {
    int64_t j = 0;
    float sum = 0.0f;
#ifdef __AVX512F__
    const __m512 log2e = _mm512_set1_ps(1.44269504f), ln2_hi = _mm512_set1_ps(0.693359375f),
                 ln2_lo = _mm512_set1_ps(-2.12194440e-4f), lo = _mm512_set1_ps(-87.0f), vm = _mm512_set1_ps(m);
    __m512 acc = _mm512_setzero_ps();
    for (; j < n; j += 16) {
        __mmask16 k = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
        __m512 x = _mm512_max_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + j), vm), lo);
        __m512 e = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 r = _mm512_fnmadd_ps(e, ln2_lo, _mm512_fnmadd_ps(e, ln2_hi, x));
        __m512 q = _mm512_set1_ps(1.0f / 720);
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f / 120));
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f / 24));
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f / 6));
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.5f));
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
        q = _mm512_maskz_mov_ps(k, _mm512_scalef_ps(q, e));
        _mm512_mask_storeu_ps(p + j, k, q);
        acc = _mm512_add_ps(acc, q);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; j < n; j++) sum += (p[j] = expf(p[j] - m));
    return sum;
}
#endif
