/* Kernel bodies written once and compiled per instruction set: each arch/ file includes
 * this header inside functions carrying its target attribute, so the compiler vectorizes
 * the same loops with the widest registers that instruction set has. Only an arch file
 * includes it. */
#ifndef EP_KERNELS_H
#define EP_KERNELS_H

#include "engine.h"

#define ESIZE_int8 1
#define ESIZE_f16 2
#define ESIZE_bf16 2
#define ESIZE_f32 4
#define TYPE_int8 W_INT8
#define TYPE_f16 W_F16
#define TYPE_bf16 W_BF16
#define TYPE_f32 W_F32
/* elements [i, i + n) of a pass's rows, which lie end to end, prefetched EP_PF ahead as one
 * stream (the rows' i-th elements each EP_PF ahead made as many interleaved streams: see
 * int8_q8_rows, avx2.c) */
#define EP_PREFETCH_SPAN(T, W, i, n)                                                     \
    if (EP_PF)                                                                           \
        for (size_t p_ = 0; p_ < (size_t)(n) * ESIZE_##T; p_ += 64)                      \
            __builtin_prefetch((const char *)W + (i) * ESIZE_##T + p_ + EP_PF)

/* Matrix-vector product with SIMD registers of LANES floats: four rows at a time share
 * each load of x; columns past the last whole register are added in scalar code. */
#define EP_SIMD_ROWS(NAME, ATTR, T, VEC, LANES, ZERO, LOADX, LOADW, FMA, HSUM)                 \
    ATTR static void NAME(const void *W, const float *x, int K, int r0, int r1, float *y) {   \
        const int kv = K & ~(LANES - 1);                                                      \
        int r = r0;                                                                           \
        for (; r + 4 <= r1; r += 4) {                                                         \
            const size_t o[4] = {(size_t)r * K, (size_t)(r + 1) * K, (size_t)(r + 2) * K, (size_t)(r + 3) * K}; \
            VEC a0 = ZERO(), a1 = a0, a2 = a0, a3 = a0;                                       \
            for (int k = 0; k < kv; k += LANES) {                                             \
                const VEC xv = LOADX(x + k);                                                  \
                EP_PREFETCH_SPAN(T, W, o[0] + 4 * (size_t)k, 4 * LANES);                        \
                a0 = FMA(LOADW(W, o[0] + k), xv, a0);                                         \
                a1 = FMA(LOADW(W, o[1] + k), xv, a1);                                         \
                a2 = FMA(LOADW(W, o[2] + k), xv, a2);                                         \
                a3 = FMA(LOADW(W, o[3] + k), xv, a3);                                         \
            }                                                                                 \
            float sum[4] = {HSUM(a0), HSUM(a1), HSUM(a2), HSUM(a3)};                          \
            for (int i = 0; i < 4; i++) {                                                     \
                for (int k = kv; k < K; k++) sum[i] += load_value(TYPE_##T, W, o[i] + k) * x[k]; \
                y[r + i] = sum[i];                                                            \
            }                                                                                 \
        }                                                                                     \
        for (; r < r1; r++) {                                                                 \
            const size_t o = (size_t)r * K;                                                   \
            VEC a = ZERO();                                                                   \
            for (int k = 0; k < kv; k += LANES) a = FMA(LOADW(W, o + k), LOADX(x + k), a);    \
            float sum = HSUM(a);                                                              \
            for (int k = kv; k < K; k++) sum += load_value(TYPE_##T, W, o + k) * x[k];        \
            y[r] = sum;                                                                       \
        }                                                                                     \
    }

/* The matrix-vector product for several sequences at once (batch.c): each weight register is
 * loaded and converted once and multiplied into every sequence's accumulator, two rows and up
 * to four sequences a pass (8 accumulators, 2 weights and 1 input of AVX2's 16 registers).
 * Per row and sequence the sum runs as EP_SIMD_ROWS's does (one accumulator over k from zero,
 * the same horizontal sum, the same scalar tail), so every result is bitwise the one-sequence
 * kernel's: greedy decoding gives the same tokens batched or alone. */
#define EP_SIMD_ROWS_BATCH(NAME, ATTR, T, VEC, LANES, ZERO, LOADX, LOADW, FMA, HSUM)              \
    ATTR static inline __attribute__((always_inline)) void NAME##_nb(                               \
        const void *W, const float *const *x, int K, int r0, int r1, float *const *y, const int NB) { \
        const int kv = K & ~(LANES - 1);                                                           \
        int r = r0;                                                                                \
        for (; r + 2 <= r1; r += 2) {                                                              \
            const size_t o0 = (size_t)r * K, o1 = o0 + K;                                          \
            VEC a0[4], a1[4];                                                                      \
            for (int b = 0; b < NB; b++) a0[b] = ZERO(), a1[b] = ZERO();                           \
            for (int k = 0; k < kv; k += LANES) {                                                  \
                EP_PREFETCH_SPAN(T, W, o0 + 2 * (size_t)k, 2 * LANES);                             \
                const VEC w0 = LOADW(W, o0 + k), w1 = LOADW(W, o1 + k);                            \
                for (int b = 0; b < NB; b++) {                                                     \
                    const VEC xv = LOADX(x[b] + k);                                                \
                    a0[b] = FMA(w0, xv, a0[b]);                                                    \
                    a1[b] = FMA(w1, xv, a1[b]);                                                    \
                }                                                                                  \
            }                                                                                      \
            for (int b = 0; b < NB; b++) {                                                         \
                float s0 = HSUM(a0[b]), s1 = HSUM(a1[b]);                                          \
                for (int k = kv; k < K; k++) s0 += load_value(TYPE_##T, W, o0 + k) * x[b][k];      \
                for (int k = kv; k < K; k++) s1 += load_value(TYPE_##T, W, o1 + k) * x[b][k];      \
                y[b][r] = s0, y[b][r + 1] = s1;                                                    \
            }                                                                                      \
        }                                                                                          \
        for (; r < r1; r++) {                                                                      \
            const size_t o = (size_t)r * K;                                                        \
            VEC a[4];                                                                              \
            for (int b = 0; b < NB; b++) a[b] = ZERO();                                            \
            for (int k = 0; k < kv; k += LANES) {                                                  \
                const VEC w = LOADW(W, o + k);                                                     \
                for (int b = 0; b < NB; b++) a[b] = FMA(w, LOADX(x[b] + k), a[b]);                 \
            }                                                                                      \
            for (int b = 0; b < NB; b++) {                                                         \
                float s = HSUM(a[b]);                                                              \
                for (int k = kv; k < K; k++) s += load_value(TYPE_##T, W, o + k) * x[b][k];        \
                y[b][r] = s;                                                                       \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    ATTR static void NAME(const void *W, const float *const *x, int B, int K, int r0, int r1, float *const *y) { \
        for (int b = 0; b < B; b += 4) {                                                           \
            switch (B - b < 4 ? B - b : 4) {                                                       \
            case 4: NAME##_nb(W, x + b, K, r0, r1, y + b, 4); break;                               \
            case 3: NAME##_nb(W, x + b, K, r0, r1, y + b, 3); break;                               \
            case 2: NAME##_nb(W, x + b, K, r0, r1, y + b, 2); break;                               \
            default: NAME##_nb(W, x + b, K, r0, r1, y + b, 1); break;                              \
            }                                                                                      \
        }                                                                                          \
    }

/* int4 (edgepack's CPU format): codes [rows, cols / 2], column 2j in the low nibble of byte j
 * and 2j+1 in the high one; W[r, k] = (q - 8) s + z with (s, z) shared by `group` inputs. So
 * y[r] = sum_g s_g (sum_{k in g} q_k x_k) + (z_g - 8 s_g) xsum_g, on an input prepared once
 * per matrix-vector product (prep_int4, step.c): even and odd inputs apart (they meet the
 * low and high nibbles) and the sum of each group. */
static inline __attribute__((always_inline)) void int4_rows_body(const Mat *m, const float *prep, int r0, int r1,
                                                                  float *y) {
    const int K = m->cols, half = K / 2, G = m->group, ng = K / G, gb = G / 2;
    const float *xe = prep, *xo = prep + half, *xs = prep + K;
    for (int r = r0; r < r1; r++) {
        const uint8_t *c = (const uint8_t *)m->w + (size_t)r * half;
        const uint16_t *sz = m->sz + (size_t)r * ng * 2;
        prefetch_row(c, half);
        prefetch_row(sz, (size_t)ng * 4);
        float acc = 0.f;
        for (int g = 0; g < ng; g++) {
            float t = 0.f;
            const uint8_t *cg = c + (size_t)g * gb;
            const float *e = xe + (size_t)g * gb, *o = xo + (size_t)g * gb;
#pragma omp simd reduction(+ : t)
            for (int j = 0; j < gb; j++) t += (float)(cg[j] & 15) * e[j] + (float)(cg[j] >> 4) * o[j];
            const float s = bf16_to_f32(sz[2 * g]), z = bf16_to_f32(sz[2 * g + 1]);
            acc += s * t + (z - 8.f * s) * xs[g];
        }
        y[r] = acc;
    }
}

/* Attention (engine.h, Attend). Shared by every set: the rows' sums started, and a block's
 * softmax for row r, whose scores s[vlo, vhi) are in the scratch (index: position - b0): capped,
 * the row rescaled where the block's top is higher, then e^(s - top) summed. */
static inline __attribute__((always_inline)) void attend_start(Attend *a, int *from, int *to) {
    *from = a->lo[0], *to = a->hi[0];
    for (int r = 0; r < a->R; r++) {
        *from = a->lo[r] < *from ? a->lo[r] : *from, *to = a->hi[r] > *to ? a->hi[r] : *to;
        a->top[r] = -INFINITY, a->sum[r] = 0.f;
        for (int d = 0; d < a->D; d++) a->o[r][d] = 0.f;
    }
}

static inline __attribute__((always_inline)) void attend_softmax(Attend *a, int r, int b0, int vlo, int vhi) {
    float *s = a->s + (size_t)r * ATT_BLOCK - b0, top = -INFINITY, sum = 0.f;
    if (a->cap > 0.f)
        for (int t = vlo; t < vhi; t++) s[t] = a->cap * tanhf(s[t] / a->cap);
    for (int t = vlo; t < vhi; t++) top = s[t] > top ? s[t] : top;
    if (top > a->top[r]) {
        if (a->top[r] > -INFINITY) {
            const float c = ep_exp(a->top[r] - top);
            a->sum[r] *= c;
            for (int d = 0; d < a->D; d++) a->o[r][d] *= c;
        }
        a->top[r] = top;
    }
    top = a->top[r];
#pragma omp simd reduction(+ : sum)
    for (int t = vlo; t < vhi; t++) {
        s[t] = ep_exp(s[t] - top);
        sum += s[t];
    }
    a->sum[r] += sum;
}

/* keys or values of positions [t, t + cnt) as float32 into tmp (8 rows of D), the rest zero */
static inline __attribute__((always_inline)) void attend_rows_f32(const uint16_t *X, int t, int cnt, int D, float *tmp) {
    const uint16_t *x = X + (size_t)t * D;
#pragma omp simd
    for (int i = 0; i < cnt * D; i++) tmp[i] = bf16_to_f32(x[i]);
    for (int i = cnt * D; i < 8 * D; i++) tmp[i] = 0.f;
}

/* The walk every attention kernel takes (attend_body below, arch/x86/avx2.c's attend_avx2):
 * blocks of ATT_BLOCK positions; in each, 8 positions' keys converted to float32 by ROWS and
 * the scores of each row that sees some of them (SCORES); the block's online softmax
 * (SOFTMAX); then 8 positions' values converted and added into each row's output (VALUES).
 * SCORES and VALUES are the kernel's own statements over r, t, b0 and the positions
 * t + i0 <= p < t + i1 that row r sees. EP_ATTEND_EIGHTS: the block's keys or values (X),
 * 8 positions at a time, and STMT for each row that sees some of them. */
#define EP_ATTEND_EIGHTS(a, X, ROWS, STMT)                                                              \
    for (int t = b0; t < b1; t += 8) {                                                                \
        const int cnt = b1 - t < 8 ? b1 - t : 8;                                                      \
        ROWS(X, t, cnt, D_, (a)->tmp);                                                                \
        for (int r = 0; r < R_; r++) {                                                                \
            const int i0 = ((a)->lo[r] > t ? (a)->lo[r] : t) - t;                                     \
            const int i1 = ((a)->hi[r] < t + cnt ? (a)->hi[r] : t + cnt) - t;                         \
            if (i0 < i1) STMT;                                                                        \
        }                                                                                             \
    }
#define EP_ATTEND_WALK(a, ROWS, SCORES, SOFTMAX, VALUES)                                                \
    do {                                                                                              \
        const int R_ = (a)->R, D_ = (a)->D;                                                           \
        int from_, to_;                                                                               \
        attend_start(a, &from_, &to_);                                                                \
        for (int b0 = from_; b0 < to_; b0 += ATT_BLOCK) {                                            \
            const int b1 = b0 + ATT_BLOCK < to_ ? b0 + ATT_BLOCK : to_;                               \
            EP_ATTEND_EIGHTS(a, (a)->K, ROWS, SCORES)                                                 \
            for (int r = 0; r < R_; r++) {                                                            \
                const int vlo = (a)->lo[r] > b0 ? (a)->lo[r] : b0, vhi = (a)->hi[r] < b1 ? (a)->hi[r] : b1; \
                if (vlo < vhi) SOFTMAX(a, r, b0, vlo, vhi);                                           \
            }                                                                                         \
            EP_ATTEND_EIGHTS(a, (a)->V, ROWS, VALUES)                                                 \
        }                                                                                             \
    } while (0)

/* the portable body: row r's scores of positions t + i0 .. t + i1 (keys in a->tmp), one dot
 * product each; its output plus their values weighted by the softmax's numerators */
static inline __attribute__((always_inline)) void attend_scores_1(Attend *a, int r, int t, int b0, int i0, int i1) {
    const int D = a->D;
    float *s = a->s + (size_t)r * ATT_BLOCK + (t - b0);
    const float *q = a->q[r];
    for (int i = i0; i < i1; i++) {
        const float *k = a->tmp + (size_t)i * D;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int d = 0; d < D; d++) acc += q[d] * k[d];
        s[i] = acc * a->scale;
    }
}

static inline __attribute__((always_inline)) void attend_values_1(Attend *a, int r, int t, int b0, int i0, int i1) {
    const int D = a->D;
    const float *p = a->s + (size_t)r * ATT_BLOCK + (t - b0);
    float *o = a->o[r];
    for (int i = i0; i < i1; i++) {
        const float *v = a->tmp + (size_t)i * D, w = p[i];
#pragma omp simd
        for (int d = 0; d < D; d++) o[d] += w * v[d];
    }
}

static inline __attribute__((always_inline)) void attend_body(Attend *a) {
    EP_ATTEND_WALK(a, attend_rows_f32, attend_scores_1(a, r, t, b0, i0, i1), attend_softmax,
                   attend_values_1(a, r, t, b0, i0, i1));
}

static inline __attribute__((always_inline)) void silu_mul_body(const float *gate, const float *up, float *out, int n) {
#pragma omp simd
    for (int r = 0; r < n; r++) out[r] = gate[r] / (1.f + ep_exp(-gate[r])) * up[r];
}

/* The prompt GEMM's register tile: y[t, i] for RB rows i of w (float32, row-major [RB, K])
 * and TV registers of tokens t, from xt, the inputs transposed ([K, ldx]: token t of column
 * k at xt[k * ldx + t], padded with zeros to whole registers). Each step k broadcasts one
 * weight per row and loads TV registers of inputs: RB x TV FMAs on RB + TV loads, no
 * horizontal sums (AVX-512: 8 rows x 3 x 16 tokens, 24 accumulators). raw: [RB, TV * LANES]. */
#define EP_GEMM_TILE(NAME, ATTR, VEC, LANES, RB, TV, ZERO, LOAD, BCAST, FMA, STORE)           \
    ATTR static void NAME(const float *w, int K, const float *xt, int ldx, float *raw) {    \
        VEC acc[RB][TV];                                                                    \
        for (int i = 0; i < RB; i++)                                                        \
            for (int v = 0; v < TV; v++) acc[i][v] = ZERO();                                \
        for (int k = 0; k < K; k++) {                                                       \
            const float *xk = xt + (size_t)k * ldx;                                         \
            VEC xv[TV];                                                                     \
            for (int v = 0; v < TV; v++) xv[v] = LOAD(xk + v * LANES);                      \
            for (int i = 0; i < RB; i++) {                                                  \
                const VEC wv = BCAST(w[(size_t)i * K + k]);                                 \
                for (int v = 0; v < TV; v++) acc[i][v] = FMA(wv, xv[v], acc[i][v]);         \
            }                                                                               \
        }                                                                                   \
        for (int i = 0; i < RB; i++)                                                        \
            for (int v = 0; v < TV; v++) STORE(raw + (size_t)i * TV * LANES + v * LANES, acc[i][v]); \
    }

/* 8-bit tables (W_INT8_B32): int8 codes with a float16 scale per block of 32 values of a row.
 * y[r] = sum_b scale[r, b] (sum_{k in b} code[r, k] x[k]): each block's dot product, then one
 * multiply-add by its scale. Portable body (the compiler vectorizes the 32-wide loop): */
static inline __attribute__((always_inline)) void int8_b32_body(const Mat *m, const float *x, int r0, int r1,
                                                                 float *y) {
    const int K = m->cols, nb = K / 32;
    for (int r = r0; r < r1; r++) {
        const int8_t *c = (const int8_t *)m->w + (size_t)r * K;
        const uint16_t *d = m->sz + (size_t)r * nb;
        prefetch_row(c, K);
        float acc = 0.f;
        for (int b = 0; b < nb; b++) {
            float t = 0.f;
            const int8_t *cb = c + 32 * b;
            const float *xb = x + 32 * b;
#pragma omp simd reduction(+ : t)
            for (int i = 0; i < 32; i++) t += (float)cb[i] * xb[i];
            acc += f16_to_f32(d[b]) * t;
        }
        y[r] = acc;
    }
}

/* The same with SIMD registers of LANES floats (32 a multiple of LANES): four rows at a time
 * share each load of x; per row, a block's 32 / LANES products go into one register, which
 * one FMA scales into the row's accumulator. LOADW(p, i): LANES codes from p + i as floats;
 * SCALE(p): a float16 as float32. */
#define EP_B32_ROWS(NAME, ATTR, VEC, LANES, ZERO, LOADX, LOADW, FMA, BCAST, HSUM, SCALE)            \
    ATTR static void NAME(const Mat *m, const float *x, int r0, int r1, float *y) {                 \
        const int K = m->cols, nb = K / 32, nv = 32 / LANES;                                       \
        int r = r0;                                                                                 \
        for (; r + 4 <= r1; r += 4) {                                                               \
            const int8_t *c0 = (const int8_t *)m->w + (size_t)r * K;                                \
            const uint16_t *d0 = m->sz + (size_t)r * nb;                                            \
            VEC a0 = ZERO(), a1 = a0, a2 = a0, a3 = a0;                                             \
            for (int b = 0; b < nb; b++) {                                                          \
                const int8_t *c = c0 + 32 * b;                                                      \
                if (EP_PF) __builtin_prefetch(c0 + 128 * (size_t)b + EP_PF), __builtin_prefetch(c0 + 128 * (size_t)b + 64 + EP_PF); \
                VEC t0 = ZERO(), t1 = t0, t2 = t0, t3 = t0;                                         \
                for (int v = 0; v < nv; v++) {                                                      \
                    const VEC xv = LOADX(x + 32 * b + v * LANES);                                   \
                    t0 = FMA(LOADW(c, v * LANES), xv, t0);                                          \
                    t1 = FMA(LOADW(c + K, v * LANES), xv, t1);                                      \
                    t2 = FMA(LOADW(c + 2 * (size_t)K, v * LANES), xv, t2);                          \
                    t3 = FMA(LOADW(c + 3 * (size_t)K, v * LANES), xv, t3);                          \
                }                                                                                   \
                a0 = FMA(t0, BCAST(SCALE(d0 + b)), a0);                                             \
                a1 = FMA(t1, BCAST(SCALE(d0 + nb + b)), a1);                                        \
                a2 = FMA(t2, BCAST(SCALE(d0 + 2 * nb + b)), a2);                                    \
                a3 = FMA(t3, BCAST(SCALE(d0 + 3 * nb + b)), a3);                                    \
            }                                                                                       \
            y[r] = HSUM(a0), y[r + 1] = HSUM(a1), y[r + 2] = HSUM(a2), y[r + 3] = HSUM(a3);         \
        }                                                                                           \
        for (; r < r1; r++) {                                                                       \
            const int8_t *c0 = (const int8_t *)m->w + (size_t)r * K;                                \
            const uint16_t *d0 = m->sz + (size_t)r * nb;                                            \
            VEC a = ZERO();                                                                         \
            for (int b = 0; b < nb; b++) {                                                          \
                VEC t = ZERO();                                                                     \
                for (int v = 0; v < nv; v++)                                                        \
                    t = FMA(LOADW(c0 + 32 * b, v * LANES), LOADX(x + 32 * b + v * LANES), t);      \
                a = FMA(t, BCAST(SCALE(d0 + b)), a);                                                \
            }                                                                                       \
            y[r] = HSUM(a);                                                                         \
        }                                                                                           \
    }

#endif
