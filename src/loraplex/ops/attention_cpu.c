/* Decode attention over the paged KV cache on the CPU, and the cache write, each one call where eager torch runs an
 * index_copy_ per cache and a gather per cache before its SDPA. Built at first use by ops/attention_cpu.py
 * (ops/cpu_ext.py); ops/attention_cpu.py holds the torch reference.
 *
 * Semantics (fp32 scores, softmax and accumulation; the output rounded once to the tensors' dtype):
 *   kv_write:          k_cache[slot_mapping[t]] = k[t]; v_cache[slot_mapping[t]] = v[t]
 *   decode_attention:  out[t, h] = sum_{j < lens[t]} softmax_j(scale * q[t, h] . K[j]) * V[j]
 *                      with K[j], V[j] = k_cache / v_cache[slots[t, j], h / (H / Hkv)]
 */
#include <stdlib.h>

#include "cpu_common.h"

/* k, v: T rows of row_bytes bytes (row strides in bytes); caches: rows of row_bytes bytes, indexed by slot. */
void kv_write(const char *k, int64_t k_stride, const char *v, int64_t v_stride, const int64_t *slot_mapping,
              int64_t T, char *k_cache, char *v_cache, int64_t row_bytes) {
    for (int64_t t = 0; t < T; t++) {
        memcpy(k_cache + slot_mapping[t] * row_bytes, k + t * k_stride, (size_t)row_bytes);
        memcpy(v_cache + slot_mapping[t] * row_bytes, v + t * v_stride, (size_t)row_bytes);
    }
}

/* q: [nd, H, D], token stride qs, heads contiguous; caches [slots, Hkv, D] contiguous; slots [nd, L] (row t valid
 * up to lens[t]); out [nd, H, D] contiguous. One work item per (token, query head); the K and V rows its kv head
 * shares with the other query heads come from cache. */
#define DEFINE_DECODE_ATTENTION(NAME, T_, DOT, LOAD, STORE)                                                         \
void NAME(const T_ *q, int64_t qs, const T_ *k_cache, const T_ *v_cache, const int64_t *slots, const int64_t *lens,\
          int64_t L, int64_t nd, int64_t H, int64_t Hkv, int64_t D, float scale, T_ *out, int n_threads) {          \
    int64_t G = H / Hkv;                                                                                            \
    _Pragma("omp parallel num_threads(n_threads)")                                                                  \
    {                                                                                                               \
        float *p = (float *)malloc(sizeof(float) * (size_t)(L + D));                                                \
        float *acc = p + L;                                                                                         \
        _Pragma("omp for schedule(dynamic, 1) collapse(2)")                                                         \
        for (int64_t t = 0; t < nd; t++)                                                                            \
            for (int64_t h = 0; h < H; h++) {                                                                       \
                int64_t n = lens[t], g = h / G;                                                                     \
                const int64_t *st = slots + t * L;                                                                  \
                const T_ *qh = q + t * qs + h * D;                                                                  \
                float m = -INFINITY;                                                                                \
                for (int64_t j = 0; j < n; j++) {                                                                   \
                    float s = scale * DOT(qh, k_cache + (st[j] * Hkv + g) * D, D);                                  \
                    p[j] = s;                                                                                       \
                    m = s > m ? s : m;                                                                              \
                }                                                                                                   \
                float inv = 1.0f / exp_shifted_sum(p, n, m);                                                        \
                for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;                                                      \
                for (int64_t j = 0; j < n; j++) {                                                                   \
                    const T_ *vj = v_cache + (st[j] * Hkv + g) * D;                                                 \
                    float w = p[j];                                                                                 \
                    _Pragma("omp simd")                                                                             \
                    for (int64_t d = 0; d < D; d++) acc[d] += w * LOAD(vj[d]);                                      \
                }                                                                                                   \
                T_ *o = out + (t * H + h) * D;                                                                      \
                for (int64_t d = 0; d < D; d++) o[d] = STORE(acc[d] * inv);                                         \
            }                                                                                                       \
        free(p);                                                                                                    \
    }                                                                                                               \
}

DEFINE_DECODE_ATTENTION(decode_attention_f32, float, dot_f32, id_f32, id_f32)
DEFINE_DECODE_ATTENTION(decode_attention_bf16, uint16_t, dot_bf16, bf16_to_f32, f32_to_bf16)
