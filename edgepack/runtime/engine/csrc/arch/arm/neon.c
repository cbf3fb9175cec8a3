/* NEON kernels (every aarch64 CPU: Raspberry Pi 4's Cortex-A72 on): 4 float32 lanes, 32
 * registers. Float and int4 weights are widened to float32 in registers and meet float32
 * activations in FMAs; int8 rows meet 24-bit integer activations in 16-bit multiply-adds
 * (gemv_int8_i16); either way results are the x86 kernels' to float32 rounding. The
 * dot-product set (dotprod.c) takes the 16-bit float rows, attention and the prompt tiles
 * from here. */
#include "../../kernels.h"

#if EP_ARM
#include <arm_neon.h>

/* 16 weights from element i of row-major W as four float32x4 */
static inline __attribute__((always_inline)) void ld16_int8(const void *p, size_t i, float32x4_t v[4]) {
    const int8x16_t b = vld1q_s8((const int8_t *)p + i);
    const int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_high_s8(b);
    v[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
    v[1] = vcvtq_f32_s32(vmovl_high_s16(lo));
    v[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
    v[3] = vcvtq_f32_s32(vmovl_high_s16(hi));
}
static inline __attribute__((always_inline)) void ld16_bf16(const void *p, size_t i, float32x4_t v[4]) {
    const uint16x8_t a = vld1q_u16((const uint16_t *)p + i), b = vld1q_u16((const uint16_t *)p + i + 8);
    v[0] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(a), 16));
    v[1] = vreinterpretq_f32_u32(vshll_high_n_u16(a, 16));
    v[2] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(b), 16));
    v[3] = vreinterpretq_f32_u32(vshll_high_n_u16(b, 16));
}
static inline __attribute__((always_inline)) void ld16_f16(const void *p, size_t i, float32x4_t v[4]) {
    const float16x8_t a = vreinterpretq_f16_u16(vld1q_u16((const uint16_t *)p + i));
    const float16x8_t b = vreinterpretq_f16_u16(vld1q_u16((const uint16_t *)p + i + 8));
    v[0] = vcvt_f32_f16(vget_low_f16(a)); /* exact, subnormals included (FZ is off) */
    v[1] = vcvt_high_f32_f16(a);
    v[2] = vcvt_f32_f16(vget_low_f16(b));
    v[3] = vcvt_high_f32_f16(b);
}
static inline __attribute__((always_inline)) void ld16_f32(const void *p, size_t i, float32x4_t v[4]) {
    const float *f = (const float *)p + i;
    v[0] = vld1q_f32(f), v[1] = vld1q_f32(f + 4), v[2] = vld1q_f32(f + 8), v[3] = vld1q_f32(f + 12);
}

/* 16-column steps in one 64-byte cache line of a row: each row is prefetched once a line */
#define STEPS_int8 4
#define STEPS_bf16 2
#define STEPS_f16 2
#define STEPS_f32 1

/* 16 columns of one row into its two accumulators (an FMA's latency is 4 cycles on the A76,
 * 7 on the A72: two chains a row, each half as long) */
#define EP_ROW16(T, p, k, acc0, acc1)                   \
    {                                                   \
        float32x4_t w[4];                               \
        ld16_##T(p, k, w);                              \
        acc0 = vfmaq_f32(acc0, w[0], x0);               \
        acc1 = vfmaq_f32(acc1, w[1], x1);               \
        acc0 = vfmaq_f32(acc0, w[2], x2);               \
        acc1 = vfmaq_f32(acc1, w[3], x3);               \
    }
#define EP_X16(k)                                                                \
    const float32x4_t x0 = vld1q_f32(x + (k)), x1 = vld1q_f32(x + (k) + 4);     \
    const float32x4_t x2 = vld1q_f32(x + (k) + 8), x3 = vld1q_f32(x + (k) + 12)
#define EP_PF_ROW(T, p, k) \
    (EP_PF ? __builtin_prefetch((const char *)(p) + (size_t)(k) * ESIZE_##T + EP_PF) : (void)0)

/* Four rows share each load of x, their 8 accumulators named variables (an array of them GCC
 * kept in memory: a store each step); a line of each row a loop pass, unrolled, so that the
 * pass prefetches each row once (int8: one row a 16-column step) */
#define EP_NEON_ROWS(T)                                                                         \
    static void gemv_##T(const void *W, const float *restrict x, int K, int r0, int r1, float *restrict y) { \
        const int kv = K & ~15, kl = K & ~(16 * STEPS_##T - 1);                                 \
        int r = r0;                                                                             \
        for (; r + 4 <= r1; r += 4) {                                                           \
            const char *restrict p0 = (const char *)W + (size_t)r * K * ESIZE_##T;              \
            const char *restrict p1 = p0 + (size_t)K * ESIZE_##T;                               \
            const char *restrict p2 = p1 + (size_t)K * ESIZE_##T;                               \
            const char *restrict p3 = p2 + (size_t)K * ESIZE_##T;                               \
            float32x4_t a0 = vdupq_n_f32(0.f), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0; \
            int k = 0;                                                                          \
            for (; k < kl; k += 16 * STEPS_##T) {                                               \
                _Pragma("GCC unroll 4") for (int j = 0; j < STEPS_##T; j++) {                   \
                    EP_X16(k + 16 * j);                                                         \
                    if (0 % STEPS_##T == j) EP_PF_ROW(T, p0, k + 16 * j);                       \
                    if (1 % STEPS_##T == j) EP_PF_ROW(T, p1, k + 16 * j);                       \
                    if (2 % STEPS_##T == j) EP_PF_ROW(T, p2, k + 16 * j);                       \
                    if (3 % STEPS_##T == j) EP_PF_ROW(T, p3, k + 16 * j);                       \
                    EP_ROW16(T, p0, k + 16 * j, a0, b0)                                         \
                    EP_ROW16(T, p1, k + 16 * j, a1, b1)                                         \
                    EP_ROW16(T, p2, k + 16 * j, a2, b2)                                         \
                    EP_ROW16(T, p3, k + 16 * j, a3, b3)                                         \
                    __asm__ volatile("" ::: "memory"); /* no loads hoisted out of their step */ \
                }                                                                               \
            }                                                                                   \
            for (; k < kv; k += 16) {                                                           \
                EP_X16(k);                                                                      \
                EP_PF_ROW(T, p0, k), EP_PF_ROW(T, p1, k), EP_PF_ROW(T, p2, k), EP_PF_ROW(T, p3, k); \
                EP_ROW16(T, p0, k, a0, b0)                                                      \
                EP_ROW16(T, p1, k, a1, b1)                                                      \
                EP_ROW16(T, p2, k, a2, b2)                                                      \
                EP_ROW16(T, p3, k, a3, b3)                                                      \
            }                                                                                   \
            float s0 = vaddvq_f32(vaddq_f32(a0, b0)), s1 = vaddvq_f32(vaddq_f32(a1, b1));       \
            float s2 = vaddvq_f32(vaddq_f32(a2, b2)), s3 = vaddvq_f32(vaddq_f32(a3, b3));       \
            for (; k < K; k++) {                                                                \
                const size_t at = (size_t)r * K + k;                                            \
                s0 += load_value(TYPE_##T, W, at) * x[k], s1 += load_value(TYPE_##T, W, at + K) * x[k]; \
                s2 += load_value(TYPE_##T, W, at + 2 * (size_t)K) * x[k];                       \
                s3 += load_value(TYPE_##T, W, at + 3 * (size_t)K) * x[k];                       \
            }                                                                                   \
            y[r] = s0, y[r + 1] = s1, y[r + 2] = s2, y[r + 3] = s3;                             \
        }                                                                                       \
        for (; r < r1; r++) {                                                                   \
            const char *restrict p0 = (const char *)W + (size_t)r * K * ESIZE_##T;              \
            float32x4_t a0 = vdupq_n_f32(0.f), b0 = a0;                                         \
            int k = 0;                                                                          \
            for (; k < kv; k += 16) {                                                           \
                EP_X16(k);                                                                      \
                EP_PF_ROW(T, p0, k);                                                            \
                EP_ROW16(T, p0, k, a0, b0)                                                      \
            }                                                                                   \
            float s0 = vaddvq_f32(vaddq_f32(a0, b0));                                           \
            for (; k < K; k++) s0 += load_value(TYPE_##T, W, (size_t)r * K + k) * x[k];         \
            y[r] = s0;                                                                          \
        }                                                                                       \
    }
EP_NEON_ROWS(int8) /* gemv_int8: rows longer than I16_MAX_K */
EP_NEON_ROWS(bf16)
EP_NEON_ROWS(f16)
EP_NEON_ROWS(f32)

/* int8 rows in integers: each activation rounded to 24 bits, float32's precision, as two
 * 16-bit digits x ~ d (256 hi + lo), |hi| <= 32767, lo in [-128, 127], d = max|x| / 8388479
 * over a span of 128 inputs; widened to 16 bits, each weight meets both digits in multiply-
 * accumulates into 32-bit lanes (smlal): 4 a 4 weights where converting to float and an FMA
 * took 6. A lane adds 32 products a span, |w hi| <= 128 x 32767: 2^27, in range. Digits of
 * 16 inputs at q + 32 s (in int16): 16 hi, 16 lo. */
#define I16_LEVELS 8388479.f /* 32767 x 256 + 127 */
#define I16_SPAN 8           /* 16-input steps a span: 128 inputs share d */
#define I16_MAX_K 16384      /* stack bytes 4 K + K / 32 */

static inline __attribute__((always_inline)) void quant16(const float *x, float inv, int16_t *q) {
    const int32x4_t top = vdupq_n_s32((int)I16_LEVELS), half = vdupq_n_s32(128);
    for (int i = 0; i < 4; i += 2) {
        int32x4_t h[2], l[2];
        for (int j = 0; j < 2; j++) {
            /* the largest |x| times inv may round one past I16_LEVELS */
            const int32x4_t r = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + 4 * (i + j)), inv));
            const int32x4_t v = vmaxq_s32(vminq_s32(r, top), vnegq_s32(top));
            h[j] = vshrq_n_s32(vaddq_s32(v, half), 8);
            l[j] = vsubq_s32(v, vshlq_n_s32(h[j], 8));
        }
        vst1q_s16(q + 4 * i, vcombine_s16(vmovn_s32(h[0]), vmovn_s32(h[1])));
        vst1q_s16(q + 16 + 4 * i, vcombine_s16(vmovn_s32(l[0]), vmovn_s32(l[1])));
    }
}

#define I16_ZERO(i) int32x4_t h##i = vdupq_n_s32(0), l##i = h##i
#define I16_ROW(i, p)                                                                       \
    {                                                                                       \
        const int8x16_t b = vld1q_s8(p);                                                    \
        const int16x8_t w0 = vmovl_s8(vget_low_s8(b)), w1 = vmovl_high_s8(b);               \
        h##i = vmlal_high_s16(vmlal_s16(h##i, vget_low_s16(w0), vget_low_s16(xh0)), w0, xh0); \
        h##i = vmlal_high_s16(vmlal_s16(h##i, vget_low_s16(w1), vget_low_s16(xh1)), w1, xh1); \
        l##i = vmlal_high_s16(vmlal_s16(l##i, vget_low_s16(w0), vget_low_s16(xl0)), w0, xl0); \
        l##i = vmlal_high_s16(vmlal_s16(l##i, vget_low_s16(w1), vget_low_s16(xl1)), w1, xl1); \
    }
#define I16_JOIN(i, dv) \
    f##i = vfmaq_n_f32(f##i, vfmaq_n_f32(vcvtq_f32_s32(l##i), vcvtq_f32_s32(h##i), 256.f), dv)
#define I16_DIGITS(qs)                                                 \
    const int16x8_t xh0 = vld1q_s16(qs), xh1 = vld1q_s16((qs) + 8);    \
    const int16x8_t xl0 = vld1q_s16((qs) + 16), xl1 = vld1q_s16((qs) + 24)

#define I16_PF4                                                                            \
    if (EP_PF) {                                                                           \
        __builtin_prefetch(p0 + EP_PF), __builtin_prefetch(p1 + EP_PF);                    \
        __builtin_prefetch(p2 + EP_PF), __builtin_prefetch(p3 + EP_PF);                    \
    }
/* step t of a pass: 16 inputs' digits, 16 weights of each of the four rows */
#define I16_STEP4(t)                                                  \
    {                                                                 \
        I16_DIGITS(qs + 32 * (t));                                    \
        I16_ROW(0, p0 + 16 * (t));                                    \
        I16_ROW(1, p1 + 16 * (t));                                    \
        I16_ROW(2, p2 + 16 * (t));                                    \
        I16_ROW(3, p3 + 16 * (t));                                    \
        __asm__ volatile("" ::: "memory"); /* the next step's loads after these sums */ \
    }

static void gemv_int8_i16(const void *W, const float *x, int K, int r0, int r1, float *y) {
    if (K > I16_MAX_K) {
        gemv_int8(W, x, K, r0, r1, y);
        return;
    }
    const int ns16 = K / 16, kq = ns16 * 16, nsp = (ns16 + I16_SPAN - 1) / I16_SPAN;
    int16_t q[2 * kq + 1];
    float d[nsp + 1];
    for (int sp = 0; sp < nsp; sp++) {
        const int s0 = sp * I16_SPAN, s1 = s0 + I16_SPAN < ns16 ? s0 + I16_SPAN : ns16;
        float32x4_t m = vdupq_n_f32(0.f);
        for (int k = 16 * s0; k < 16 * s1; k += 4) m = vmaxq_f32(m, vabsq_f32(vld1q_f32(x + k)));
        const float amax = vmaxvq_f32(m), inv = amax > 0.f ? I16_LEVELS / amax : 0.f;
        for (int st = s0; st < s1; st++) quant16(x + 16 * st, inv, q + 32 * st);
        d[sp] = amax / I16_LEVELS;
    }
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        const int8_t *p0 = (const int8_t *)W + (size_t)r * K, *p1 = p0 + K, *p2 = p1 + K, *p3 = p2 + K;
        float32x4_t f0 = vdupq_n_f32(0.f), f1 = f0, f2 = f0, f3 = f0;
        const int16_t *qs = q;
        for (int sp = 0; sp < nsp; sp++) {
            I16_ZERO(0);
            I16_ZERO(1);
            I16_ZERO(2);
            I16_ZERO(3);
            if (sp < ns16 / I16_SPAN) /* a whole span: two passes of four steps, each a 64-byte line of each row */
                _Pragma("GCC unroll 2") for (int j = 0; j < I16_SPAN; j += 4, qs += 128, p0 += 64, p1 += 64, p2 += 64, p3 += 64) {
                    I16_PF4;
                    I16_STEP4(0);
                    I16_STEP4(1);
                    I16_STEP4(2);
                    I16_STEP4(3);
                }
            else
                for (int j = sp * I16_SPAN; j < ns16; j++, qs += 32, p0 += 16, p1 += 16, p2 += 16, p3 += 16) {
                    I16_PF4;
                    I16_STEP4(0);
                }
            I16_JOIN(0, d[sp]);
            I16_JOIN(1, d[sp]);
            I16_JOIN(2, d[sp]);
            I16_JOIN(3, d[sp]);
        }
        p0 -= kq, p1 -= kq, p2 -= kq, p3 -= kq;
        float s0 = vaddvq_f32(f0), s1 = vaddvq_f32(f1), s2 = vaddvq_f32(f2), s3 = vaddvq_f32(f3);
        for (int k = kq; k < K; k++) s0 += p0[k] * x[k], s1 += p1[k] * x[k], s2 += p2[k] * x[k], s3 += p3[k] * x[k];
        y[r] = s0, y[r + 1] = s1, y[r + 2] = s2, y[r + 3] = s3;
    }
    for (; r < r1; r++) {
        const int8_t *p0 = (const int8_t *)W + (size_t)r * K;
        float32x4_t f0 = vdupq_n_f32(0.f);
        const int16_t *qs = q;
        for (int sp = 0; sp < nsp; sp++) {
            I16_ZERO(0);
            const int n = sp < nsp - 1 ? I16_SPAN : ns16 - sp * I16_SPAN;
            for (int j = 0; j < n; j++, qs += 32, p0 += 16) {
                if (EP_PF) __builtin_prefetch(p0 + EP_PF);
                I16_DIGITS(qs);
                I16_ROW(0, p0);
            }
            I16_JOIN(0, d[sp]);
        }
        p0 -= kq;
        float s0 = vaddvq_f32(f0);
        for (int k = kq; k < K; k++) s0 += p0[k] * x[k];
        y[r] = s0;
    }
}

/* int4 rows (kernels.h explains the sum). A code's weight q - 8 (-8..7) is a bfloat16 whose
 * two bytes two table lookups give, 16 codes at a time; zipped and shifted they are float32:
 * 16 weights in 8 instructions where widening and converting took 10, and exact. With q - 8
 * the group's constant is z times its input sum. */
static const uint8_t bf16_hi[16] = {0xc1, 0xc0, 0xc0, 0xc0, 0xc0, 0xc0, 0xc0, 0xbf,
                                    0x00, 0x3f, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40};
static const uint8_t bf16_lo[16] = {0x00, 0xe0, 0xc0, 0xa0, 0x80, 0x40, 0x00, 0x80,
                                    0x00, 0x80, 0x00, 0x40, 0x80, 0xa0, 0xc0, 0xe0};

/* 16 codes (0..15 a byte) times 16 inputs, into the chain t, FIRST its first step */
#define INT4_MUL(t, w, x) t = vmulq_f32(w, x)
#define INT4_FMA(t, w, x) t = vfmaq_f32(t, w, x)
#define INT4_16(codes, xp, t, FIRST)                                                      \
    {                                                                                     \
        const uint8x16_t hb = vqtbl1q_u8(hi, codes), lb = vqtbl1q_u8(lo, codes);          \
        const uint16x8_t w0 = vreinterpretq_u16_u8(vzip1q_u8(lb, hb));                    \
        const uint16x8_t w1 = vreinterpretq_u16_u8(vzip2q_u8(lb, hb));                    \
        FIRST(t, vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(w0), 16)), (xp)[0]);      \
        t = vfmaq_f32(t, vreinterpretq_f32_u32(vshll_high_n_u16(w0, 16)), (xp)[1]);        \
        t = vfmaq_f32(t, vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(w1), 16)), (xp)[2]);  \
        t = vfmaq_f32(t, vreinterpretq_f32_u32(vshll_high_n_u16(w1, 16)), (xp)[3]);        \
    }
/* a block of 32 weights of the row at c (16 bytes from byte k) against xv (even inputs,
 * then odd), its sum t */
#define INT4_BLOCK(c, k, t)                                                  \
    float32x4_t t;                                                           \
    {                                                                        \
        const uint8x16_t v = vld1q_u8((c) + (k));                            \
        INT4_16(vandq_u8(v, nib), xv, t, INT4_MUL)                           \
        INT4_16(vshrq_n_u8(v, 4), xv + 4, t, INT4_FMA)                       \
    }

/* four rows' (s, z) pairs of group g as float32 s and z (bfloat16: the low half of each
 * pair by shift, the high half by mask) */
static inline __attribute__((always_inline)) void pairs4(const uint16_t *sz, size_t stride, int g, float32x4_t *s,
                                                         float32x4_t *z) {
    uint32x4_t v = vld1q_dup_u32((const uint32_t *)(sz + 2 * g));
    v = vld1q_lane_u32((const uint32_t *)(sz + stride + 2 * g), v, 1);
    v = vld1q_lane_u32((const uint32_t *)(sz + 2 * stride + 2 * g), v, 2);
    v = vld1q_lane_u32((const uint32_t *)(sz + 3 * stride + 2 * g), v, 3);
    *s = vreinterpretq_f32_u32(vshlq_n_u32(v, 16));
    *z = vreinterpretq_f32_u32(vandq_u32(v, vdupq_n_u32(0xffff0000u)));
}

/* Four rows a pass share the block's input loads (8 registers: even inputs at pe, odd at
 * po); the rows' codes at c0..c3 + k */
#define INT4_BLOCK4(pe, po, k)                                                                    \
    {                                                                                             \
        const float32x4_t xv[8] = {vld1q_f32(pe), vld1q_f32((pe) + 4), vld1q_f32((pe) + 8),       \
                                   vld1q_f32((pe) + 12), vld1q_f32(po), vld1q_f32((po) + 4),      \
                                   vld1q_f32((po) + 8), vld1q_f32((po) + 12)};                    \
        INT4_BLOCK(c0, k, t0)                                                                     \
        f0 = vfmaq_laneq_f32(f0, t0, s, 0);                                                       \
        INT4_BLOCK(c1, k, t1)                                                                     \
        f1 = vfmaq_laneq_f32(f1, t1, s, 1);                                                       \
        INT4_BLOCK(c2, k, t2)                                                                     \
        f2 = vfmaq_laneq_f32(f2, t2, s, 2);                                                       \
        INT4_BLOCK(c3, k, t3)                                                                     \
        f3 = vfmaq_laneq_f32(f3, t3, s, 3);                                                       \
    }

static void int4_rows(const Mat *m, const float *prep, int r0, int r1, float *y) {
    const int K = m->cols, half = K / 2, G = m->group, ng = K / G, per = G / 32;
    const float *xe = prep, *xo = prep + half, *xs = prep + K;
    const uint8x16_t nib = vdupq_n_u8(15), hi = vld1q_u8(bf16_hi), lo = vld1q_u8(bf16_lo);
    const size_t stride = (size_t)ng * 2; /* a row's (s, z) pairs, in uint16 */
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        const uint8_t *c0 = (const uint8_t *)m->w + (size_t)r * half, *c1 = c0 + half, *c2 = c1 + half, *c3 = c2 + half;
        const uint16_t *sz = m->sz + (size_t)r * stride;
        prefetch_row(c0, 4 * (size_t)half);
        prefetch_row(sz, 4 * stride * 2);
        float32x4_t f0 = vdupq_n_f32(0.f), f1 = f0, f2 = f0, f3 = f0, cst = f0;
        if (per == 1) { /* the default group of 32: a group a block, the pointers walking */
            const float *pe = xe, *po = xo;
            for (int g = 0; g < ng; g++, pe += 16, po += 16, c0 += 16, c1 += 16, c2 += 16, c3 += 16) {
                float32x4_t s, z;
                pairs4(sz, stride, g, &s, &z);
                cst = vfmaq_n_f32(cst, z, xs[g]);
                INT4_BLOCK4(pe, po, 0)
            }
        } else
            for (int g = 0; g < ng; g++) {
                float32x4_t s, z;
                pairs4(sz, stride, g, &s, &z);
                cst = vfmaq_n_f32(cst, z, xs[g]);
                for (int bk = g * per; bk < (g + 1) * per; bk++) INT4_BLOCK4(xe + 16 * bk, xo + 16 * bk, 16 * bk)
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
                const float32x4_t xv[8] = {vld1q_f32(xe + 16 * bk), vld1q_f32(xe + 16 * bk + 4),
                                           vld1q_f32(xe + 16 * bk + 8), vld1q_f32(xe + 16 * bk + 12),
                                           vld1q_f32(xo + 16 * bk), vld1q_f32(xo + 16 * bk + 4),
                                           vld1q_f32(xo + 16 * bk + 8), vld1q_f32(xo + 16 * bk + 12)};
                INT4_BLOCK(c, 16 * bk, t)
                acc = vfmaq_n_f32(acc, t, s);
            }
            cst += z * xs[g];
        }
        y[r] = vaddvq_f32(acc) + cst;
    }
}

static void attend(Attend *a) { attend_body(a); }

static void silu(const float *g, const float *u, float *o, int n) { silu_mul_body(g, u, o, n); }

/* prompt tiles (kernels.h's EP_GEMM_TILE, written out): RB rows x TV registers of 4 tokens,
 * 8 x 3 = 24 accumulators, 3 input loads and 8 broadcast loads (ld1r) of 32 registers. The
 * accumulators are named variables: as an array GCC kept them in memory, a store per FMA;
 * and the 8 x 3 tile keeps each row's load beside its FMAs (all 8 hoisted, 35 registers
 * would be live). */
#define T_ACC(i, RB)                                                              \
    float32x4_t a##i##0 = vdupq_n_f32(0.f), a##i##1 = a##i##0, a##i##2 = a##i##0; \
    const float *w##i = w + (size_t)((i) < RB ? (i) : 0) * K
#define T_FMA(i, RB, TV)                                       \
    if ((i) < RB) {                                            \
        const float32x4_t b = vld1q_dup_f32(w##i++);           \
        a##i##0 = vfmaq_f32(a##i##0, b, x0);                   \
        if (TV > 1) a##i##1 = vfmaq_f32(a##i##1, b, x1);       \
        if (TV > 2) a##i##2 = vfmaq_f32(a##i##2, b, x2);       \
        if (RB * TV >= 24) __asm__ volatile("" ::: "memory");   \
    }
#define T_OUT(i, RB, TV)                                       \
    if ((i) < RB) {                                            \
        vst1q_f32(raw + (i) * TV * 4, a##i##0);                \
        if (TV > 1) vst1q_f32(raw + (i) * TV * 4 + 4, a##i##1); \
        if (TV > 2) vst1q_f32(raw + (i) * TV * 4 + 8, a##i##2); \
    }
#define EP_TILE_NEON(RB, TV)                                                                      \
    static void tile_##RB##_##TV(const float *w, int K, const float *xt, int ldx, float *raw) {  \
        T_ACC(0, RB); T_ACC(1, RB); T_ACC(2, RB); T_ACC(3, RB);                                   \
        T_ACC(4, RB); T_ACC(5, RB); T_ACC(6, RB); T_ACC(7, RB);                                   \
        for (int k = 0; k < K; k++, xt += ldx) {                                                  \
            const float32x4_t x0 = vld1q_f32(xt), x1 = TV > 1 ? vld1q_f32(xt + 4) : x0;           \
            const float32x4_t x2 = TV > 2 ? vld1q_f32(xt + 8) : x0;                               \
            T_FMA(0, RB, TV) T_FMA(1, RB, TV) T_FMA(2, RB, TV) T_FMA(3, RB, TV)                   \
            T_FMA(4, RB, TV) T_FMA(5, RB, TV) T_FMA(6, RB, TV) T_FMA(7, RB, TV)                   \
        }                                                                                         \
        T_OUT(0, RB, TV) T_OUT(1, RB, TV) T_OUT(2, RB, TV) T_OUT(3, RB, TV)                       \
        T_OUT(4, RB, TV) T_OUT(5, RB, TV) T_OUT(6, RB, TV) T_OUT(7, RB, TV)                       \
    }
EP_TILE_NEON(8, 1)
EP_TILE_NEON(8, 2)
EP_TILE_NEON(8, 3)
EP_TILE_NEON(4, 1)
EP_TILE_NEON(4, 2)
EP_TILE_NEON(4, 3)
EP_TILE_NEON(1, 1)
EP_TILE_NEON(1, 2)
EP_TILE_NEON(1, 3)
static const Tiles tiles_neon = {4, 3, 3, {8, 4, 1}, {{NULL, tile_8_1, tile_8_2, tile_8_3},
                                               {NULL, tile_4_1, tile_4_2, tile_4_3},
                                               {NULL, tile_1_1, tile_1_2, tile_1_3}}};

/* 8-bit tables (W_INT8_B32, kernels.h): a block of 32 codes as two loads of 16, widened to
 * eight float32x4, their products with x in two registers, then one FMA by the block's scale */
static void int8_b32_neon(const Mat *m, const float *x, int r0, int r1, float *y) {
    const int K = m->cols, nb = K / 32;
    for (int r = r0; r < r1; r++) {
        const int8_t *c = (const int8_t *)m->w + (size_t)r * K;
        const uint16_t *d = m->sz + (size_t)r * nb;
        prefetch_row(c, K);
        float32x4_t acc = vdupq_n_f32(0.f);
        for (int b = 0; b < nb; b++) {
            const float *xb = x + 32 * b;
            float32x4_t w[4];
            ld16_int8(c, 32 * (size_t)b, w);
            float32x4_t t0 = vmulq_f32(w[0], vld1q_f32(xb)), t1 = vmulq_f32(w[1], vld1q_f32(xb + 4));
            t0 = vfmaq_f32(t0, w[2], vld1q_f32(xb + 8)), t1 = vfmaq_f32(t1, w[3], vld1q_f32(xb + 12));
            ld16_int8(c, 32 * (size_t)b + 16, w);
            t0 = vfmaq_f32(t0, w[0], vld1q_f32(xb + 16)), t1 = vfmaq_f32(t1, w[1], vld1q_f32(xb + 20));
            t0 = vfmaq_f32(t0, w[2], vld1q_f32(xb + 24)), t1 = vfmaq_f32(t1, w[3], vld1q_f32(xb + 28));
            acc = vfmaq_n_f32(acc, vaddq_f32(t0, t1), f16_to_f32(d[b]));
        }
        y[r] = vaddvq_f32(acc);
    }
}

/* the scalar conversion's rounding and NaNs exactly (a loader-time cost, not a step's) */
static void bf16_to_f16_neon(const uint16_t *s, uint16_t *d, size_t n) {
    for (size_t i = 0; i < n; i++) d[i] = f32_to_f16(bf16_to_f32(s[i]));
}

const Kernels kernels_neon = {
    "neon", {gemv_int8_i16, gemv_bf16, gemv_f16, gemv_f32}, int4_rows, attend, silu, &tiles_neon, bf16_to_f16_neon,
    .int8_b32 = int8_b32_neon,
};

/* the dot-product set: its own integer kernels (dotprod.c), the rest as above */
const Kernels kernels_neon_dotprod = {
    "neon-dotprod", {gemv_int8_dotprod, gemv_bf16, gemv_f16, gemv_f32}, int4_rows_dotprod, attend, silu, &tiles_neon,
    bf16_to_f16_neon,
    .int8_b32 = int8_b32_neon,
};
#endif
