/* Decode attention over the paged KV cache on the CPU, and the cache write, each one call where eager torch runs an
 * index_copy_ per cache and a gather per cache before its SDPA. Built at first use by ops/attention_cpu.py
 * (ops/cpu_ext.py); ops/attention_cpu.py holds the torch reference.
 *
 * Semantics (fp32 scores, softmax and accumulation; the output rounded once to the tensors' dtype):
 *   kv_write:          k_cache[slot_mapping[t]] = k[t]; v_cache[slot_mapping[t]] = v[t]
 *   decode_attention:  out[t, h] = sum_{j < lens[t]} softmax_j(scale * q[t, h] . K[j]) * V[j]
 *                      with K[j], V[j] = k_cache / v_cache[slots[t, j], h / (H / Hkv)]
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

static inline float id_f32(float v) { return v; }

/* k, v: T rows of row_bytes bytes (row strides in bytes); caches: rows of row_bytes bytes, indexed by slot. */
void kv_write(const char *k, int64_t k_stride, const char *v, int64_t v_stride, const int64_t *slot_mapping,
              int64_t T, char *k_cache, char *v_cache, int64_t row_bytes) {
    for (int64_t t = 0; t < T; t++) {
        memcpy(k_cache + slot_mapping[t] * row_bytes, k + t * k_stride, (size_t)row_bytes);
        memcpy(v_cache + slot_mapping[t] * row_bytes, v + t * v_stride, (size_t)row_bytes);
    }
}

/* q: [nd, H, D], token stride qs, heads contiguous; caches [slots, Hkv, D] contiguous; slots [nd, L] (row t valid
 * up to lens[t]); out [nd, H, D] contiguous. One work item per (token, kv head): its H / Hkv query heads read each
 * cached K and V row once. */
#define DEFINE_DECODE_ATTENTION(NAME, T_, LOAD, STORE)                                                              \
void NAME(const T_ *q, int64_t qs, const T_ *k_cache, const T_ *v_cache, const int64_t *slots, const int64_t *lens,\
          int64_t L, int64_t nd, int64_t H, int64_t Hkv, int64_t D, float scale, T_ *out, int n_threads) {          \
    int64_t G = H / Hkv;                                                                                            \
    _Pragma("omp parallel num_threads(n_threads)")                                                                  \
    {                                                                                                               \
        float *qf = (float *)malloc(sizeof(float) * (size_t)(2 * G * D + G * L));                                   \
        float *acc = qf + G * D, *p = acc + G * D;                                                                  \
        _Pragma("omp for schedule(static) collapse(2)")                                                             \
        for (int64_t t = 0; t < nd; t++)                                                                            \
            for (int64_t g = 0; g < Hkv; g++) {                                                                     \
                int64_t n = lens[t];                                                                                \
                const int64_t *st = slots + t * L;                                                                  \
                for (int64_t h = 0; h < G; h++)                                                                     \
                    for (int64_t d = 0; d < D; d++) qf[h * D + d] = LOAD(q[t * qs + (g * G + h) * D + d]) * scale;  \
                for (int64_t j = 0; j < n; j++) {                                                                   \
                    const T_ *kj = k_cache + (st[j] * Hkv + g) * D;                                                 \
                    for (int64_t h = 0; h < G; h++) {                                                               \
                        const float *qh = qf + h * D;                                                               \
                        float s = 0.0f;                                                                             \
                        _Pragma("omp simd reduction(+:s)")                                                          \
                        for (int64_t d = 0; d < D; d++) s += qh[d] * LOAD(kj[d]);                                   \
                        p[h * L + j] = s;                                                                           \
                    }                                                                                               \
                }                                                                                                   \
                for (int64_t h = 0; h < G; h++) {                                                                   \
                    float *ph = p + h * L, m = -INFINITY, sum = 0.0f;                                               \
                    for (int64_t j = 0; j < n; j++) m = ph[j] > m ? ph[j] : m;                                      \
                    for (int64_t j = 0; j < n; j++) sum += (ph[j] = expf(ph[j] - m));                               \
                    for (int64_t j = 0; j < n; j++) ph[j] /= sum;                                                   \
                    for (int64_t d = 0; d < D; d++) acc[h * D + d] = 0.0f;                                          \
                }                                                                                                   \
                for (int64_t j = 0; j < n; j++) {                                                                   \
                    const T_ *vj = v_cache + (st[j] * Hkv + g) * D;                                                 \
                    for (int64_t h = 0; h < G; h++) {                                                               \
                        float w = p[h * L + j], *ah = acc + h * D;                                                  \
                        _Pragma("omp simd")                                                                         \
                        for (int64_t d = 0; d < D; d++) ah[d] += w * LOAD(vj[d]);                                   \
                    }                                                                                               \
                }                                                                                                   \
                for (int64_t h = 0; h < G; h++)                                                                     \
                    for (int64_t d = 0; d < D; d++) out[(t * H + g * G + h) * D + d] = STORE(acc[h * D + d]);       \
            }                                                                                                       \
        free(qf);                                                                                                   \
    }                                                                                                               \
}

static inline float store_f32(float v) { return v; }
DEFINE_DECODE_ATTENTION(decode_attention_f32, float, id_f32, store_f32)
DEFINE_DECODE_ATTENTION(decode_attention_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
