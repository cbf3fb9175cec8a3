/* Dot-product kernels (ARMv8.2 sdot: Raspberry Pi 5's Cortex-A76, Jetson Orin's A78AE) for
 * the two integer weight types; everything else is the NEON set's (neon.c).
 *
 * sdot multiplies 16 signed bytes by 16 and adds each 4 products into a 32-bit lane, so the
 * activations must be integers too. Rounded to 8 bits (as llama.cpp's Q8_0, there per block
 * of 32) they miss the engine's 1e-4 logit bound 190-330x (1.9e-2 int8, 3.3e-2 int4 on
 * tests/arm's model), at 16 bits (two bytes) they come within 0.9-1.4x of it. So activations are rounded
 * to 24 bits, float32's precision: x ~ d (65536 hi + 256 mid + lo), three signed bytes, d =
 * max|x| / 8355711 over a span (int8 rows: 128 inputs; int4: a block of 32, each group having
 * its own scale anyway), and each weight meets all three: three sdots where Q8_0 spends one,
 * logits as the float kernels give them (2.3e-6 int8, 9.9e-7 int4). Per 64 weights the
 * inner loops spend 22.9 instructions (int8) and 39.3 (int4, group 32), the NEON set's 51.9
 * and 67.5 (tests/arm/loops.py). */
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

/* max |x| over 32 activations (16 from a, 16 from b) */
static inline __attribute__((always_inline)) float block_amax(const float *a, const float *b) {
    float32x4_t m = vabsq_f32(vld1q_f32(a));
    for (int i = 1; i < 4; i++) m = vmaxq_f32(m, vabsq_f32(vld1q_f32(a + 4 * i)));
    for (int i = 0; i < 4; i++) m = vmaxq_f32(m, vabsq_f32(vld1q_f32(b + 4 * i)));
    return vmaxvq_f32(m);
}

/* the digits of 32 activations (16 from a, 16 from b) at q: 32 hi, 32 mid, 32 lo bytes,
 * x ~ d (65536 hi + 256 mid + lo) with d = amax / ACT_LEVELS / ACT_UNIT, each a balanced
 * base-256 digit in [-128, 127]; amax: the largest |x| of the span sharing d */
static inline __attribute__((always_inline)) void quant_block(const float *a, const float *b, float amax, int8_t *q) {
    const float inv = amax > 0.f ? ACT_LEVELS / amax : 0.f;
    const int32x4_t half = vdupq_n_s32(128), byte = vdupq_n_s32(255), top = vdupq_n_s32((int)ACT_LEVELS);
    for (int i = 0; i < 8; i += 2) {
        int32x4_t h[2], md[2], l[2];
        for (int j = 0; j < 2; j++) {
            const float32x4_t v = vld1q_f32(i + j < 4 ? a + 4 * (i + j) : b + 4 * (i + j - 4));
            /* the largest |x| times inv may round one past ACT_LEVELS */
            const int32x4_t r = vcvtnq_s32_f32(vmulq_n_f32(v, inv));
            const int32x4_t x = vmulq_n_s32(vmaxq_s32(vminq_s32(r, top), vnegq_s32(top)), ACT_UNIT);
            l[j] = vsubq_s32(vandq_s32(vaddq_s32(x, half), byte), half);
            const int32x4_t x1 = vshrq_n_s32(vsubq_s32(x, l[j]), 8);
            md[j] = vsubq_s32(vandq_s32(vaddq_s32(x1, half), byte), half);
            h[j] = vshrq_n_s32(vsubq_s32(x1, md[j]), 8);
        }
        vst1_s8(q + 4 * i, vmovn_s16(vcombine_s16(vmovn_s32(h[0]), vmovn_s32(h[1]))));
        vst1_s8(q + 32 + 4 * i, vmovn_s16(vcombine_s16(vmovn_s32(md[0]), vmovn_s32(md[1]))));
        vst1_s8(q + 64 + 4 * i, vmovn_s16(vcombine_s16(vmovn_s32(l[0]), vmovn_s32(l[1]))));
    }
}

/* One block's activation digits in six registers, shared by the rows of a pass */
typedef struct {
    int8x16_t h0, h1, m0, m1, l0, l1;
} Digits;
static inline __attribute__((always_inline)) Digits digits(const int8_t *q) {
    return (Digits){vld1q_s8(q), vld1q_s8(q + 16), vld1q_s8(q + 32), vld1q_s8(q + 48), vld1q_s8(q + 64),
                    vld1q_s8(q + 80)};
}

/* a block's sum of w x / d in 4 float lanes: (sum w hi) 65536 + (sum w mid) 256 + sum w lo.
 * The last two join in 32 bits (|sum w mid| <= 32 x 127 x 128 < 2^19: x 256 fits; x 65536
 * would not), so two chains a row start from zero, not three. */
DP static inline __attribute__((always_inline)) float32x4_t dot32(int8x16_t w0, int8x16_t w1, Digits q) {
    const int32x4_t z = vdupq_n_s32(0);
    const int32x4_t h = vdotq_s32(vdotq_s32(z, w0, q.h0), w1, q.h1);
    const int32x4_t ml = vshlq_n_s32(vdotq_s32(vdotq_s32(z, w0, q.m0), w1, q.m1), 8);
    const int32x4_t l = vdotq_s32(vdotq_s32(ml, w0, q.l0), w1, q.l1);
    return vfmaq_n_f32(vcvtq_f32_s32(l), vcvtq_f32_s32(h), 65536.f);
}

/* int8 rows: activations share d over spans of SPAN blocks (128 inputs), so a row's three
 * digit sums stay in 32-bit chains over the span (|sum w mid| <= 128 x 127 x 128 < 2^21:
 * x 256 fits; x 65536 would not) and meet d once a span: per 128 weights a row spends 4
 * load pairs and 24 sdots, then 3 zeroings, a multiply-add, 2 conversions and 2 FMAs. Four
 * rows a pass share each block's digit loads. */
#define SPAN 4
#define DP_ZERO(i) int32x4_t h##i = vdupq_n_s32(0), m##i = h##i, l##i = h##i
#define DP_ROW(i, p)                                                       \
    {                                                                      \
        const int8x16_t w0 = vld1q_s8(p), w1 = vld1q_s8((p) + 16);         \
        h##i = vdotq_s32(vdotq_s32(h##i, w0, a.h0), w1, a.h1);             \
        m##i = vdotq_s32(vdotq_s32(m##i, w0, a.m0), w1, a.m1);             \
        l##i = vdotq_s32(vdotq_s32(l##i, w0, a.l0), w1, a.l1);             \
    }
#define DP_JOIN(i, dv) \
    f##i = vfmaq_n_f32(f##i, vfmaq_n_f32(vcvtq_f32_s32(vmlaq_n_s32(l##i, m##i, 256)), vcvtq_f32_s32(h##i), 65536.f), dv)

DP void gemv_int8_dotprod(const void *W, const float *x, int K, int r0, int r1, float *y) {
    if (K > DP_MAX_K) {
        kernels_neon.gemv[W_INT8](W, x, K, r0, r1, y);
        return;
    }
    const int nb = K / 32, kq = nb * 32, ns = (nb + SPAN - 1) / SPAN;
    int8_t q[3 * kq + 1];
    float d[ns + 1];
    for (int sp = 0; sp < ns; sp++) {
        const int b0 = sp * SPAN, b1 = b0 + SPAN < nb ? b0 + SPAN : nb;
        float amax = 0.f;
        for (int bk = b0; bk < b1; bk++) amax = fmaxf(amax, block_amax(x + 32 * bk, x + 32 * bk + 16));
        for (int bk = b0; bk < b1; bk++) quant_block(x + 32 * bk, x + 32 * bk + 16, amax, q + 96 * bk);
        d[sp] = amax / ACT_LEVELS / ACT_UNIT;
    }
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        const int8_t *p0 = (const int8_t *)W + (size_t)r * K, *p1 = p0 + K, *p2 = p1 + K, *p3 = p2 + K;
        float32x4_t f0 = vdupq_n_f32(0.f), f1 = f0, f2 = f0, f3 = f0;
        const int8_t *qb = q;
        for (int sp = 0; sp < ns; sp++) {
            DP_ZERO(0);
            DP_ZERO(1);
            DP_ZERO(2);
            DP_ZERO(3);
            const int n = sp < ns - 1 ? SPAN : nb - sp * SPAN;
            for (int j = 0; j < n; j++, qb += 96, p0 += 32, p1 += 32, p2 += 32, p3 += 32) {
                if (EP_PF && !(j & 1)) { /* a 64-byte line a row every other block */
                    __builtin_prefetch(p0 + EP_PF), __builtin_prefetch(p1 + EP_PF);
                    __builtin_prefetch(p2 + EP_PF), __builtin_prefetch(p3 + EP_PF);
                }
                const Digits a = digits(qb);
                DP_ROW(0, p0);
                DP_ROW(1, p1);
                DP_ROW(2, p2);
                DP_ROW(3, p3);
                __asm__ volatile("" ::: "memory"); /* the next block's loads stay after these sums */
            }
            DP_JOIN(0, d[sp]);
            DP_JOIN(1, d[sp]);
            DP_JOIN(2, d[sp]);
            DP_JOIN(3, d[sp]);
        }
        p0 -= kq, p1 -= kq, p2 -= kq, p3 -= kq;
        float s0 = vaddvq_f32(f0), s1 = vaddvq_f32(f1), s2 = vaddvq_f32(f2), s3 = vaddvq_f32(f3);
        for (int k = kq; k < K; k++) s0 += p0[k] * x[k], s1 += p1[k] * x[k], s2 += p2[k] * x[k], s3 += p3[k] * x[k];
        y[r] = s0, y[r + 1] = s1, y[r + 2] = s2, y[r + 3] = s3;
    }
    for (; r < r1; r++) {
        const int8_t *p0 = (const int8_t *)W + (size_t)r * K;
        float32x4_t f0 = vdupq_n_f32(0.f);
        const int8_t *qb = q;
        for (int sp = 0; sp < ns; sp++) {
            DP_ZERO(0);
            const int n = sp < ns - 1 ? SPAN : nb - sp * SPAN;
            for (int j = 0; j < n; j++, qb += 96, p0 += 32) {
                if (EP_PF) __builtin_prefetch(p0 + EP_PF);
                const Digits a = digits(qb);
                DP_ROW(0, p0);
            }
            DP_JOIN(0, d[sp]);
        }
        p0 -= kq;
        float s0 = vaddvq_f32(f0);
        for (int k = kq; k < K; k++) s0 += p0[k] * x[k];
        y[r] = s0;
    }
}

/* int4 rows: a block of 32 codes is 16 bytes, low nibbles (even inputs) by mask, high ones
 * (odd inputs) by shift, each already a signed byte 0..15; so each block of the input, as
 * prep_int4 made it, is rounded from its 16 even and 16 odd values. Four rows a pass: their
 * groups' (s, z) pairs gathered into one register, so a group's scales (s d) and constant
 * ((z - 8 s) times the group's input sum, as in kernels.h) take a few instructions for all
 * four rows. */
static inline __attribute__((always_inline)) uint32x4_t pairs4(const uint16_t *sz, size_t stride, int g) {
    uint32x4_t v = vld1q_dup_u32((const uint32_t *)(sz + 2 * g));
    v = vld1q_lane_u32((const uint32_t *)(sz + stride + 2 * g), v, 1);
    v = vld1q_lane_u32((const uint32_t *)(sz + 2 * stride + 2 * g), v, 2);
    return vld1q_lane_u32((const uint32_t *)(sz + 3 * stride + 2 * g), v, 3);
}
#define DP_NIBBLES(p, k, even, odd)                                                   \
    const uint8x16_t even##_v = vld1q_u8((p) + (k));                                  \
    const int8x16_t even = vreinterpretq_s8_u8(vandq_u8(even##_v, nib));               \
    const int8x16_t odd = vreinterpretq_s8_u8(vshrq_n_u8(even##_v, 4))

/* group g's scales of the four rows: s (bfloat16, the low half of each pair: float32 by
 * shift) and z (the high half: by mask); the constant (z - 8 s) times the input sum */
#define DP_INT4_GROUP(g)                                                                   \
    const uint32x4_t pr = pairs4(sz, stride, g);                                           \
    const float32x4_t s = vreinterpretq_f32_u32(vshlq_n_u32(pr, 16));                      \
    const float32x4_t z = vreinterpretq_f32_u32(vandq_u32(pr, vdupq_n_u32(0xffff0000u)));  \
    cst = vfmaq_n_f32(cst, vfmaq_n_f32(z, s, -8.f), xs[g])
#define DP_INT4_BLOCK(bk)                                                   \
    {                                                                       \
        const Digits a = digits(q + 96 * (bk));                             \
        const float32x4_t sd = vmulq_n_f32(s, d[bk]);                       \
        const int k = 16 * (bk);                                            \
        DP_NIBBLES(c0, k, e0, o0);                                          \
        f0 = vfmaq_laneq_f32(f0, dot32(e0, o0, a), sd, 0);                  \
        DP_NIBBLES(c1, k, e1, o1);                                          \
        f1 = vfmaq_laneq_f32(f1, dot32(e1, o1, a), sd, 1);                  \
        DP_NIBBLES(c2, k, e2, o2);                                          \
        f2 = vfmaq_laneq_f32(f2, dot32(e2, o2, a), sd, 2);                  \
        DP_NIBBLES(c3, k, e3, o3);                                          \
        f3 = vfmaq_laneq_f32(f3, dot32(e3, o3, a), sd, 3);                  \
    }

/* Groups of 32 four at a time: row i's four (s, z) pairs are one 16-byte load, so its
 * scales times d (sd_i) and its constants (c_is, one lane a group) take six instructions
 * for four blocks; block j of the four then meets lane j of each row's sd */
#define DP_INT4_ROW4(i, g)                                                                        \
    float32x4_t sd##i;                                                                            \
    {                                                                                             \
        const uint32x4_t pr = vld1q_u32((const uint32_t *)(sz + (i) * stride + 2 * (g)));         \
        const float32x4_t s = vreinterpretq_f32_u32(vshlq_n_u32(pr, 16));                         \
        const float32x4_t z = vreinterpretq_f32_u32(vandq_u32(pr, vdupq_n_u32(0xffff0000u)));     \
        c##i##s = vfmaq_f32(c##i##s, vfmaq_n_f32(z, s, -8.f), x4);                                \
        sd##i = vmulq_f32(s, d4);                                                                 \
    }
#define DP_INT4_BLOCK_LANE(bk, j)                                           \
    {                                                                       \
        const Digits a = digits(q + 96 * (bk));                             \
        const int k = 16 * (bk);                                            \
        DP_NIBBLES(c0, k, e0, o0);                                          \
        f0 = vfmaq_laneq_f32(f0, dot32(e0, o0, a), sd0, j);                 \
        DP_NIBBLES(c1, k, e1, o1);                                          \
        f1 = vfmaq_laneq_f32(f1, dot32(e1, o1, a), sd1, j);                 \
        DP_NIBBLES(c2, k, e2, o2);                                          \
        f2 = vfmaq_laneq_f32(f2, dot32(e2, o2, a), sd2, j);                 \
        DP_NIBBLES(c3, k, e3, o3);                                          \
        f3 = vfmaq_laneq_f32(f3, dot32(e3, o3, a), sd3, j);                 \
        __asm__ volatile("" ::: "memory"); /* the next block's loads after these sums */ \
    }

DP void int4_rows_dotprod(const Mat *m, const float *prep, int r0, int r1, float *y) {
    const int K = m->cols, half = K / 2, G = m->group, ng = K / G, per = G / 32, nb = K / 32;
    if (K > DP_MAX_K) {
        kernels_neon.int4(m, prep, r0, r1, y);
        return;
    }
    const float *xe = prep, *xo = prep + half, *xs = prep + K;
    int8_t q[3 * K];
    float d[nb];
    for (int bk = 0; bk < nb; bk++) {
        const float amax = block_amax(xe + 16 * bk, xo + 16 * bk);
        quant_block(xe + 16 * bk, xo + 16 * bk, amax, q + 96 * bk);
        d[bk] = amax / ACT_LEVELS / ACT_UNIT;
    }
    const uint8x16_t nib = vdupq_n_u8(15);
    const size_t stride = (size_t)ng * 2; /* a row's (s, z) pairs, in uint16 */
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        const uint8_t *restrict c0 = (const uint8_t *)m->w + (size_t)r * half, *restrict c1 = c0 + half;
        const uint8_t *restrict c2 = c1 + half, *restrict c3 = c2 + half;
        const uint16_t *sz = m->sz + (size_t)r * stride;
        prefetch_row(c0, 4 * (size_t)half);
        prefetch_row(sz, 4 * stride * 2);
        float32x4_t f0 = vdupq_n_f32(0.f), f1 = f0, f2 = f0, f3 = f0, cst = f0;
        if (per == 1) { /* the default group of 32: a block a group, four groups a pass */
            float32x4_t c0s = cst, c1s = cst, c2s = cst, c3s = cst;
            int g = 0;
            for (; g + 4 <= ng; g += 4) {
                const float32x4_t x4 = vld1q_f32(xs + g), d4 = vld1q_f32(d + g);
                DP_INT4_ROW4(0, g);
                DP_INT4_ROW4(1, g);
                DP_INT4_ROW4(2, g);
                DP_INT4_ROW4(3, g);
                DP_INT4_BLOCK_LANE(g, 0);
                DP_INT4_BLOCK_LANE(g + 1, 1);
                DP_INT4_BLOCK_LANE(g + 2, 2);
                DP_INT4_BLOCK_LANE(g + 3, 3);
            }
            cst = vsetq_lane_f32(vaddvq_f32(c0s), cst, 0), cst = vsetq_lane_f32(vaddvq_f32(c1s), cst, 1);
            cst = vsetq_lane_f32(vaddvq_f32(c2s), cst, 2), cst = vsetq_lane_f32(vaddvq_f32(c3s), cst, 3);
            for (; g < ng; g++) {
                DP_INT4_GROUP(g);
                DP_INT4_BLOCK(g);
            }
        } else
            for (int g = 0; g < ng; g++) {
                DP_INT4_GROUP(g);
                for (int bk = g * per; bk < (g + 1) * per; bk++) DP_INT4_BLOCK(bk);
            }
        y[r] = vaddvq_f32(f0) + vgetq_lane_f32(cst, 0), y[r + 1] = vaddvq_f32(f1) + vgetq_lane_f32(cst, 1);
        y[r + 2] = vaddvq_f32(f2) + vgetq_lane_f32(cst, 2), y[r + 3] = vaddvq_f32(f3) + vgetq_lane_f32(cst, 3);
    }
    for (; r < r1; r++) {
        const uint8_t *c = (const uint8_t *)m->w + (size_t)r * half;
        const uint16_t *sz = m->sz + (size_t)r * stride;
        prefetch_row(c, half);
        prefetch_row(sz, stride * 2);
        float32x4_t acc = vdupq_n_f32(0.f);
        float cst = 0.f;
        for (int g = 0; g < ng; g++) {
            const float s = bf16_to_f32(sz[2 * g]), z = bf16_to_f32(sz[2 * g + 1]);
            for (int bk = g * per; bk < (g + 1) * per; bk++) {
                DP_NIBBLES(c, 16 * bk, even, odd);
                acc = vfmaq_n_f32(acc, dot32(even, odd, digits(q + 96 * bk)), s * d[bk]);
            }
            cst += (z - 8.f * s) * xs[g];
        }
        y[r] = vaddvq_f32(acc) + cst;
    }
}

#endif
