/* edgepack._native: one decode step of a Llama-family model on the CPU, in one call.
 *
 * The lean decoder (lean.py) runs a decode step as ~40 torch ops a layer; on a small model
 * their per-op overhead is a third of the step, and torch's int8 kernel wants bfloat16
 * activations. This module runs the whole step (embedding row, 30 x [norm, q/k/v, rotary,
 * KV cache write, attention, o, norm, gate/up, SiLU, down], final norm, head) over the
 * tensors the lean decoder already holds (no copy of any weight), with float32 activations,
 * on a small pool of its own threads (rows of each matmul split between them).
 *
 * Weights: int8 rows with one float32 scale per row (bitsandbytes' int8 storage, SCB/127),
 * edgepack's int4 (codes and (scale, zero) pairs per group), or bfloat16 / float16 / float32. The KV cache is lean.KVCache's bfloat16 buffers, so a
 * prompt run by torch and decode steps run here share it.
 *
 * Kernels: AVX-512 and AVX2 (+FMA/F16C) on x86-64, chosen at import from what the CPU has,
 * and portable C that compilers vectorize elsewhere (ARM NEON). No Python object is touched
 * while the step runs: the GIL is released.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(_M_X64)
#define EP_X86 1
#include <immintrin.h>
#else
#define EP_X86 0
#endif

enum { W_INT8 = 0, W_BF16 = 1, W_F16 = 2, W_F32 = 3, W_INT4 = 4 };
enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static const char *ISA_NAMES[] = {"generic", "avx2", "avx512"};
static int isa_best = ISA_GENERIC, isa = ISA_GENERIC;

typedef struct {
    int type, rows, cols;
    const void *w;
    const float *scale;  /* int8 only: one per row */
    const float *bias;   /* optional, float32 */
    const uint16_t *sz;  /* int4 only: bfloat16 (scale, zero) pairs, [rows, cols / group, 2] */
    int group;           /* int4 only: inputs sharing a pair, a multiple of 32 */
} Mat;

typedef struct {
    const float *in_norm, *post_norm;
    Mat qkv, o, gate_up, down;
} Layer;

typedef struct {
    int hidden, heads, kv_heads, head_dim, inter, n_layers, vocab;
    float eps;
    int embed_type;
    const void *embed;
    const float *norm;
    Mat head;
    Layer *layers;
    /* scratch */
    float *x, *h, *qkv, *att, *gu, *tmp, *prep;
    float *scores; /* heads x scores_len: attention weights, grown with the cache */
    int scores_len;
} Model;

/* ------------------------------------------------------------------ scalar helpers */

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t h) { /* exact, subnormals included, branch-free */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7fffu, u = em << 13;
    float f;
    memcpy(&f, &u, 4);
    f *= 0x1p112f;
    memcpy(&u, &f, 4);
    if (em >= 0x7c00u) u = (em << 13) | 0x7f800000u; /* inf / nan */
    u |= sign;
    memcpy(&f, &u, 4);
    return f;
}

/* e^x for float32, vectorizable (in `omp simd` loops; libm's expf is a call per value):
 * Cephes' expf, x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for e^r, 2^n built
 * in the exponent bits; relative error ~1e-7. Below -87.3 it returns ~1e-38, not 0. */
static inline __attribute__((always_inline)) float ep_exp(float x) {
    x = x < -87.3f ? -87.3f : x > 88.3f ? 88.3f : x;
    /* n = round(x / ln2) by adding and subtracting 1.5 x 2^23 (no floorf: a libm call before SSE4.1) */
    const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

static float load_value(int type, const void *w, size_t i) {
    switch (type) {
    case W_INT8: return (float)((const int8_t *)w)[i];
    case W_BF16: return bf16_to_f32(((const uint16_t *)w)[i]);
    case W_F16: return f16_to_f32(((const uint16_t *)w)[i]);
    default: return ((const float *)w)[i];
    }
}

/* ------------------------------------------------------------------ matrix-vector kernels
 * y[r] = sum_k W[r, k] x[k] for r in [r0, r1): the raw dot products (scales and biases are
 * applied by the caller). Four rows at a time share each load of x. */

/* Software prefetch EP_PF bytes ahead in each weight row being read. The hardware prefetcher
 * alone leaves the step waiting on memory: SmolLM2-135M 8-bit, 2 threads, step 10.7 ms
 * without, 8.2 ms at 1 KiB ahead, 5.3 ms at 4 KiB, 4.4-4.6 ms at 9 KiB, 4.8 ms at 16 KiB
 * (2-core AVX-512 box; ~35 GB/s of weights read against ~15). */
#ifndef EP_PF
#define EP_PF 9216
#endif
#define ESIZE_int8 1
#define ESIZE_f16 2
#define ESIZE_bf16 2
#define ESIZE_f32 4
#define EP_PREFETCH(T, W, i) \
    if (EP_PF) __builtin_prefetch((const char *)W + (i) * ESIZE_##T + EP_PF)
static inline void prefetch_row(const void *row, size_t bytes) { /* the row EP_PF bytes on */
    for (size_t b = 0; EP_PF && b < bytes; b += 64) __builtin_prefetch((const char *)row + b + EP_PF);
}

/* portable kernels: one row at a time, the compiler vectorizes the dot product */
#define EP_GENERIC_ROWS(NAME, T, CONV)                                                    \
    static void NAME(const void *W, const float *x, int K, int r0, int r1, float *y) {    \
        for (int r = r0; r < r1; r++) {                                                  \
            const T *w = (const T *)W + (size_t)r * K;                                    \
            prefetch_row(w, K * sizeof(T));                                               \
            float acc = 0.f;                                                              \
            _Pragma("omp simd reduction(+ : acc)") for (int k = 0; k < K; k++) acc +=    \
                CONV(w[k]) * x[k];                                                        \
            y[r] = acc;                                                                   \
        }                                                                                 \
    }
#define EP_CAST(v) ((float)(v))
EP_GENERIC_ROWS(gemv_generic_int8, int8_t, EP_CAST)
EP_GENERIC_ROWS(gemv_generic_bf16, uint16_t, bf16_to_f32)
EP_GENERIC_ROWS(gemv_generic_f16, uint16_t, f16_to_f32)
EP_GENERIC_ROWS(gemv_generic_f32, float, EP_CAST)

#if EP_X86
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define T256 __attribute__((target("avx2,fma,f16c")))

/* Four rows at a time share each load of x; columns past the last whole register are
 * added in scalar code. One body for both instruction sets (the macro's arguments). */
#define EP_SIMD_ROWS(NAME, ATTR, T, VEC, LANES, ZERO, LOADX, LOADW, FMA, HSUM)                 \
    ATTR static void NAME(const void *W, const float *x, int K, int r0, int r1, float *y) {   \
        const int kv = K & ~(LANES - 1);                                                      \
        int r = r0;                                                                           \
        for (; r + 4 <= r1; r += 4) {                                                         \
            const size_t o[4] = {(size_t)r * K, (size_t)(r + 1) * K, (size_t)(r + 2) * K, (size_t)(r + 3) * K}; \
            VEC a0 = ZERO(), a1 = a0, a2 = a0, a3 = a0;                                       \
            for (int k = 0; k < kv; k += LANES) {                                             \
                const VEC xv = LOADX(x + k);                                                  \
                EP_PREFETCH(T, W, o[0] + k); EP_PREFETCH(T, W, o[1] + k);                       \
                EP_PREFETCH(T, W, o[2] + k); EP_PREFETCH(T, W, o[3] + k);                       \
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
#define TYPE_int8 W_INT8
#define TYPE_f16 W_F16
#define TYPE_bf16 W_BF16
#define TYPE_f32 W_F32

/* weights as float32 lanes, 16 (AVX-512) or 8 (AVX2) from element i of row-major W */
T512 static inline __m512 ld512_int8(const void *p, size_t i) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)p + i))));
}
T512 static inline __m512 ld512_f16(const void *p, size_t i) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
}
T512 static inline __m512 ld512_bf16(const void *p, size_t i) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
T512 static inline __m512 ld512_f32(const void *p, size_t i) { return _mm512_loadu_ps((const float *)p + i); }
T512 static inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

T256 static inline __m256 ld256_int8(const void *p, size_t i) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)p + i))));
}
T256 static inline __m256 ld256_f16(const void *p, size_t i) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
}
T256 static inline __m256 ld256_bf16(const void *p, size_t i) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
T256 static inline __m256 ld256_f32(const void *p, size_t i) { return _mm256_loadu_ps((const float *)p + i); }
T256 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define EP_AVX512_ROWS(T) \
    EP_SIMD_ROWS(gemv512_##T, T512, T, __m512, 16, _mm512_setzero_ps, _mm512_loadu_ps, ld512_##T, _mm512_fmadd_ps, hsum512)
#define EP_AVX2_ROWS(T) \
    EP_SIMD_ROWS(gemv256_##T, T256, T, __m256, 8, _mm256_setzero_ps, _mm256_loadu_ps, ld256_##T, _mm256_fmadd_ps, hsum256)
EP_AVX512_ROWS(int8)
EP_AVX512_ROWS(f16)
EP_AVX512_ROWS(bf16)
EP_AVX512_ROWS(f32)
EP_AVX2_ROWS(int8)
EP_AVX2_ROWS(f16)
EP_AVX2_ROWS(bf16)
EP_AVX2_ROWS(f32)
#endif /* EP_X86 */

/* int4 (edgepack's CPU format): codes [rows, cols / 2], column 2j in the low nibble of byte j
 * and 2j+1 in the high one; W[r, k] = (q - 8) s + z with (s, z) shared by `group` inputs. So
 * y[r] = sum_g s_g (sum_{k in g} q_k x_k) + (z_g - 8 s_g) xsum_g, on an input prepared once
 * per matrix-vector product (prep_int4): even and odd inputs apart (they meet the low and
 * high nibbles) and the sum of each group. */
static void prep_int4(const Mat *m, const float *x, float *prep) {
    const int K = m->cols, half = K / 2, G = m->group;
    for (int j = 0; j < half; j++) prep[j] = x[2 * j], prep[half + j] = x[2 * j + 1];
    for (int g = 0; g < K / G; g++) {
        float sum = 0.f;
        for (int k = g * G; k < (g + 1) * G; k++) sum += x[k];
        prep[K + g] = sum;
    }
}

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

typedef void (*int4_fn)(const Mat *, const float *, int, int, float *);
static void int4_generic(const Mat *m, const float *prep, int r0, int r1, float *y) { int4_rows_body(m, prep, r0, r1, y); }

#if EP_X86
T256 static void int4_256(const Mat *m, const float *prep, int r0, int r1, float *y) { int4_rows_body(m, prep, r0, r1, y); }

/* 16 groups' (scale, zero) pairs converted at once; each group's 32 codes per 16 bytes:
 * one widening (the only shuffle), then low and high nibbles by mask and shift */
T512 static void int4_512(const Mat *m, const float *prep, int r0, int r1, float *y) {
    const int K = m->cols, half = K / 2, G = m->group, ng = K / G, gb = G / 2;
    const float *xe = prep, *xo = prep + half, *xs = prep + K;
    const __m512i nib = _mm512_set1_epi32(0x0F), top = _mm512_set1_epi32((int)0xFFFF0000u);
    const __m512 eight = _mm512_set1_ps(8.f);
    float sbuf[16] __attribute__((aligned(64)));
    for (int r = r0; r < r1; r++) {
        const uint8_t *c = (const uint8_t *)m->w + (size_t)r * half;
        const uint32_t *sz = (const uint32_t *)(m->sz + (size_t)r * ng * 2);
        prefetch_row(c, half);
        prefetch_row(sz, (size_t)ng * 4);
        __m512 acc = _mm512_setzero_ps(), cst = _mm512_setzero_ps();
        for (int g0 = 0; g0 < ng; g0 += 16) {
            const int n = ng - g0 < 16 ? ng - g0 : 16;
            const __mmask16 mk = (__mmask16)((1u << n) - 1u);
            const __m512i pair = _mm512_maskz_loadu_epi32(mk, sz + g0);
            const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
            const __m512 ze = _mm512_castsi512_ps(_mm512_and_si512(pair, top));
            cst = _mm512_fmadd_ps(_mm512_fnmadd_ps(eight, sc, ze), _mm512_maskz_loadu_ps(mk, xs + g0), cst);
            _mm512_store_ps(sbuf, sc);
            for (int g = 0; g < n; g++) {
                const int j0 = (g0 + g) * gb;
                __m512 t = _mm512_setzero_ps();
                for (int j = j0; j < j0 + gb; j += 16) {
                    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + j)));
                    t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, nib)), _mm512_loadu_ps(xe + j), t);
                    t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), _mm512_loadu_ps(xo + j), t);
                }
                acc = _mm512_fmadd_ps(t, _mm512_set1_ps(sbuf[g]), acc);
            }
        }
        y[r] = _mm512_reduce_add_ps(acc) + _mm512_reduce_add_ps(cst);
    }
}
#endif

/* the variant of a kernel for the instruction set in use */
#if EP_X86
#define EP_PICK(F512, F256, FGENERIC) (isa == ISA_AVX512 ? (F512) : isa == ISA_AVX2 ? (F256) : (FGENERIC))
#else
#define EP_PICK(F512, F256, FGENERIC) (FGENERIC)
#endif

static int4_fn pick_int4(void) { return EP_PICK(int4_512, int4_256, int4_generic); }

typedef void (*gemv_fn)(const void *, const float *, int, int, int, float *);

static gemv_fn pick_gemv(int type) {
#if EP_X86
    if (isa == ISA_AVX512) {
        gemv_fn f[] = {gemv512_int8, gemv512_bf16, gemv512_f16, gemv512_f32};
        return f[type];
    }
    if (isa == ISA_AVX2) {
        gemv_fn f[] = {gemv256_int8, gemv256_bf16, gemv256_f16, gemv256_f32};
        return f[type];
    }
#endif
    gemv_fn f[] = {gemv_generic_int8, gemv_generic_bf16, gemv_generic_f16, gemv_generic_f32};
    return f[type];
}

/* y[r] for r in [r0, r1): the dot products, then the row's scale and bias (int4: `prep`,
 * the input as prep_int4 made it) */
static void mat_rows(const Mat *m, const float *x, const float *prep, float *y, int r0, int r1) {
    if (r1 <= r0) return;
    if (m->type == W_INT4)
        pick_int4()(m, prep, r0, r1, y);
    else
        pick_gemv(m->type)(m->w, x, m->cols, r0, r1, y);
    if (m->scale)
        for (int r = r0; r < r1; r++) y[r] *= m->scale[r];
    if (m->bias)
        for (int r = r0; r < r1; r++) y[r] += m->bias[r];
}

/* ------------------------------------------------------------------ attention
 * One query head over positions [0, n) of its key/value head (bfloat16, [n, dim]).
 * Written once; compiled for each instruction set so the compiler vectorizes the
 * dim-long loops with the widest registers the CPU has. */

static inline __attribute__((always_inline)) void attn_head_body(const float *q, const uint16_t *K, const uint16_t *V,
                                                                  int n, int D, float scale, float *s, float *out) {
    float top = -INFINITY;
    for (int t = 0; t < n; t++) {
        const uint16_t *k = K + (size_t)t * D;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int d = 0; d < D; d++) acc += q[d] * bf16_to_f32(k[d]);
        s[t] = acc * scale;
        top = s[t] > top ? s[t] : top;
    }
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int t = 0; t < n; t++) {
        s[t] = ep_exp(s[t] - top);
        sum += s[t];
    }
    for (int d = 0; d < D; d++) out[d] = 0.f;
    for (int t = 0; t < n; t++) {
        const uint16_t *v = V + (size_t)t * D;
        const float p = s[t];
#pragma omp simd
        for (int d = 0; d < D; d++) out[d] += p * bf16_to_f32(v[d]);
    }
    const float inv = 1.f / sum;
    for (int d = 0; d < D; d++) out[d] *= inv;
}

typedef void (*attn_fn)(const float *, const uint16_t *, const uint16_t *, int, int, float, float *, float *);
static void attn_generic(const float *q, const uint16_t *K, const uint16_t *V, int n, int D, float sc, float *s, float *o) {
    attn_head_body(q, K, V, n, D, sc, s, o);
}
#if EP_X86
T512 static void attn_512(const float *q, const uint16_t *K, const uint16_t *V, int n, int D, float sc, float *s, float *o) {
    attn_head_body(q, K, V, n, D, sc, s, o);
}
T256 static void attn_256(const float *q, const uint16_t *K, const uint16_t *V, int n, int D, float sc, float *s, float *o) {
    attn_head_body(q, K, V, n, D, sc, s, o);
}
#endif

static attn_fn pick_attn(void) { return EP_PICK(attn_512, attn_256, attn_generic); }

/* out[r] = silu(gate[r]) * up[r] for r < n, compiled per instruction set like attention */
static inline __attribute__((always_inline)) void silu_mul_body(const float *gate, const float *up, float *out, int n) {
#pragma omp simd
    for (int r = 0; r < n; r++) out[r] = gate[r] / (1.f + ep_exp(-gate[r])) * up[r];
}
typedef void (*silu_fn)(const float *, const float *, float *, int);
static void silu_generic(const float *g, const float *u, float *o, int n) { silu_mul_body(g, u, o, n); }
#if EP_X86
T512 static void silu_512(const float *g, const float *u, float *o, int n) { silu_mul_body(g, u, o, n); }
T256 static void silu_256(const float *g, const float *u, float *o, int n) { silu_mul_body(g, u, o, n); }
#endif

static silu_fn pick_silu(void) { return EP_PICK(silu_512, silu_256, silu_generic); }

/* ------------------------------------------------------------------ thread pool
 * Workers spin briefly between the parallel parts of a step (microseconds apart) and
 * sleep on a condition variable between steps, so they hold no core while Python or torch
 * runs. Dekker-style handshake: the caller bumps the generation, then wakes sleepers; a
 * worker announces it sleeps, then re-checks the generation under the mutex. */

#define MAX_THREADS 64
#define SPIN_LIMIT 20000

typedef void (*task_fn)(void *ctx, int tid, int nth);

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_int gen, pending, sleeping;
    int workers, active;
    task_fn fn;
    void *ctx;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
static pthread_mutex_t step_lock = PTHREAD_MUTEX_INITIALIZER;

static inline void cpu_relax(void) {
#if EP_X86
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int start_gen[MAX_THREADS]; /* the generation a worker was created at */

static void *worker_main(void *arg) {
    const int tid = (int)(intptr_t)arg;
    int seen = start_gen[tid]; /* not pool.gen now: a job may have been posted since */
    for (;;) {
        int g, spins = 0;
        while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen) {
            if (++spins < SPIN_LIMIT) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool.mu);
            atomic_fetch_add(&pool.sleeping, 1);
            while ((g = atomic_load(&pool.gen)) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            atomic_fetch_sub(&pool.sleeping, 1);
            pthread_mutex_unlock(&pool.mu);
            break;
        }
        seen = g;
        if (tid < pool.active) pool.fn(pool.ctx, tid, pool.active);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_acq_rel);
    }
    return NULL;
}

static void after_fork_child(void) { /* threads do not survive fork(): start afresh */
    pool.workers = 0;
    atomic_store(&pool.pending, 0);
    atomic_store(&pool.sleeping, 0);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pthread_mutex_init(&step_lock, NULL);
}

static int ensure_workers(int n) {
    if (n > MAX_THREADS - 1) n = MAX_THREADS - 1;
    while (pool.workers < n) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        start_gen[pool.workers + 1] = atomic_load(&pool.gen);
        int rc = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)(pool.workers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool.workers++;
    }
    return pool.workers + 1;
}

static void parallel(task_fn fn, void *ctx, int nth) {
    if (nth > pool.workers + 1) nth = pool.workers + 1;
    if (nth <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.active = nth;
    atomic_store(&pool.pending, pool.workers);
    atomic_fetch_add(&pool.gen, 1); /* seq_cst: publishes fn/ctx/active */
    if (atomic_load(&pool.sleeping) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    fn(ctx, 0, nth);
    while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) cpu_relax();
}

/* rows [lo, hi) of `rows` for thread tid of nth, in multiples of 4 (the kernels' unit) */
static inline void split(int rows, int tid, int nth, int *lo, int *hi) {
    *lo = tid == 0 ? 0 : (int)(((long long)rows * tid / nth) & ~3LL);
    *hi = tid == nth - 1 ? rows : (int)(((long long)rows * (tid + 1) / nth) & ~3LL);
}

/* ------------------------------------------------------------------ the step */

typedef struct {
    Model *m;
    const Mat *mat;
    const float *in, *prep;
    float *out;
    int add; /* out += result (the residual stream) instead of out = result */
    /* attention */
    const uint16_t *kc, *vc;
    int n, max_tokens, layer;
} Job;

static void task_mat(void *ctx, int tid, int nth) {
    Job *j = (Job *)ctx;
    int lo, hi;
    split(j->mat->rows, tid, nth, &lo, &hi);
    if (!j->add) {
        mat_rows(j->mat, j->in, j->prep, j->out, lo, hi);
        return;
    }
    mat_rows(j->mat, j->in, j->prep, j->m->tmp, lo, hi);
    for (int r = lo; r < hi; r++) j->out[r] += j->m->tmp[r];
}

static void task_gate_up(void *ctx, int tid, int nth) { /* gu[r] = silu(gate[r]) * up[r] */
    Job *j = (Job *)ctx;
    const int inter = j->m->inter;
    int lo, hi;
    split(inter, tid, nth, &lo, &hi);
    if (hi <= lo) return;
    float *g = j->m->gu;
    mat_rows(j->mat, j->in, j->prep, g, lo, hi);
    mat_rows(j->mat, j->in, j->prep, g, inter + lo, inter + hi);
    pick_silu()(g + lo, g + inter + lo, j->out + lo, hi - lo);
}

static void task_attn(void *ctx, int tid, int nth) {
    Job *j = (Job *)ctx;
    Model *m = j->m;
    const int D = m->head_dim, group = m->heads / m->kv_heads;
    const int lo = m->heads * tid / nth, hi = m->heads * (tid + 1) / nth;
    const float scale = 1.f / sqrtf((float)D);
    attn_fn attn = pick_attn();
    for (int h = lo; h < hi; h++) {
        const size_t base = ((size_t)j->layer * m->kv_heads + h / group) * j->max_tokens * D;
        attn(m->qkv + (size_t)h * D, j->kc + base, j->vc + base, j->n, D, scale, m->scores + (size_t)h * m->scores_len,
             m->att + (size_t)h * D);
    }
}

static void rms_norm(const float *x, const float *w, float *y, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float inv = 1.f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * inv * w[i];
}

static void rotate(float *v, const float *cos, const float *sin, int D) {
    const int half = D / 2;
    for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* where a step's time goes (profile(True) turns the clock on): wall time of each part on
 * the calling thread, summed over steps */
enum { P_SERIAL, P_QKV, P_ATTN, P_O, P_GATE_UP, P_DOWN, P_HEAD, P_PARTS };
static const char *PART_NAMES[P_PARTS] = {"norms, rotary, cache writes", "q/k/v", "attention", "o", "gate/up + SiLU",
                                          "down", "head"};
static int profiling;
static double part_seconds[P_PARTS];
static long profiled_steps;

static inline double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static inline void lap(int part, double *t) {
    if (!profiling) return;
    const double n = now();
    part_seconds[part] += n - *t;
    *t = n;
}

/* a matrix-vector product of the step, on all threads */
static void product(Job *j, task_fn task, const Mat *mat, const float *in, float *out, int add, int nth) {
    j->mat = mat, j->in = in, j->out = out, j->add = add, j->prep = NULL;
    if (mat->type == W_INT4) {
        prep_int4(mat, in, j->m->prep);
        j->prep = j->m->prep;
    }
    parallel(task, j, nth);
}

static void run_step(Model *m, int token, int pos, uint16_t *kc, uint16_t *vc, int max_tokens, const float *cos,
                     const float *sin, float *logits, int nth) {
    const int H = m->hidden, D = m->head_dim, qn = m->heads * D, kn = m->kv_heads * D;
    double t = profiling ? now() : 0.0;
    for (int i = 0; i < H; i++) m->x[i] = load_value(m->embed_type, m->embed, (size_t)token * H + i);
    Job j = {.m = m, .kc = kc, .vc = vc, .n = pos + 1, .max_tokens = max_tokens};
    for (int l = 0; l < m->n_layers; l++) {
        const Layer *L = &m->layers[l];
        rms_norm(m->x, L->in_norm, m->h, H, m->eps);
        lap(P_SERIAL, &t);
        product(&j, task_mat, &L->qkv, m->h, m->qkv, 0, nth);
        lap(P_QKV, &t);
        for (int h = 0; h < m->heads + m->kv_heads; h++) rotate(m->qkv + (size_t)h * D, cos, sin, D);
        for (int g = 0; g < m->kv_heads; g++) {
            const size_t at = (((size_t)l * m->kv_heads + g) * max_tokens + pos) * D;
            for (int d = 0; d < D; d++) {
                kc[at + d] = f32_to_bf16(m->qkv[qn + g * D + d]);
                vc[at + d] = f32_to_bf16(m->qkv[qn + kn + g * D + d]);
            }
        }
        lap(P_SERIAL, &t);
        j.layer = l;
        parallel(task_attn, &j, nth);
        lap(P_ATTN, &t);
        product(&j, task_mat, &L->o, m->att, m->x, 1, nth);
        lap(P_O, &t);
        rms_norm(m->x, L->post_norm, m->h, H, m->eps);
        lap(P_SERIAL, &t);
        product(&j, task_gate_up, &L->gate_up, m->h, m->tmp + H, 0, nth); /* tmp: [H | inter] */
        lap(P_GATE_UP, &t);
        product(&j, task_mat, &L->down, m->tmp + H, m->x, 1, nth);
        lap(P_DOWN, &t);
    }
    rms_norm(m->x, m->norm, m->h, H, m->eps);
    lap(P_SERIAL, &t);
    product(&j, task_mat, &m->head, m->h, logits, 0, nth);
    lap(P_HEAD, &t);
    profiled_steps += profiling != 0;
}

/* ------------------------------------------------------------------ prompts
 * A prompt's tokens go through each matrix together: a GEMM, not one GEMV per token. Each
 * thread takes rows of the weight, converts PB of them at a time to float32 (they stay in
 * L1/L2) and multiplies them with the chunk's tokens, TB at a time in registers: a weight is
 * read from memory once per chunk of CHUNK tokens instead of once per token, and converted
 * once per chunk. Norms, rotary, attention and SiLU as in the step, token by token. */

#define PB 16    /* weight rows converted to float32 at a time */
#define CHUNK 96 /* prompt tokens per pass through the layers (two AVX-512 tiles of 48) */

/* rows [r0, r0 + n) of m as float32 (int8: the raw codes; their scale is applied after) */
#define EP_GENERIC_CVT(NAME, T, CONV)                                                 \
    static void NAME(const void *W, size_t at, size_t count, float *out) {             \
        const T *w = (const T *)W + at;                                                \
        _Pragma("omp simd") for (size_t i = 0; i < count; i++) out[i] = CONV(w[i]);    \
    }
EP_GENERIC_CVT(cvt_int8, int8_t, EP_CAST)
EP_GENERIC_CVT(cvt_bf16, uint16_t, bf16_to_f32)
EP_GENERIC_CVT(cvt_f16, uint16_t, f16_to_f32)
EP_GENERIC_CVT(cvt_f32, float, EP_CAST)

static void int4_rows_f32(const Mat *m, int r0, int r1, float *out) {
    const int K = m->cols, half = K / 2, G = m->group, ng = K / G;
    for (int r = r0; r < r1; r++) {
        const uint8_t *c = (const uint8_t *)m->w + (size_t)r * half;
        float *o = out + (size_t)(r - r0) * K;
        for (int g = 0; g < ng; g++) {
            const float s = bf16_to_f32(m->sz[((size_t)r * ng + g) * 2]), z = bf16_to_f32(m->sz[((size_t)r * ng + g) * 2 + 1]);
            const float b = z - 8.f * s;
            for (int j = g * G / 2; j < (g + 1) * G / 2; j++) {
                o[2 * j] = (float)(c[j] & 15) * s + b;
                o[2 * j + 1] = (float)(c[j] >> 4) * s + b;
            }
        }
    }
}

static void rows_f32(const Mat *m, int r0, int r1, float *out) {
    const size_t at = (size_t)r0 * m->cols, count = (size_t)(r1 - r0) * m->cols;
    switch (m->type) {
    case W_INT8: cvt_int8(m->w, at, count, out); break;
    case W_BF16: cvt_bf16(m->w, at, count, out); break;
    case W_F16: cvt_f16(m->w, at, count, out); break;
    case W_F32: cvt_f32(m->w, at, count, out); break;
    default: int4_rows_f32(m, r0, r1, out);
    }
}

/* The GEMM's register tile: y[t, i] for RB rows i of w (float32, row-major [RB, K]) and TV
 * registers of tokens t, from xt, the inputs transposed ([K, ldx]: token t of column k at
 * xt[k * ldx + t], padded with zeros to whole registers). Each step k broadcasts one weight
 * per row and loads TV registers of inputs: RB x TV FMAs on RB + TV loads, no horizontal sums
 * (AVX-512: 8 rows x 3 x 16 tokens, 24 accumulators). raw: [RB, TV * LANES]. */
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

typedef void (*tile_fn)(const float *, int, const float *, int, float *);
typedef struct {
    int lanes, max_tv, n_rb, rb[3];
    tile_fn tile[3][5]; /* [row-block kind][registers of tokens] */
} Tiles;

static inline float f_zero(void) { return 0.f; }
static inline float f_load(const float *p) { return *p; }
static inline float f_bcast(float v) { return v; }
static inline float f_fma(float a, float b, float c) { return a * b + c; }
static inline void f_store(float *p, float v) { *p = v; }
#define EP_TILE_GENERIC(RB, TV) \
    EP_GEMM_TILE(tileg_##RB##_##TV, , float, 1, RB, TV, f_zero, f_load, f_bcast, f_fma, f_store)
EP_TILE_GENERIC(4, 1)
EP_TILE_GENERIC(4, 2)
EP_TILE_GENERIC(4, 3)
EP_TILE_GENERIC(4, 4)
EP_TILE_GENERIC(1, 1)
EP_TILE_GENERIC(1, 2)
EP_TILE_GENERIC(1, 3)
EP_TILE_GENERIC(1, 4)
static const Tiles tiles_generic = {1, 4, 2, {4, 1}, {{NULL, tileg_4_1, tileg_4_2, tileg_4_3, tileg_4_4},
                                                     {NULL, tileg_1_1, tileg_1_2, tileg_1_3, tileg_1_4}}};

#if EP_X86
T512 static inline __m512 bcast512(float v) { return _mm512_set1_ps(v); }
T256 static inline __m256 bcast256(float v) { return _mm256_set1_ps(v); }
#define EP_TILE512(RB, TV)                                                                        \
    EP_GEMM_TILE(tile512_##RB##_##TV, T512, __m512, 16, RB, TV, _mm512_setzero_ps, _mm512_loadu_ps, \
                 bcast512, _mm512_fmadd_ps, _mm512_storeu_ps)
#define EP_TILE256(RB, TV)                                                                        \
    EP_GEMM_TILE(tile256_##RB##_##TV, T256, __m256, 8, RB, TV, _mm256_setzero_ps, _mm256_loadu_ps,  \
                 bcast256, _mm256_fmadd_ps, _mm256_storeu_ps)
EP_TILE512(8, 1)
EP_TILE512(8, 2)
EP_TILE512(8, 3)
EP_TILE512(4, 1)
EP_TILE512(4, 2)
EP_TILE512(4, 3)
EP_TILE512(1, 1)
EP_TILE512(1, 2)
EP_TILE512(1, 3)
EP_TILE256(4, 1)
EP_TILE256(4, 2)
EP_TILE256(1, 1)
EP_TILE256(1, 2)
static const Tiles tiles512 = {16, 3, 3, {8, 4, 1}, {{NULL, tile512_8_1, tile512_8_2, tile512_8_3},
                                                    {NULL, tile512_4_1, tile512_4_2, tile512_4_3},
                                                    {NULL, tile512_1_1, tile512_1_2, tile512_1_3}}};
static const Tiles tiles256 = {8, 2, 2, {4, 1}, {{NULL, tile256_4_1, tile256_4_2}, {NULL, tile256_1_1, tile256_1_2}}};
#endif

static const Tiles *pick_tiles(void) { return EP_PICK(&tiles512, &tiles256, &tiles_generic); }

/* xt[k, t] = x[t, k] for t < T, zero up to ldx (whole registers of tokens) */
static void transpose_inputs(const float *x, int T, int K, float *xt, int ldx) {
    for (int k = 0; k < K; k++) {
        float *row = xt + (size_t)k * ldx;
        for (int t = 0; t < T; t++) row[t] = x[(size_t)t * K + k];
        for (int t = T; t < ldx; t++) row[t] = 0.f;
    }
}

/* out[t, r] (add: +=) = (W x_t)[r] * scale[r] + bias[r] for rows [r0, r1) and tokens t < T;
 * xt: the inputs transposed (transpose_inputs, ldx columns); w32: PB x cols floats of scratch */
static void gemm_rows(const Mat *m, const float *xt, int ldx, int T, int r0, int r1, float *w32, float *out, int ldo,
                      int add) {
    const int K = m->cols;
    const Tiles *tl = pick_tiles();
    /* tokens in blocks of at most lanes x max_tv, as even as whole registers allow (64 tokens
     * on AVX-512: 32 + 32, not 48 + 16, whose one register a row is load-bound) */
    const int most = tl->lanes * tl->max_tv, blocks = (T + most - 1) / most;
    const int step = ((T + blocks - 1) / blocks + tl->lanes - 1) / tl->lanes * tl->lanes;
    float raw[8 * 48];
    for (int rb = r0; rb < r1; rb += PB) {
        const int re = rb + PB < r1 ? rb + PB : r1;
        rows_f32(m, rb, re, w32);
        for (int r = rb; r < re;) {
            int kind = 0;
            while (tl->rb[kind] > re - r) kind++;
            const int nr = tl->rb[kind];
            for (int t0 = 0; t0 < T; t0 += step) {
                const int nt = T - t0 < step ? T - t0 : step, tv = (nt + tl->lanes - 1) / tl->lanes, w = tv * tl->lanes;
                tl->tile[kind][tv](w32 + (size_t)(r - rb) * K, K, xt + t0, ldx, raw);
                for (int t = 0; t < nt; t++) {
                    float *o = out + (size_t)(t0 + t) * ldo + r;
                    for (int i = 0; i < nr; i++) {
                        float v = raw[i * w + t];
                        if (m->scale) v *= m->scale[r + i];
                        if (m->bias) v += m->bias[r + i];
                        o[i] = add ? o[i] + v : v;
                    }
                }
            }
            r += nr;
        }
    }
}

typedef struct {
    Model *m;
    const Mat *mat;
    const float *xt; /* the inputs transposed: [cols, ldx] */
    float *out, *w32, *act; /* act: gate/up only, [T, inter] = silu(gate) * up */
    int T, ldx, ldo, add;
    size_t w32_floats;
    /* attention */
    float *q, *att, *scores;
    const uint16_t *kc, *vc;
    int pos, max_tokens, layer, qkv_width;
} Batch;

static void task_gemm(void *ctx, int tid, int nth) {
    Batch *b = (Batch *)ctx;
    int lo, hi;
    split(b->mat->rows, tid, nth, &lo, &hi);
    if (hi > lo) gemm_rows(b->mat, b->xt, b->ldx, b->T, lo, hi, b->w32 + tid * b->w32_floats, b->out, b->ldo, b->add);
}

static void task_gemm_gate_up(void *ctx, int tid, int nth) {
    Batch *b = (Batch *)ctx;
    const int inter = b->m->inter;
    int lo, hi;
    split(inter, tid, nth, &lo, &hi);
    if (hi <= lo) return;
    float *w32 = b->w32 + tid * b->w32_floats;
    gemm_rows(b->mat, b->xt, b->ldx, b->T, lo, hi, w32, b->out, 2 * inter, 0);
    gemm_rows(b->mat, b->xt, b->ldx, b->T, inter + lo, inter + hi, w32, b->out, 2 * inter, 0);
    const silu_fn silu = pick_silu();
    for (int t = 0; t < b->T; t++) {
        const float *g = b->out + (size_t)t * 2 * inter;
        silu(g + lo, g + inter + lo, b->act + (size_t)t * inter + lo, hi - lo);
    }
}

/* attention of token t (position pos + t) for every head: (token, head) pairs split between threads */
static void task_attn_batch(void *ctx, int tid, int nth) {
    Batch *b = (Batch *)ctx;
    Model *m = b->m;
    const int D = m->head_dim, group = m->heads / m->kv_heads, pairs = b->T * m->heads;
    const int lo = (int)((long long)pairs * tid / nth), hi = (int)((long long)pairs * (tid + 1) / nth);
    const float scale = 1.f / sqrtf((float)D);
    attn_fn attn = pick_attn();
    float *s = b->scores + (size_t)tid * b->max_tokens;
    for (int p = lo; p < hi; p++) {
        const int t = p / m->heads, h = p % m->heads;
        const size_t base = ((size_t)b->layer * m->kv_heads + h / group) * b->max_tokens * D;
        attn(b->q + (size_t)t * b->qkv_width + (size_t)h * D, b->kc + base, b->vc + base, b->pos + t + 1, D, scale, s,
             b->att + (size_t)t * m->heads * D + (size_t)h * D);
    }
}

static void rope_tables(float theta, int D, int pos, float *cos, float *sin) {
    const int half = D / 2;
    for (int i = 0; i < half; i++) {
        const float inv = 1.f / powf(theta, (float)(2 * i) / (float)D);
        const float f = (float)pos * inv;
        cos[i] = cos[i + half] = cosf(f);
        sin[i] = sin[i + half] = sinf(f);
    }
}

/* scratch of one prompt pass: activations of CHUNK tokens, per-thread weight rows and scores */
typedef struct {
    float *x, *h, *qkv, *att, *gu, *act, *w32, *scores, *rope, *xt;
    size_t w32_floats;
} PromptScratch;

static int prompt_scratch(const Model *m, int nth, int max_tokens, PromptScratch *s) {
    const int H = m->hidden, qkv = (m->heads + 2 * m->kv_heads) * m->head_dim, qn = m->heads * m->head_dim;
    const int widest = H > m->inter ? H : m->inter;
    s->w32_floats = (size_t)PB * (widest > qn ? widest : qn);
    const size_t per_token = (size_t)2 * H + qkv + qn + 2 * (size_t)m->inter + m->inter;
    const size_t xt_floats = (size_t)(widest > qn ? widest : qn) * (CHUNK + 16);
    const size_t floats = CHUNK * per_token + nth * s->w32_floats + (size_t)nth * max_tokens + 2 * (size_t)CHUNK * m->head_dim + xt_floats;
    s->x = malloc(floats * sizeof(float));
    if (!s->x) return -1;
    s->h = s->x + (size_t)CHUNK * H, s->qkv = s->h + (size_t)CHUNK * H, s->att = s->qkv + (size_t)CHUNK * qkv;
    s->gu = s->att + (size_t)CHUNK * qn, s->act = s->gu + (size_t)CHUNK * 2 * m->inter;
    s->w32 = s->act + (size_t)CHUNK * m->inter, s->scores = s->w32 + nth * s->w32_floats;
    s->rope = s->scores + (size_t)nth * max_tokens;
    s->xt = s->rope + 2 * (size_t)CHUNK * m->head_dim;
    return 0;
}

/* tokens [0, T) at positions pos.. through the model in chunks; the logits of the last */
static void run_prompt(Model *m, const int *tokens, int T, int pos, uint16_t *kc, uint16_t *vc, int max_tokens,
                       float theta, float *logits, int nth, PromptScratch *s) {
    const int H = m->hidden, D = m->head_dim, qn = m->heads * D, kn = m->kv_heads * D, width = qn + 2 * kn;
    Batch b = {.m = m, .w32 = s->w32, .w32_floats = s->w32_floats, .kc = kc, .vc = vc, .max_tokens = max_tokens,
               .scores = s->scores, .qkv_width = width, .q = s->qkv, .att = s->att};
    float *cos = s->rope, *sin = s->rope + (size_t)CHUNK * D; /* the chunk's positions, [CHUNK, D] */
    const int lanes = pick_tiles()->lanes;
    for (int c0 = 0; c0 < T; c0 += CHUNK) {
        const int n = T - c0 < CHUNK ? T - c0 : CHUNK, p0 = pos + c0;
        for (int t = 0; t < n; t++)
            for (int i = 0; i < H; i++) s->x[(size_t)t * H + i] = load_value(m->embed_type, m->embed, (size_t)tokens[c0 + t] * H + i);
        for (int t = 0; t < n; t++) rope_tables(theta, D, p0 + t, cos + (size_t)t * D, sin + (size_t)t * D);
        b.T = n, b.pos = p0, b.ldx = (n + lanes - 1) / lanes * lanes, b.xt = s->xt;
        for (int l = 0; l < m->n_layers; l++) {
            const Layer *L = &m->layers[l];
            for (int t = 0; t < n; t++) rms_norm(s->x + (size_t)t * H, L->in_norm, s->h + (size_t)t * H, H, m->eps);
            transpose_inputs(s->h, n, H, s->xt, b.ldx);
            b.mat = &L->qkv, b.out = s->qkv, b.ldo = width, b.add = 0;
            parallel(task_gemm, &b, nth);
            for (int t = 0; t < n; t++) {
                float *row = s->qkv + (size_t)t * width;
                for (int h = 0; h < m->heads + m->kv_heads; h++) rotate(row + (size_t)h * D, cos + (size_t)t * D, sin + (size_t)t * D, D);
                for (int g = 0; g < m->kv_heads; g++) {
                    const size_t at = (((size_t)l * m->kv_heads + g) * max_tokens + p0 + t) * D;
                    for (int d = 0; d < D; d++) {
                        kc[at + d] = f32_to_bf16(row[qn + g * D + d]);
                        vc[at + d] = f32_to_bf16(row[qn + kn + g * D + d]);
                    }
                }
            }
            b.layer = l;
            parallel(task_attn_batch, &b, nth);
            transpose_inputs(s->att, n, qn, s->xt, b.ldx);
            b.mat = &L->o, b.out = s->x, b.ldo = H, b.add = 1;
            parallel(task_gemm, &b, nth);
            for (int t = 0; t < n; t++) rms_norm(s->x + (size_t)t * H, L->post_norm, s->h + (size_t)t * H, H, m->eps);
            transpose_inputs(s->h, n, H, s->xt, b.ldx);
            b.mat = &L->gate_up, b.out = s->gu, b.act = s->act;
            parallel(task_gemm_gate_up, &b, nth);
            transpose_inputs(s->act, n, m->inter, s->xt, b.ldx);
            b.mat = &L->down, b.out = s->x, b.ldo = H, b.add = 1;
            parallel(task_gemm, &b, nth);
        }
    }
    const int last = (T - 1) % CHUNK;
    rms_norm(s->x + (size_t)last * H, m->norm, m->h, H, m->eps);
    Job j = {.m = m};
    product(&j, task_mat, &m->head, m->h, logits, 0, nth);
}

/* ------------------------------------------------------------------ Python interface */

#define CAPSULE "edgepack._native.Model"

static void *as_ptr(PyObject *o) { return o == Py_None ? NULL : PyLong_AsVoidPtr(o); }

static int check_mat(const Mat *m) {
    if (PyErr_Occurred()) return -1;
    const int int4_ok = m->group >= 32 && m->group % 32 == 0 && m->cols % m->group == 0 && m->sz;
    if (m->type < W_INT8 || m->type > W_INT4 || !m->w || m->rows <= 0 || m->cols <= 0 ||
        (m->type == W_INT8 && !m->scale) || (m->type == W_INT4 && !int4_ok)) {
        PyErr_SetString(PyExc_ValueError, "bad matrix description");
        return -1;
    }
    return 0;
}

/* (type, rows, cols, weight, scale, bias[, group]): int4's `scale` is its (scale, zero) pairs */
static int set_mat(Mat *m, PyObject *w, PyObject *s, PyObject *b) {
    m->w = as_ptr(w), m->bias = as_ptr(b);
    m->scale = NULL, m->sz = NULL;
    if (m->type == W_INT4)
        m->sz = as_ptr(s);
    else
        m->scale = as_ptr(s);
    return check_mat(m);
}

static int parse_mat(PyObject *t, Mat *m) {
    PyObject *w, *s, *b;
    m->group = 0;
    if (!PyArg_ParseTuple(t, "iiiOOO|i", &m->type, &m->rows, &m->cols, &w, &s, &b, &m->group)) return -1;
    return set_mat(m, w, s, b);
}

static void free_model(Model *m) {
    if (!m) return;
    free(m->layers);
    free(m->x);
    free(m->prep);
    free(m->scores);
    free(m);
}

static void capsule_free(PyObject *cap) { free_model((Model *)PyCapsule_GetPointer(cap, CAPSULE)); }

/* new(dims, eps, (embed_type, embed), norm, head, layers)
 *   dims = (hidden, heads, kv_heads, head_dim, inter, vocab)
 *   head / a layer's matrices = (type, rows, cols, weight, scale or None, bias or None)
 *   layers = [(in_norm, post_norm, qkv, o, gate_up, down), ...] */
static PyObject *py_new(PyObject *self, PyObject *args) {
    int hidden, heads, kv_heads, head_dim, inter, vocab, embed_type;
    float eps;
    PyObject *embed, *norm, *head, *layers;
    if (!PyArg_ParseTuple(args, "(iiiiii)f(iO)OOO", &hidden, &heads, &kv_heads, &head_dim, &inter, &vocab, &eps,
                          &embed_type, &embed, &norm, &head, &layers))
        return NULL;
    if (hidden <= 0 || heads <= 0 || kv_heads <= 0 || heads % kv_heads || head_dim <= 0 || head_dim % 2 || inter <= 0 ||
        vocab <= 0 || embed_type < W_INT8 + 1 || embed_type > W_F32) {
        PyErr_SetString(PyExc_ValueError, "bad model dimensions");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(layers, "layers must be a sequence");
    if (!seq) return NULL;
    Model *m = calloc(1, sizeof(Model));
    if (!m) goto nomem;
    m->hidden = hidden, m->heads = heads, m->kv_heads = kv_heads, m->head_dim = head_dim, m->inter = inter;
    m->vocab = vocab, m->eps = eps, m->embed_type = embed_type;
    m->n_layers = (int)PySequence_Fast_GET_SIZE(seq);
    m->embed = as_ptr(embed), m->norm = as_ptr(norm);
    if (PyErr_Occurred() || parse_mat(head, &m->head)) goto fail;
    m->layers = calloc(m->n_layers ? m->n_layers : 1, sizeof(Layer));
    const int qkv = (heads + 2 * kv_heads) * head_dim;
    const size_t floats = (size_t)hidden * 2 + qkv + (size_t)heads * head_dim + 2 * (size_t)inter +
                          ((size_t)hidden + inter);
    m->x = malloc(floats * sizeof(float));
    const int widest = hidden > inter ? (hidden > heads * head_dim ? hidden : heads * head_dim)
                                      : (inter > heads * head_dim ? inter : heads * head_dim);
    m->prep = malloc(((size_t)widest + widest / 32 + 1) * sizeof(float));
    if (!m->layers || !m->x || !m->prep) goto nomem;
    m->h = m->x + hidden, m->qkv = m->h + hidden, m->att = m->qkv + qkv, m->gu = m->att + (size_t)heads * head_dim;
    m->tmp = m->gu + 2 * (size_t)inter;
    for (int i = 0; i < m->n_layers; i++) {
        Layer *L = &m->layers[i];
        PyObject *in_norm, *post_norm, *a, *b, *c, *d;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "OOOOOO", &in_norm, &post_norm, &a, &b, &c, &d)) goto fail;
        L->in_norm = as_ptr(in_norm), L->post_norm = as_ptr(post_norm);
        if (PyErr_Occurred() || parse_mat(a, &L->qkv) || parse_mat(b, &L->o) || parse_mat(c, &L->gate_up) ||
            parse_mat(d, &L->down))
            goto fail;
        if (L->qkv.rows != qkv || L->qkv.cols != hidden || L->o.rows != hidden || L->o.cols != heads * head_dim ||
            L->gate_up.rows != 2 * inter || L->gate_up.cols != hidden || L->down.rows != hidden || L->down.cols != inter) {
            PyErr_Format(PyExc_ValueError, "layer %d: matrix shapes do not match the model's dimensions", i);
            goto fail;
        }
    }
    if (m->head.rows != vocab || m->head.cols != hidden || !m->embed || !m->norm) {
        PyErr_SetString(PyExc_ValueError, "head, embedding or norm do not match the model's dimensions");
        goto fail;
    }
    Py_DECREF(seq);
    PyObject *cap = PyCapsule_New(m, CAPSULE, capsule_free);
    if (!cap) free_model(m);
    return cap;
nomem:
    PyErr_NoMemory();
fail:
    Py_DECREF(seq);
    free_model(m);
    return NULL;
}

/* a model's attention weights (heads x max_tokens) grown for a cache of max_tokens; 0 if out
 * of memory (called under step_lock) */
static int grow_scores(Model *m, int max_tokens) {
    if (m->scores_len < max_tokens) {
        float *grown = malloc((size_t)m->heads * max_tokens * sizeof(float));
        if (grown) free(m->scores), m->scores = grown, m->scores_len = max_tokens;
    }
    return m->scores_len >= max_tokens;
}

/* step(model, token, pos, k_cache, v_cache, max_tokens, cos, sin, logits, threads) */
static PyObject *py_step(PyObject *self, PyObject *args) {
    PyObject *cap, *kc, *vc, *cos, *sin, *logits;
    int token, pos, max_tokens, threads;
    if (!PyArg_ParseTuple(args, "OiiOOiOOOi", &cap, &token, &pos, &kc, &vc, &max_tokens, &cos, &sin, &logits, &threads))
        return NULL;
    Model *m = (Model *)PyCapsule_GetPointer(cap, CAPSULE);
    if (!m) return NULL;
    void *k = as_ptr(kc), *v = as_ptr(vc), *c = as_ptr(cos), *s = as_ptr(sin), *out = as_ptr(logits);
    if (PyErr_Occurred()) return NULL;
    if (token < 0 || token >= m->vocab || pos < 0 || pos >= max_tokens || !k || !v || !c || !s || !out) {
        PyErr_Format(PyExc_ValueError, "token %d at position %d is outside the model (vocab %d) or cache (%d)", token, pos,
                     m->vocab, max_tokens);
        return NULL;
    }
    threads = threads < 1 ? 1 : threads;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&step_lock); /* one step at a time: the pool and a model's scratch are shared */
    ok = grow_scores(m, max_tokens);
    ensure_workers(threads - 1);
    if (ok)
        run_step(m, token, pos, (uint16_t *)k, (uint16_t *)v, max_tokens, (const float *)c, (const float *)s, (float *)out,
             threads);
    pthread_mutex_unlock(&step_lock);
    Py_END_ALLOW_THREADS
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* forward(model, tokens, pos, k_cache, v_cache, max_tokens, rope_theta, logits, threads): the
 * tokens (a sequence of ints) at positions pos.. written into the KV cache, the last one's
 * logits into `logits`. One token is a decode step (run_step), more a prompt (run_prompt). */
static PyObject *py_forward(PyObject *self, PyObject *args) {
    PyObject *cap, *seq_in, *kc, *vc, *logits;
    int pos, max_tokens, threads;
    float theta;
    if (!PyArg_ParseTuple(args, "OOiOOifOi", &cap, &seq_in, &pos, &kc, &vc, &max_tokens, &theta, &logits, &threads))
        return NULL;
    Model *m = (Model *)PyCapsule_GetPointer(cap, CAPSULE);
    if (!m) return NULL;
    void *k = as_ptr(kc), *v = as_ptr(vc), *out = as_ptr(logits);
    if (PyErr_Occurred()) return NULL;
    PyObject *seq = PySequence_Fast(seq_in, "tokens must be a sequence of ints");
    if (!seq) return NULL;
    const Py_ssize_t T = PySequence_Fast_GET_SIZE(seq);
    if (T < 1 || pos < 0 || pos + T > max_tokens || !k || !v || !out || !(theta > 0.f)) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "%zd tokens at position %d do not fit a cache of %d", T, pos, max_tokens);
        return NULL;
    }
    int *tokens = malloc((size_t)T * sizeof(int));
    if (!tokens) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < T; i++) {
        const long t = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if ((t == -1 && PyErr_Occurred()) || t < 0 || t >= m->vocab) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "token %ld is outside the vocabulary (%d)", t, m->vocab);
            free(tokens);
            Py_DECREF(seq);
            return NULL;
        }
        tokens[i] = (int)t;
    }
    Py_DECREF(seq);
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&step_lock);
    const int running = ensure_workers(threads - 1); /* this caller + the workers there are */
    threads = running < threads ? running : threads;
    if (T == 1) {
        float rope[2 * 512];
        ok = grow_scores(m, max_tokens) && m->head_dim <= 512;
        if (ok) {
            rope_tables(theta, m->head_dim, pos, rope, rope + m->head_dim);
            run_step(m, tokens[0], pos, (uint16_t *)k, (uint16_t *)v, max_tokens, rope, rope + m->head_dim, (float *)out,
                     threads);
        }
    } else {
        PromptScratch s;
        ok = prompt_scratch(m, threads, max_tokens, &s) == 0;
        if (ok) {
            run_prompt(m, tokens, (int)T, pos, (uint16_t *)k, (uint16_t *)v, max_tokens, theta, (float *)out, threads, &s);
            free(s.x);
        }
    }
    pthread_mutex_unlock(&step_lock);
    Py_END_ALLOW_THREADS
    free(tokens);
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* address(buffer): where a buffer's bytes are (the caller keeps the object alive) */
static PyObject *py_address(PyObject *self, PyObject *obj) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return NULL;
    void *p = view.buf;
    PyBuffer_Release(&view);
    return PyLong_FromVoidPtr(p);
}

static inline uint16_t f32_to_f16(float f) { /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504 */
    if (a < 0x38800000u) {                                   /* float16 subnormal or zero */
        float v;
        memcpy(&v, &a, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(v * 0x1p24f));
    }
    return (uint16_t)(sign | ((a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13));
}

/* n values from type st to dt, each divided by divisor (same index read before written) */
#if EP_X86
T256 static void bf16_to_f16_f16c(const uint16_t *s, uint16_t *d, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i v = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i))), 16);
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_castsi256_ps(v), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; i++) d[i] = f32_to_f16(bf16_to_f32(s[i]));
}
#endif

static void convert_values(const void *s, int st, void *d, int dt, size_t n, float divisor) {
#if EP_X86
    if (st == W_BF16 && dt == W_F16 && divisor == 1.f && isa >= ISA_AVX2) {
        bf16_to_f16_f16c((const uint16_t *)s, (uint16_t *)d, n);
        return;
    }
#endif
    for (size_t i = 0; i < n; i++) {
        const float v = divisor == 1.f ? load_value(st, s, i) : load_value(st, s, i) / divisor;
        if (dt == W_F32)
            ((float *)d)[i] = v;
        else if (dt == W_BF16)
            ((uint16_t *)d)[i] = f32_to_bf16(v);
        else
            ((uint16_t *)d)[i] = f32_to_f16(v);
    }
}

/* convert(src, src_type, dst, dst_type, n[, divisor]): n values between BF16/F16/F32 (in
 * place when the sizes agree), each divided by divisor; False, with nothing written, when
 * a value is too large for float16 */
static PyObject *py_convert(PyObject *self, PyObject *args) {
    PyObject *src, *dst;
    int st, dt;
    Py_ssize_t n;
    float divisor = 1.f;
    if (!PyArg_ParseTuple(args, "OiOin|f", &src, &st, &dst, &dt, &n, &divisor)) return NULL;
    const void *s = as_ptr(src);
    void *d = as_ptr(dst);
    if (PyErr_Occurred()) return NULL;
    if (!s || !d || n < 0 || st < W_BF16 || st > W_F32 || dt < W_BF16 || dt > W_F32) {
        PyErr_SetString(PyExc_ValueError, "convert: bad arguments");
        return NULL;
    }
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    if (dt == W_F16) { /* too large for float16 anywhere: write nothing */
        if (st == W_BF16) { /* |x| orders as the bits without the sign (NaN above inf) */
            uint16_t top = 0;
            const uint16_t *b = (const uint16_t *)s;
#pragma omp simd reduction(max : top)
            for (Py_ssize_t i = 0; i < n; i++) top = (uint16_t)(b[i] & 0x7fffu) > top ? (uint16_t)(b[i] & 0x7fffu) : top;
            ok = bf16_to_f32(top) / divisor < 65504.f;
        } else
            for (Py_ssize_t i = 0; i < n && ok; i++) ok = fabsf(load_value(st, s, i)) / divisor < 65504.f;
    }
    if (ok) convert_values(s, st, d, dt, n, divisor);
    Py_END_ALLOW_THREADS
    if (!ok) Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

/* transpose32(src, rows, cols, dst): dst[c, r] = src[r, c] for 32-bit items (int4's (scale,
 * zero) pairs: stored [groups, rows], read row by row) */
static PyObject *py_transpose32(PyObject *self, PyObject *args) {
    PyObject *src, *dst;
    Py_ssize_t rows, cols;
    if (!PyArg_ParseTuple(args, "OnnO", &src, &rows, &cols, &dst)) return NULL;
    const uint32_t *s = as_ptr(src);
    uint32_t *d = as_ptr(dst);
    if (PyErr_Occurred()) return NULL;
    if (!s || !d || rows < 0 || cols < 0) {
        PyErr_SetString(PyExc_ValueError, "transpose32: bad arguments");
        return NULL;
    }
    for (Py_ssize_t r = 0; r < rows; r++)
        for (Py_ssize_t c = 0; c < cols; c++) d[c * rows + r] = s[r * cols + c];
    Py_RETURN_NONE;
}

typedef struct {
    float p;
    int i;
} Cand;

static int by_p_desc(const void *a, const void *b) {
    const float x = ((const Cand *)a)->p, y = ((const Cand *)b)->p;
    return x < y ? 1 : x > y ? -1 : ((const Cand *)a)->i - ((const Cand *)b)->i;
}

static int by_value_desc(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* sample(logits, n, temperature, top_k, top_p, u): a token drawn with u in [0, 1) from
 * softmax(logits / temperature) restricted to the top_k largest (0: all; ties kept) and then
 * to the smallest most likely set whose mass reaches top_p, as the torch path samples */
static PyObject *py_sample(PyObject *self, PyObject *args) {
    PyObject *p;
    Py_ssize_t n;
    float temperature, top_p;
    int top_k;
    double u;
    if (!PyArg_ParseTuple(args, "Onfifd", &p, &n, &temperature, &top_k, &top_p, &u)) return NULL;
    const float *logits = as_ptr(p);
    if (PyErr_Occurred()) return NULL;
    if (!logits || n <= 0 || !(temperature > 0.f) || top_k < 0 || !(top_p > 0.f && top_p <= 1.f)) {
        PyErr_SetString(PyExc_ValueError, "sample: bad arguments");
        return NULL;
    }
    Cand *c = malloc((size_t)n * sizeof(Cand));
    float *sorted = top_k > 0 && top_k < n ? malloc((size_t)n * sizeof(float)) : NULL;
    if (!c || (top_k > 0 && top_k < n && !sorted)) {
        free(c), free(sorted);
        return PyErr_NoMemory();
    }
    float kth = -INFINITY, top = -INFINITY;
    for (Py_ssize_t i = 0; i < n; i++) top = logits[i] / temperature > top ? logits[i] / temperature : top;
    if (sorted) { /* the k-th largest scaled logit: values below it are dropped */
        for (Py_ssize_t i = 0; i < n; i++) sorted[i] = logits[i] / temperature;
        qsort(sorted, (size_t)n, sizeof(float), by_value_desc);
        kth = sorted[top_k - 1];
        free(sorted);
    }
    Py_ssize_t m = 0;
    double total = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const float v = logits[i] / temperature;
        if (v >= kth && v > -INFINITY) {
            c[m].p = expf(v - top), c[m].i = (int)i;
            total += c[m++].p;
        }
    }
    if (m == 0) { /* every logit -inf: nothing to draw from */
        free(c);
        PyErr_SetString(PyExc_ValueError, "sample: no token has a finite logit");
        return NULL;
    }
    double kept = total;
    if (top_p < 1.f) {
        /* a token whose probability is below (1 - top_p) / (m - 1) cannot be in the top_p set
         * (llama2.c's cut): sort only the others */
        const double cut = m > 1 ? (1.0 - top_p) / (double)(m - 1) * total : 0.0;
        Py_ssize_t k = 0;
        for (Py_ssize_t i = 0; i < m; i++)
            if (c[i].p >= cut) c[k++] = c[i];
        if (k == 0) k = m; /* cannot happen (the largest is >= the mean), kept for safety */
        qsort(c, (size_t)k, sizeof(Cand), by_p_desc);
        double cum = 0.0;
        Py_ssize_t keep = 0;
        while (keep < k && cum < top_p * total) cum += c[keep++].p; /* mass before a token < top_p: kept */
        m = keep, kept = cum;
    }
    double r = u * kept, acc = 0.0;
    int token = c[m - 1].i;
    for (Py_ssize_t i = 0; i < m; i++) {
        acc += c[i].p;
        if (r < acc) {
            token = c[i].i;
            break;
        }
    }
    free(c);
    return PyLong_FromLong(token);
}

/* a task on `threads` threads from Python: the GIL released, one caller of the pool at a time */
static void parallel_without_gil(task_fn task, void *ctx, int threads) {
    threads = threads < 1 ? 1 : threads;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&step_lock);
    ensure_workers(threads - 1);
    parallel(task, ctx, threads);
    pthread_mutex_unlock(&step_lock);
    Py_END_ALLOW_THREADS
}

/* gemv(matrix, x, y, threads): y = W x with the step's kernels (tests, benchmarks); matrix as
 * in new() */
static PyObject *py_gemv(PyObject *self, PyObject *args) {
    Mat mat;
    PyObject *t, *x, *y;
    int threads;
    if (!PyArg_ParseTuple(args, "OOOi", &t, &x, &y, &threads) || parse_mat(t, &mat)) return NULL;
    float *xp = as_ptr(x), *yp = as_ptr(y);
    if (PyErr_Occurred()) return NULL;
    if (!xp || !yp) {
        PyErr_SetString(PyExc_ValueError, "bad matrix description");
        return NULL;
    }
    float *prep = NULL;
    if (mat.type == W_INT4) {
        prep = malloc(((size_t)mat.cols + mat.cols / 32 + 1) * sizeof(float));
        if (!prep) return PyErr_NoMemory();
        prep_int4(&mat, xp, prep);
    }
    Job j = {.mat = &mat, .in = xp, .prep = prep, .out = yp, .add = 0};
    parallel_without_gil(task_mat, &j, threads);
    free(prep);
    Py_RETURN_NONE;
}

/* dequant_int4(codes, pairs, rows, cols, group, out, threads): float32 [rows, cols] weights of
 * an int4 matrix (the prompt path multiplies them in float32 GEMMs) */
typedef struct {
    const Mat *mat;
    float *out;
} Dequant;

static void task_dequant(void *ctx, int tid, int nth) {
    const Dequant *d = (const Dequant *)ctx;
    int lo, hi;
    split(d->mat->rows, tid, nth, &lo, &hi);
    if (hi > lo) int4_rows_f32(d->mat, lo, hi, d->out + (size_t)lo * d->mat->cols);
}

static PyObject *py_dequant_int4(PyObject *self, PyObject *args) {
    Mat mat = {.type = W_INT4};
    PyObject *w, *s, *o;
    int threads;
    if (!PyArg_ParseTuple(args, "OOiiiOi", &w, &s, &mat.rows, &mat.cols, &mat.group, &o, &threads) ||
        set_mat(&mat, w, s, Py_None))
        return NULL;
    Dequant d = {&mat, as_ptr(o)};
    if (PyErr_Occurred()) return NULL;
    if (!d.out) {
        PyErr_SetString(PyExc_ValueError, "bad matrix description");
        return NULL;
    }
    parallel_without_gil(task_dequant, &d, threads);
    Py_RETURN_NONE;
}

/* argmax(values, n): the index of the first largest of n float32 values (NaN counts as
 * largest, as in torch.argmax), on the calling thread: no torch thread pool woken per token */
static PyObject *py_argmax(PyObject *self, PyObject *args) {
    PyObject *p;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "On", &p, &n)) return NULL;
    const float *v = as_ptr(p);
    if (PyErr_Occurred()) return NULL;
    if (!v || n <= 0) {
        PyErr_SetString(PyExc_ValueError, "argmax of nothing");
        return NULL;
    }
    float top = v[0];
#pragma omp simd reduction(max : top)
    for (Py_ssize_t i = 0; i < n; i++) top = v[i] > top ? v[i] : top;
    int nan = 0;
#pragma omp simd reduction(| : nan)
    for (Py_ssize_t i = 0; i < n; i++) nan |= v[i] != v[i];
    for (Py_ssize_t i = 0; i < n; i++)
        if (nan ? v[i] != v[i] : v[i] == top) return PyLong_FromSsize_t(i);
    return PyLong_FromSsize_t(0);
}

/* profile(on=None): {part: seconds} summed over the steps since the clock was turned on,
 * plus "steps"; on=True/False turns it on (and resets) / off */
static PyObject *py_profile(PyObject *self, PyObject *args) {
    PyObject *on = Py_None;
    if (!PyArg_ParseTuple(args, "|O", &on)) return NULL;
    PyObject *out = PyDict_New();
    if (!out) return NULL;
    for (int i = 0; i < P_PARTS; i++) {
        PyObject *v = PyFloat_FromDouble(part_seconds[i]);
        if (!v || PyDict_SetItemString(out, PART_NAMES[i], v)) {
            Py_XDECREF(v);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(v);
    }
    PyObject *steps = PyLong_FromLong(profiled_steps);
    if (!steps || PyDict_SetItemString(out, "steps", steps)) {
        Py_XDECREF(steps);
        Py_DECREF(out);
        return NULL;
    }
    Py_DECREF(steps);
    if (on != Py_None) {
        pthread_mutex_lock(&step_lock);
        profiling = PyObject_IsTrue(on);
        memset(part_seconds, 0, sizeof part_seconds);
        profiled_steps = 0;
        pthread_mutex_unlock(&step_lock);
    }
    return out;
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name = NULL;
    if (!PyArg_ParseTuple(args, "|z", &name)) return NULL;
    const char *previous = ISA_NAMES[isa];
    if (name) {
        int want = -1;
        for (int i = 0; i < 3; i++)
            if (!strcmp(name, ISA_NAMES[i])) want = i;
        if (want < 0 || want > isa_best) {
            PyErr_Format(PyExc_ValueError, "instruction set %s is not available here (best: %s)", name, ISA_NAMES[isa_best]);
            return NULL;
        }
        isa = want;
    }
    return PyUnicode_FromString(previous);
}

static PyMethodDef methods[] = {
    {"new", py_new, METH_VARARGS, "Describe a model to the step kernel (pointers into live tensors)."},
    {"step", py_step, METH_VARARGS, "One decode step: writes the KV cache at pos and the logits."},
    {"forward", py_forward, METH_VARARGS, "Tokens through the model (a prompt or one step): KV cache and last logits."},
    {"sample", py_sample, METH_VARARGS, "A token drawn from logits with temperature, top-k and top-p."},
    {"address", py_address, METH_O, "Where a buffer's bytes are."},
    {"convert", py_convert, METH_VARARGS, "Values between bfloat16, float16 and float32."},
    {"transpose32", py_transpose32, METH_VARARGS, "Transpose a matrix of 32-bit items."},
    {"gemv", py_gemv, METH_VARARGS, "y = W x with the step's kernels."},
    {"dequant_int4", py_dequant_int4, METH_VARARGS, "float32 weights of an int4 matrix."},
    {"argmax", py_argmax, METH_VARARGS, "Index of the largest float32 value."},
    {"profile", py_profile, METH_VARARGS, "Seconds per part of the step: profile(True) starts, profile() reads."},
    {"set_isa", py_set_isa, METH_VARARGS, "Kernels to use ('generic', 'avx2', 'avx512'); returns the previous."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
#if EP_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
        isa_best = ISA_AVX512;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        isa_best = ISA_AVX2;
#endif
    isa = isa_best;
    pthread_atfork(NULL, NULL, after_fork_child);
    PyObject *mod = PyModule_Create(&module);
    if (mod) {
        PyModule_AddIntConstant(mod, "INT8", W_INT8);
        PyModule_AddIntConstant(mod, "BF16", W_BF16);
        PyModule_AddIntConstant(mod, "F16", W_F16);
        PyModule_AddIntConstant(mod, "F32", W_F32);
        PyModule_AddIntConstant(mod, "INT4", W_INT4);
        PyModule_AddIntConstant(mod, "MAX_THREADS", MAX_THREADS);
        PyModule_AddIntConstant(mod, "PROMPT_CHUNK", CHUNK); /* the planner mirrors these two */
        PyModule_AddIntConstant(mod, "PROMPT_ROWS", PB);
    }
    return mod;
}
