/* BGMV on the CPU reading the LoRA slot buffers in place (no per-token copies of A and B), each token at its
 * adapter's true rank. Built at first use by ops/lora_cpu.py (ops/cpu_ext.py); the torch form in
 * ops/lora_torch.py (bgmv_shrink / bgmv_expand) is its reference.
 *
 * Semantics, for every token t and pair k with s = slots[t, k], w = weights[t, k] (1 when weights is NULL),
 * r = ranks[s] (0 = skip) and every stacked slice i:
 *     y[t, start_i + o] += w * sum_j Bt_i[s, j, o] * (sum_c A[s, i*R + j, c] * x[t, c])      (j < r)
 * Layouts: x [T, n_in] (row stride x_stride), A [S, n*R, n_in], and B_i transposed, Bt_i [S, R, size_i] (so the
 * expand streams rows of outputs), all contiguous; y rows of stride y_stride. Accumulation in fp32; bf16 tensors are
 * converted on the fly and y is rounded once per pair. The shrink is cpu_common.h's dot (bf16: vdpbf16ps on x as
 * stored where the CPU has AVX512-BF16, 1.3-1.5x faster than widening each weight for one adapter over 32 tokens).
 * The expand (AVX-512) holds blocks of 64 outputs in registers over the rank (bf16 rows widened by interleaving with
 * zeros, one instruction per 16 values), the same products and sums in the same order as the plain loop (which
 * takes the rest), instead of a pass over a scratch row per rank. A rows two ahead and the next block's B rows are
 * fetched early. One token runs on one thread (no parallel region).
 */
#include <stdlib.h>

#include "cpu_common.h"

/* The expand's outputs in blocks of 64 held in registers over the rank (acc[o] = sum_j row_j[o] * h[j] in j order,
 * a product then a sum, as the plain loop below rounds them): returns how many outputs it wrote into acc. */
#define EXPAND_BLOCK 64
#if defined(__AVX512F__)
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#define DEFINE_EXPAND_BLOCKS(NAME, T_, LOAD16)                                                                 \
static inline int64_t NAME(const T_ *bt, int64_t size, const float *h, int64_t r, float *acc) {               \
    int64_t o = 0;                                                                                             \
    for (; o + EXPAND_BLOCK <= size; o += EXPAND_BLOCK) {                                                      \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                            \
        for (int64_t j = 0; j < r; j++) {                                                                      \
            const T_ *row = bt + j * size + o;                                                                 \
            _mm_prefetch((const char *)(row + EXPAND_BLOCK), _MM_HINT_T0);   /* the next block's rows */       \
            _mm_prefetch((const char *)(row + EXPAND_BLOCK) + 64, _MM_HINT_T0);                                \
            __m512 hj = _mm512_set1_ps(h[j]);                                                                  \
            a0 = _mm512_add_ps(a0, _mm512_mul_ps(LOAD16(row), hj));                                            \
            a1 = _mm512_add_ps(a1, _mm512_mul_ps(LOAD16(row + 16), hj));                                       \
            a2 = _mm512_add_ps(a2, _mm512_mul_ps(LOAD16(row + 32), hj));                                       \
            a3 = _mm512_add_ps(a3, _mm512_mul_ps(LOAD16(row + 48), hj));                                       \
        }                                                                                                      \
        _mm512_storeu_ps(acc + o, a0);                                                                         \
        _mm512_storeu_ps(acc + o + 16, a1);                                                                    \
        _mm512_storeu_ps(acc + o + 32, a2);                                                                    \
        _mm512_storeu_ps(acc + o + 48, a3);                                                                    \
    }                                                                                                          \
    return o;                                                                                                  \
}
DEFINE_EXPAND_BLOCKS(expand_blocks_f32, float, load16_f32)
#if defined(__AVX512BW__)
/* bf16 rows widened two vectors per 32 values by interleaving with zeros (unpacklo / unpackhi: each 128-bit lane's
 * values 0-3 and 4-7), one instruction per 16 instead of two; the sums return to output order once per block. */
static inline int64_t expand_blocks_bf16(const uint16_t *bt, int64_t size, const float *h, int64_t r, float *acc) {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i hi = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    int64_t o = 0;
    for (; o + EXPAND_BLOCK <= size; o += EXPAND_BLOCK) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t j = 0; j < r; j++) {
            const uint16_t *row = bt + j * size + o;
            _mm_prefetch((const char *)(row + EXPAND_BLOCK), _MM_HINT_T0);   /* the next block's rows */
            _mm_prefetch((const char *)(row + EXPAND_BLOCK) + 64, _MM_HINT_T0);
            __m512 hj = _mm512_set1_ps(h[j]);
            __m512i v0 = _mm512_loadu_si512(row), v1 = _mm512_loadu_si512(row + 32);
            a0 = _mm512_add_ps(a0, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v0)), hj));
            a1 = _mm512_add_ps(a1, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v0)), hj));
            a2 = _mm512_add_ps(a2, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v1)), hj));
            a3 = _mm512_add_ps(a3, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v1)), hj));
        }
        _mm512_storeu_ps(acc + o, _mm512_permutex2var_ps(a0, lo, a1));
        _mm512_storeu_ps(acc + o + 16, _mm512_permutex2var_ps(a0, hi, a1));
        _mm512_storeu_ps(acc + o + 32, _mm512_permutex2var_ps(a2, lo, a3));
        _mm512_storeu_ps(acc + o + 48, _mm512_permutex2var_ps(a2, hi, a3));
    }
    return o;
}
#else
DEFINE_EXPAND_BLOCKS(expand_blocks_bf16, uint16_t, load16_bf16)
#endif
#else
#define expand_blocks_f32(bt, size, h, r, acc) 0
#define expand_blocks_bf16(bt, size, h, r, acc) 0
#endif

#define DEFINE_BGMV(NAME, T_, LOAD, STORE, DOT, EXPAND_BLOCKS)                                                                \
void NAME(const T_ *x, int64_t x_stride, const T_ *a, const T_ *const *bts, T_ *y, int64_t y_stride,                   \
          const int64_t *starts, const int64_t *sizes, int64_t n_slices, const int64_t *slots,                         \
          const float *weights, int64_t n_tokens, int64_t k_pairs, const int32_t *ranks, int64_t n_in, int64_t R,      \
          int64_t max_size, int n_threads) {                                                                           \
    _Pragma("omp parallel num_threads(n_threads) if(n_tokens > 1)")                                                    \
    {                                                                                                                  \
        float *h = (float *)malloc(sizeof(float) * (size_t)(n_slices * R + max_size)), *acc = h + n_slices * R;      \
        _Pragma("omp for schedule(dynamic, 1)")                                                                        \
        for (int64_t t = 0; t < n_tokens; t++) {                                                                       \
            const T_ *xt = x + t * x_stride;                                                                           \
            T_ *yt = y + t * y_stride;                                                                                 \
            for (int64_t k = 0; k < k_pairs; k++) {                                                                    \
                int64_t s = slots[t * k_pairs + k];                                                                    \
                float w = weights ? weights[t * k_pairs + k] : 1.0f;                                                   \
                int64_t r = ranks[s] < R ? ranks[s] : R;                                                               \
                if (r <= 0 || w == 0.0f) continue;                                                                     \
                const T_ *as = a + s * n_slices * R * n_in;                                                            \
                for (int64_t i = 0; i < n_slices; i++)                                                                 \
                    for (int64_t j = 0; j < r; j++) {                                                                  \
                        const T_ *row = as + (i * R + j) * n_in;                                                       \
                        for (int64_t c = 0; c < n_in * (int64_t)sizeof(T_); c += 64)   /* two rows ahead */            \
                            __builtin_prefetch((const char *)(row + 2 * n_in) + c);                                    \
                        h[i * R + j] = DOT(row, xt, n_in) * w;                                                         \
                    }                                                                                                  \
                for (int64_t i = 0; i < n_slices; i++) {                                                               \
                    const T_ *bt = bts[i] + s * R * sizes[i];                                                          \
                    const float *hi = h + i * R;                                                                       \
                    T_ *yo = yt + starts[i];                                                                           \
                    int64_t o = EXPAND_BLOCKS(bt, sizes[i], hi, r, acc);                                               \
                    for (int64_t o1 = o; o1 < sizes[i]; o1++) acc[o1] = 0.0f;                                          \
                    for (int64_t j = 0; j < r; j++) {                                                                  \
                        const T_ *row = bt + j * sizes[i];                                                             \
                        float hj = hi[j];                                                                              \
                        _Pragma("omp simd")                                                                            \
                        for (int64_t o1 = o; o1 < sizes[i]; o1++) acc[o1] += LOAD(row[o1]) * hj;                       \
                    }                                                                                                  \
                    for (int64_t o1 = 0; o1 < sizes[i]; o1++) yo[o1] = STORE(LOAD(yo[o1]) + acc[o1]);                  \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
        free(h);                                                                                                       \
    }                                                                                                                  \
}

DEFINE_BGMV(bgmv_f32, float, id_f32, id_f32, dot_f32, expand_blocks_f32)
DEFINE_BGMV(bgmv_bf16, uint16_t, bf16_to_f32, f32_to_bf16, dot_bf16, expand_blocks_bf16)
