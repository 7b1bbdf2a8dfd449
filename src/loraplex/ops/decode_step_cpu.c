/* A whole decode step of the decoder stack in one call: for T <= GEMV_MAX_ROWS decode tokens, every layer's
 * add + RMSNorm, q|k|v GEMV (dense, int8 or int4 weights, each projection its own), q/k norms, RoPE, KV write, decode attention, o GEMV, add + RMSNorm, gate|up GEMV,
 * silu * up, down GEMV, then the final add + RMSNorm -- the same kernels, in the same order, as the op-by-op path
 * (models/transformer.py through ops), so its bits are that path's; no Python between them. LoRA rows in the
 * BGMV form (one adapter, or a weighted mixture, per token; lora_cpu.c) add after each projection, as LoRAStack
 * does. Built at first use by ops/decode_step_cpu.py (ops/cpu_ext.py, -ffp-contract=off like the sources it
 * includes, so that their kernels round here as they do alone).
 */
#include "dense_cpu.c"
#include "attention_cpu.c"
#include "lora_cpu.c"

/* One projection's LoRA slot buffers as the BGMV kernel of lora_cpu.c reads them (a NULL: no LoRA stack). */
typedef struct {
    const void *a;
    const void *const *bts;
    const int64_t *starts, *sizes;
    const int32_t *ranks;
    int64_t n_slices, n_in, R, max_size;
} lora_proj;

/* One projection's base weight: kind PROJ_DENSE (w of the compute dtype), PROJ_INT8 (w int8, q fp32 row scales) or
 * PROJ_INT4 (w nibble panels, q scale/offset pairs per group of `group`, fp16 when q_half else fp32); b its bias or
 * NULL; bit T - 1 of tiled_steps: an int8 GEMV of T tokens takes the tiled form. */
enum { PROJ_DENSE = 0, PROJ_INT8 = 1, PROJ_INT4 = 2 };
typedef struct {
    const void *w, *b, *q;
    int64_t kind, group, q_half;
    uint64_t tiled_steps;
} dense_proj;

/* One layer's tensors (NULL: absent q/k norm), its four projections (q|k|v, o, gate|up, down) and their LoRA. */
typedef struct {
    const void *ln1, *ln2, *q_norm, *k_norm;
    void *k_cache, *v_cache;
    dense_proj proj[4];
    lora_proj lora[4];
} decode_layer;

/* y [T, N] (row stride ys) = x [T, K] (row stride xs) through projection p's base weight. */
#define DEFINE_PROJECT(SFX, T_)                                                                                    \
static void project_##SFX(const dense_proj *p, const T_ *x, int64_t xs, int64_t T, T_ *y, int64_t ys, int64_t N, \
                          int64_t K, int n_threads) {                                                            \
    int64_t tiled = (int64_t)((p->tiled_steps >> (T - 1)) & 1);                                                  \
    if (p->kind == PROJ_INT8)                                                                                    \
        gemv_int8_##SFX(x, xs, T, (const int8_t *)p->w, (const float *)p->q, (const T_ *)p->b, y, ys, N, K,     \
                        tiled, n_threads);                                                                       \
    else if (p->kind == PROJ_INT4)                                                                               \
        gemv_int4_##SFX(x, xs, T, (const uint8_t *)p->w, p->q, p->q_half, p->group, (const T_ *)p->b, y, ys, \
                        N, K, n_threads);                                                                        \
    else                                                                                                         \
        gemv_##SFX(x, xs, T, (const T_ *)p->w, (const T_ *)p->b, y, ys, N, K, n_threads);                        \
}
DEFINE_PROJECT(f32, float)
DEFINE_PROJECT(bf16, uint16_t)

/* y [T, N] (row stride ys) += the step's LoRA of x [T, n_in] (row stride xs) through projection p's slots. */
#define LORA(SFX, T_, P, X, XS, Y, YS)                                                                                 \
    if (slots && (P)->a)                                                                                          \
        bgmv_##SFX((X), (XS), (const T_ *)(P)->a, (const T_ *const *)(P)->bts, (Y), (YS), (P)->starts,           \
                   (P)->sizes, (P)->n_slices, slots, lora_weights, T, k_pairs, (P)->ranks, (P)->n_in, (P)->R,     \
                   (P)->max_size, n_threads)

/* h [T, D]: the embeddings (read only); out [T, D]: the final norm of the last residual stream; cos, sin [T, hd]
 * (sin signed); slots [T, L] each token's context slots, valid up to lens[t]; lora_slots [T, k_pairs] each token's
 * adapter slots (NULL: no LoRA this step) with lora_weights [T, k_pairs] (NULL: all ones). */
#define DEFINE_DECODE_LAYERS(NAME, T_, SFX)                                                                        \
void NAME(const decode_layer *layers, int64_t n_layers, const T_ *h, const T_ *final_norm, T_ *out, int64_t T,   \
          int64_t D, int64_t H, int64_t Hkv, int64_t hd, int64_t I, float eps, float scale, const T_ *cos_,      \
          const T_ *sin_, const int64_t *slot_mapping, const int64_t *ctx_slots, const int64_t *lens, int64_t L,\
          const int64_t *slots, const float *lora_weights, int64_t k_pairs, int n_threads) {                     \
    int64_t nq = H * hd, nqkv = (H + 2 * Hkv) * hd;                                                               \
    T_ *buf = (T_ *)malloc(sizeof(T_) * (size_t)(T * (4 * D + nqkv + nq + 3 * I + H * hd)));                     \
    T_ *r0 = buf, *r1 = r0 + T * D, *x = r1 + T * D, *dl = x + T * D, *qkv = dl + T * D, *att = qkv + T * nqkv;   \
    T_ *gu = att + T * nq, *act = gu + T * 2 * I, *tmp = act + T * I;                                             \
    const T_ *res = h, *d = NULL;                                                                                 \
    T_ *spare = r0;                                                                                               \
    for (int64_t l = 0; l < n_layers; l++) {                                                                      \
        const decode_layer *ly = layers + l;                                                                      \
        add_rms_norm_##SFX(res, D, d, D, ly->ln1, spare, x, T, D, eps, n_threads);                               \
        if (d) { res = spare; spare = spare == r0 ? r1 : r0; }                                                    \
        project_##SFX(&ly->proj[0], x, D, T, qkv, nqkv, nqkv, D, n_threads);                                \
        LORA(SFX, T_, &ly->lora[0], x, D, qkv, nqkv);                                                                  \
        if (ly->q_norm)                                                                                           \
            for (int64_t t = 0; t < T; t++) {                                                                     \
                T_ *row = qkv + t * nqkv;                                                                         \
                add_rms_norm_##SFX(row, hd, NULL, 0, ly->q_norm, NULL, tmp, H, hd, eps, n_threads);              \
                memcpy(row, tmp, sizeof(T_) * (size_t)nq);                                                        \
                add_rms_norm_##SFX(row + nq, hd, NULL, 0, ly->k_norm, NULL, tmp, Hkv, hd, eps, n_threads);       \
                memcpy(row + nq, tmp, sizeof(T_) * (size_t)(Hkv * hd));                                           \
            }                                                                                                     \
        rope_##SFX(qkv, nqkv, T, H + Hkv, hd, cos_, sin_, n_threads);                                             \
        kv_write((const char *)(qkv + nq), nqkv * (int64_t)sizeof(T_), (const char *)(qkv + nq + Hkv * hd),      \
                 nqkv * (int64_t)sizeof(T_), slot_mapping, T, (char *)ly->k_cache, (char *)ly->v_cache,          \
                 Hkv * hd * (int64_t)sizeof(T_));                                                                 \
        decode_attention_##SFX(qkv, nqkv, ly->k_cache, ly->v_cache, ctx_slots, lens, L, T, H, Hkv, hd, scale,   \
                               att, n_threads);                                                                   \
        project_##SFX(&ly->proj[1], att, nq, T, dl, D, D, nq, n_threads);                                        \
        LORA(SFX, T_, &ly->lora[1], att, nq, dl, D);                                                                   \
        add_rms_norm_##SFX(res, D, dl, D, ly->ln2, spare, x, T, D, eps, n_threads);                              \
        res = spare;                                                                                              \
        spare = spare == r0 ? r1 : r0;                                                                            \
        project_##SFX(&ly->proj[2], x, D, T, gu, 2 * I, 2 * I, D, n_threads);                                  \
        LORA(SFX, T_, &ly->lora[2], x, D, gu, 2 * I);                                                                  \
        silu_mul_##SFX(gu, 2 * I, act, T, I, n_threads);                                                          \
        project_##SFX(&ly->proj[3], act, I, T, dl, D, D, I, n_threads);                                    \
        LORA(SFX, T_, &ly->lora[3], act, I, dl, D);                                                                    \
        d = dl;                                                                                                   \
    }                                                                                                             \
    add_rms_norm_##SFX(res, D, d, D, final_norm, spare, out, T, D, eps, n_threads);                              \
    free(buf);                                                                                                    \
}

DEFINE_DECODE_LAYERS(decode_layers_f32, float, f32)
DEFINE_DECODE_LAYERS(decode_layers_bf16, uint16_t, bf16)
