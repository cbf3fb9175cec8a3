/* Dot-product kernels (ARMv8.2 sdot: Raspberry Pi 5's Cortex-A76, Jetson Orin's A78AE) for
 * the two integer weight types; everything else is the NEON set's (neon.c).
 *
 * sdot multiplies 16 signed bytes by 16 and adds each 4 products into a 32-bit lane, so the
 * activations must be integers too. Rounded to 8 bits per block of 32 (llama.cpp's Q8_0)
 * they miss the engine's 1e-4 logit bound 170-330x (1.7e-2, 3.3e-2 on tests/arm's model),
 * at 16 bits (two bytes) still 1.2-1.4x. So each block of 32 activations is rounded to 24
 * bits, float32's precision: x ~ d (65536 hi + 256 mid + lo), three signed bytes, d = max|x|
 * / 8355711, and each weight meets all three: three sdots where Q8_0 spends one, logits as
 * the float kernels give them (2.3e-6 int8, 9.9e-7 int4). Still half the float path's
 * instructions per weight (no widening, no conversion per weight). */
#include "../../kernels.h"

#if EP_ARM
#include <arm_neon.h>

#if defined(__clang__)
#define DP __attribute__((target("dotprod")))
#else
#define DP __attribute__((target("arch=armv8.2-a+dotprod")))
#endif

/* activations longer than this (stack bytes 3 K + K / 8) take the float kernels */
#define DP_MAX_K 16384
/* Bits each activation is rounded to: 24, three signed bytes, is float32's precision. A
 * build flag so that tests/arm can measure the others: 8 is llama.cpp's Q8_0, 16 two bytes. */
#ifndef EP_ACT_BITS
#define EP_ACT_BITS 24
#endif
#if EP_ACT_BITS == 8
#define ACT_LEVELS 127.f /* the largest |q| before the unused low bytes */
#define ACT_UNIT 65536
#elif EP_ACT_BITS == 16
#define ACT_LEVELS 32639.f /* 127 x 256 + 127 */
#define ACT_UNIT 256
#else
#define ACT_LEVELS 8355711.f /* 127 x 65536 + 127 x 256 + 127: every byte fits a signed one */
#define ACT_UNIT 1
#endif

/* the bytes of 32 activations (16 from a, 16 from b): x ~ d (65536 hi + 256 mid + lo),
 * each a balanced base-256 digit in [-128, 127] */
typedef struct {
    int8_t *hi, *mid, *lo;
    float *d;
} Act;

static inline __attribute__((always_inline)) void quant_block(const float *a, const float *b, Act q, int bk) {
    float32x4_t v[8];
    for (int i = 0; i < 4; i++) v[i] = vld1q_f32(a + 4 * i), v[4 + i] = vld1q_f32(b + 4 * i);
    float32x4_t m = vabsq_f32(v[0]);
    for (int i = 1; i < 8; i++) m = vmaxq_f32(m, vabsq_f32(v[i]));
    const float amax = vmaxvq_f32(m), inv = amax > 0.f ? ACT_LEVELS / amax : 0.f;
    q.d[bk] = amax / ACT_LEVELS / ACT_UNIT;
    const int32x4_t half = vdupq_n_s32(128), byte = vdupq_n_s32(255), top = vdupq_n_s32((int)ACT_LEVELS);
    for (int i = 0; i < 8; i += 2) {
        int32x4_t h[2], md[2], l[2];
        for (int j = 0; j < 2; j++) {
            /* the largest |x| times inv may round one past ACT_LEVELS */
            const int32x4_t r = vcvtnq_s32_f32(vmulq_n_f32(v[i + j], inv));
            const int32x4_t x = vmulq_n_s32(vmaxq_s32(vminq_s32(r, top), vnegq_s32(top)), ACT_UNIT);
            l[j] = vsubq_s32(vandq_s32(vaddq_s32(x, half), byte), half);
            const int32x4_t x1 = vshrq_n_s32(vsubq_s32(x, l[j]), 8);
            md[j] = vsubq_s32(vandq_s32(vaddq_s32(x1, half), byte), half);
            h[j] = vshrq_n_s32(vsubq_s32(x1, md[j]), 8);
        }
        const int at = 32 * bk + 4 * i;
        vst1_s8(q.hi + at, vmovn_s16(vcombine_s16(vmovn_s32(h[0]), vmovn_s32(h[1]))));
        vst1_s8(q.mid + at, vmovn_s16(vcombine_s16(vmovn_s32(md[0]), vmovn_s32(md[1]))));
        vst1_s8(q.lo + at, vmovn_s16(vcombine_s16(vmovn_s32(l[0]), vmovn_s32(l[1]))));
    }
}

/* sum over block bk of w * (65536 hi + 256 mid + lo), in 4 float lanes (times d: the caller) */
DP static inline __attribute__((always_inline)) float32x4_t dot32(int8x16_t w0, int8x16_t w1, Act q, int bk) {
    const int32x4_t z = vdupq_n_s32(0);
    const int8_t *hi = q.hi + 32 * bk, *mid = q.mid + 32 * bk, *lo = q.lo + 32 * bk;
    const int32x4_t h = vdotq_s32(vdotq_s32(z, w0, vld1q_s8(hi)), w1, vld1q_s8(hi + 16));
    const int32x4_t md = vdotq_s32(vdotq_s32(z, w0, vld1q_s8(mid)), w1, vld1q_s8(mid + 16));
    const int32x4_t l = vdotq_s32(vdotq_s32(z, w0, vld1q_s8(lo)), w1, vld1q_s8(lo + 16));
    const int32x4_t top = vmlaq_n_s32(md, h, 256); /* |h| <= 32 x 127 x 128: x 256 fits 32 bits, x 65536 would not */
    return vfmaq_n_f32(vcvtq_f32_s32(l), vcvtq_f32_s32(top), 256.f);
}

/* int8 rows: 4 at a time share the activations' loads; per block of 32 weights a row spends
 * 2 loads, 6 sdots, a multiply-add and an FMA to join the bytes, two conversions and an FMA with d */
#define EP_DP_RUN(NR)                                                                          \
    {                                                                                          \
        float32x4_t f[NR];                                                                     \
        for (int i = 0; i < NR; i++) f[i] = vdupq_n_f32(0.f);                                  \
        for (int bk = 0; bk < nb; bk++) {                                                      \
            for (int i = 0; i < NR; i++) {                                                     \
                const int8_t *w = (const int8_t *)W + (size_t)(r + i) * K + 32 * bk;           \
                if (EP_PF) __builtin_prefetch(w + EP_PF);                                      \
                f[i] = vfmaq_n_f32(f[i], dot32(vld1q_s8(w), vld1q_s8(w + 16), q, bk), q.d[bk]);  \
            }                                                                                  \
        }                                                                                      \
        for (int i = 0; i < NR; i++) {                                                         \
            float sum = vaddvq_f32(f[i]);                                                      \
            for (int k = kq; k < K; k++) sum += (float)((const int8_t *)W)[(size_t)(r + i) * K + k] * x[k]; \
            y[r + i] = sum;                                                                    \
        }                                                                                      \
    }

DP void gemv_int8_dotprod(const void *W, const float *x, int K, int r0, int r1, float *y) {
    if (K > DP_MAX_K) {
        kernels_neon.gemv[W_INT8](W, x, K, r0, r1, y);
        return;
    }
    const int nb = K / 32, kq = nb * 32;
    int8_t bytes[3 * kq + 1];
    float d[nb + 1];
    const Act q = {bytes, bytes + kq, bytes + 2 * kq, d};
    for (int bk = 0; bk < nb; bk++) quant_block(x + 32 * bk, x + 32 * bk + 16, q, bk);
    int r = r0;
    for (; r + 4 <= r1; r += 4) EP_DP_RUN(4)
    for (; r < r1; r++) EP_DP_RUN(1)
}

/* int4 rows: a block of 32 codes is 16 bytes, low nibbles (even inputs) by mask, high ones
 * (odd inputs) by shift, each already a signed byte 0..15; so each block of the input, as
 * prep_int4 made it, is rounded from its 16 even and 16 odd values. The group's scale s
 * multiplies the block sums; (z - 8 s) meets the group's float sum of inputs, as in
 * kernels.h. */
DP void int4_rows_dotprod(const Mat *m, const float *prep, int r0, int r1, float *y) {
    const int K = m->cols, half = K / 2, G = m->group, ng = K / G, per = G / 32, nb = K / 32;
    if (K > DP_MAX_K) {
        kernels_neon.int4(m, prep, r0, r1, y);
        return;
    }
    const float *xe = prep, *xo = prep + half, *xs = prep + K;
    int8_t bytes[3 * K];
    float d[nb];
    const Act q = {bytes, bytes + K, bytes + 2 * K, d};
    for (int bk = 0; bk < nb; bk++) quant_block(xe + 16 * bk, xo + 16 * bk, q, bk);
    const uint8x16_t nib = vdupq_n_u8(15);
    for (int r = r0; r < r1; r++) {
        const uint8_t *c = (const uint8_t *)m->w + (size_t)r * half;
        const uint16_t *sz = m->sz + (size_t)r * ng * 2;
        prefetch_row(c, half);
        prefetch_row(sz, (size_t)ng * 4);
        float32x4_t acc = vdupq_n_f32(0.f);
        float cst = 0.f;
        for (int g = 0; g < ng; g++) {
            const float s = bf16_to_f32(sz[2 * g]), z = bf16_to_f32(sz[2 * g + 1]);
            for (int bk = g * per; bk < (g + 1) * per; bk++) {
                const uint8x16_t v = vld1q_u8(c + 16 * bk);
                const int8x16_t even = vreinterpretq_s8_u8(vandq_u8(v, nib)), odd = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
                acc = vfmaq_n_f32(acc, dot32(even, odd, q, bk), s * d[bk]);
            }
            cst += (z - 8.f * s) * xs[g];
        }
        y[r] = vaddvq_f32(acc) + cst;
    }
}

#endif
