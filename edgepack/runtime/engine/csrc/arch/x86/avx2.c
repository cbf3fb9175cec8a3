/* AVX2 + FMA + F16C kernels (x86-64 from 2013 on: Haswell, Zen): 8 float32 lanes. */
#include "../../kernels.h"

#if EP_X86
#define T256 __attribute__((target("avx2,fma,f16c")))

/* weights as 8 float32 lanes from element i of row-major W */
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

#define EP_AVX2_ROWS(T) \
    EP_SIMD_ROWS(gemv_##T, T256, T, __m256, 8, _mm256_setzero_ps, _mm256_loadu_ps, ld256_##T, _mm256_fmadd_ps, hsum256)
EP_AVX2_ROWS(int8)
EP_AVX2_ROWS(f16)
EP_AVX2_ROWS(bf16)
EP_AVX2_ROWS(f32)
#define EP_AVX2_BATCH(T) EP_SIMD_ROWS_BATCH(gemv_batch_##T, T256, T, __m256, 8, _mm256_setzero_ps, \
                                            _mm256_loadu_ps, ld256_##T, _mm256_fmadd_ps, hsum256)
EP_AVX2_BATCH(int8)
EP_AVX2_BATCH(f16)
EP_AVX2_BATCH(bf16)
EP_AVX2_BATCH(f32)

/* int4 rows (kernels.h explains the sum): each 8 code bytes widened once to 8 lanes, then
 * low and high nibbles by mask and shift against the even and odd inputs; a group's sum
 * scaled into a vector accumulator, its zero term apart. The generic body's byte-to-float
 * conversions ran int4 at 0.35x the int8 kernel's tokens/s on Zen 1 (26 vs 74), reading
 * 0.75x the bytes. Groups whose half is not a multiple of 8 bytes take the generic body. */
T256 static void int4_rows(const Mat *m, const float *prep, int r0, int r1, float *y) {
    const int K = m->cols, half = K / 2, G = m->group, ng = K / G, gb = G / 2;
    if (gb % 8) {
        int4_rows_body(m, prep, r0, r1, y);
        return;
    }
    const float *xe = prep, *xo = prep + half, *xs = prep + K;
    const __m256i nib = _mm256_set1_epi32(0x0F);
    for (int r = r0; r < r1; r++) {
        const uint8_t *c = (const uint8_t *)m->w + (size_t)r * half;
        const uint16_t *sz = m->sz + (size_t)r * ng * 2;
        prefetch_row(c, half);
        prefetch_row(sz, (size_t)ng * 4);
        __m256 acc = _mm256_setzero_ps();
        float cst = 0.f;
        for (int g = 0; g < ng; g++) {
            const int j0 = g * gb;
            __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
            for (int j = j0; j < j0 + gb; j += 8) {
                const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + j)));
                t0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, nib)), _mm256_loadu_ps(xe + j), t0);
                t1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), _mm256_loadu_ps(xo + j), t1);
            }
            const float s = bf16_to_f32(sz[2 * g]), z = bf16_to_f32(sz[2 * g + 1]);
            acc = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), _mm256_set1_ps(s), acc);
            cst += (z - 8.f * s) * xs[g];
        }
        y[r] = hsum256(acc) + cst;
    }
}

/* Attention (engine.h, Attend; also AVX-512's: at head_dim 64 a position is four 512-bit
 * loads, too few to fill wider registers' sums). Eight positions' keys or values are converted
 * to float32 once (4 KiB at head_dim 128, in L1) for all the rows. Scores: per row, eight
 * positions at a time, each an 8-lane dot product, then one transposing reduction (hadd, 3
 * levels) gives the eight sums in one register instead of eight horizontal sums. Values: a
 * row's output 64 floats at a time in registers while the eight positions pass. */
T256 static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

T256 static inline void rows8_f32(const uint16_t *X, int t, int cnt, int D, float *tmp) {
    const uint16_t *x = X + (size_t)t * D;
    int i = 0;
    for (; i < cnt * D; i += 8) _mm256_storeu_ps(tmp + i, bf16x8(x + i));
    for (; i < 8 * D; i += 8) _mm256_storeu_ps(tmp + i, _mm256_setzero_ps());
}

/* ep_exp (engine.h) on 8 lanes: the loop of attend_softmax's, which GCC left scalar (a
 * fifth of a 2048-position decode step's attention on Zen 1) */
T256 static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 big = _mm256_set1_ps(12582912.f);
    const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), big), big);
    const __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* attend_softmax (kernels.h) with the top and the exponentials 8 lanes at a time */
T256 static void softmax8(Attend *a, int r, int b0, int vlo, int vhi) {
    float *s = a->s + (size_t)r * ATT_BLOCK - b0, top = -INFINITY;
    if (a->cap > 0.f)
        for (int t = vlo; t < vhi; t++) s[t] = a->cap * tanhf(s[t] / a->cap);
    int t = vlo;
    __m256 top8 = _mm256_set1_ps(-INFINITY);
    for (; t + 8 <= vhi; t += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(s + t));
    float tops[8];
    _mm256_storeu_ps(tops, top8);
    for (int i = 0; i < 8; i++) top = tops[i] > top ? tops[i] : top;
    for (; t < vhi; t++) top = s[t] > top ? s[t] : top;
    if (top > a->top[r]) {
        if (a->top[r] > -INFINITY) {
            const float c = ep_exp(a->top[r] - top);
            a->sum[r] *= c;
            for (int d = 0; d < a->D; d++) a->o[r][d] *= c;
        }
        a->top[r] = top;
    }
    const __m256 top_v = _mm256_set1_ps(a->top[r]);
    __m256 sum8 = _mm256_setzero_ps();
    for (t = vlo; t + 8 <= vhi; t += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), top_v));
        _mm256_storeu_ps(s + t, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    float sum = hsum256(sum8);
    for (; t < vhi; t++) {
        s[t] = ep_exp(s[t] - a->top[r]);
        sum += s[t];
    }
    a->sum[r] += sum;
}

/* o += sum_i p[i] x_i over positions [i0, i1) of the 8 in tmp, NV registers of o from d0 on
 * (a constant, so the sums stay in registers) */
T256 static inline __attribute__((always_inline)) void values8(float *o, const float *p, const float *tmp, int i0,
                                                               int i1, int D, int d0, const int NV) {
    __m256 acc[8];
    for (int v = 0; v < NV; v++) acc[v] = _mm256_loadu_ps(o + d0 + 8 * v);
    for (int i = i0; i < i1; i++) {
        const __m256 w = _mm256_broadcast_ss(p + i);
        const float *x = tmp + (size_t)i * D + d0;
        for (int v = 0; v < NV; v++) acc[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 8 * v), acc[v]);
    }
    for (int v = 0; v < NV; v++) _mm256_storeu_ps(o + d0 + 8 * v, acc[v]);
}

/* Rows that all see the same positions (a decode step's heads of one kv head): no float32
 * copy. 16 bfloat16 are one 256-bit load; shifted left 16 (the even elements) and masked to
 * their high halves (the odd ones) they are two float32 registers, which meet each query
 * split the same way (direct_order): 2 operations for 16 elements where a conversion and a
 * store are 3 for 8 (Zen 1, SmolLM2-135M at 2048 positions, 1 thread: the step's attention
 * 14.9 -> 11.4 ms of CPU time). Scores: NR rows x NP positions of accumulators; values: NR
 * rows x 32 dims of the output, kept in the split order until the end. */
T256 static inline __attribute__((always_inline)) void direct_scores(Attend *a, const float *qs, int r0, const int NR,
                                                                     int b0, int t, const int NP) {
    const int D = a->D;
    const __m256i odd = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 acc[3][4];
    for (int r = 0; r < NR; r++)
        for (int j = 0; j < NP; j++) acc[r][j] = _mm256_setzero_ps();
    if (r0 == 0) /* the values, read after the block's scores: in cache by then (2 threads: 60 -> 64 tokens/s) */
        for (int j = 0; j < NP; j++)
            for (int d = 0; d < D; d += 32) __builtin_prefetch(a->V + (size_t)(t + j) * D + d);
    for (int d = 0; d < D; d += 16)
        for (int j = 0; j < NP; j++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(a->K + (size_t)(t + j) * D + d));
            const __m256 e = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)), o = _mm256_castsi256_ps(_mm256_and_si256(raw, odd));
            for (int r = 0; r < NR; r++) {
                const float *q = qs + (size_t)(r0 + r) * D + d;
                acc[r][j] = _mm256_fmadd_ps(e, _mm256_loadu_ps(q), acc[r][j]);
                acc[r][j] = _mm256_fmadd_ps(o, _mm256_loadu_ps(q + 8), acc[r][j]);
            }
        }
    for (int r = 0; r < NR; r++) {
        float *s = a->s + (size_t)(r0 + r) * ATT_BLOCK + (t - b0);
        if (NP == 1) {
            s[0] = hsum256(acc[r][0]) * a->scale;
            continue;
        }
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[r][0], acc[r][1]), _mm256_hadd_ps(acc[r][2], acc[r][3]));
        const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(s, _mm_mul_ps(sums, _mm_set1_ps(a->scale)));
    }
}

T256 static inline __attribute__((always_inline)) void direct_values(Attend *a, int r0, const int NR, int b0, int vlo,
                                                                     int vhi, int d0) {
    const int D = a->D;
    const __m256i odd = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 acc[2][4];
    for (int r = 0; r < NR; r++)
        for (int v = 0; v < 4; v++) acc[r][v] = _mm256_loadu_ps(a->o[r0 + r] + d0 + 8 * v);
    for (int t = vlo; t < vhi; t++) {
        __m256 p[2];
        for (int r = 0; r < NR; r++) p[r] = _mm256_broadcast_ss(a->s + (size_t)(r0 + r) * ATT_BLOCK + (t - b0));
        for (int h = 0; h < 2; h++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(a->V + (size_t)t * D + d0 + 16 * h));
            const __m256 e = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)), o = _mm256_castsi256_ps(_mm256_and_si256(raw, odd));
            for (int r = 0; r < NR; r++) {
                acc[r][2 * h] = _mm256_fmadd_ps(p[r], e, acc[r][2 * h]);
                acc[r][2 * h + 1] = _mm256_fmadd_ps(p[r], o, acc[r][2 * h + 1]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int v = 0; v < 4; v++) _mm256_storeu_ps(a->o[r0 + r] + d0 + 8 * v, acc[r][v]);
}

/* x (D floats) from the split order (per 16: 8 even elements, then 8 odd ones) back, or into it */
static void direct_order(float *x, int D, int split) {
    float t[16];
    for (int d = 0; d < D; d += 16) {
        for (int i = 0; i < 8; i++)
            if (split)
                t[i] = x[d + 2 * i], t[8 + i] = x[d + 2 * i + 1];
            else
                t[2 * i] = x[d + i], t[2 * i + 1] = x[d + 8 + i];
        memcpy(x + d, t, sizeof t);
    }
}

T256 static void attend_direct(Attend *a) {
    const int R = a->R, D = a->D, lo = a->lo[0], hi = a->hi[0];
    float *qs = a->tmp; /* the queries in the split order, R <= 8 rows of D */
    for (int r = 0; r < R; r++) {
        memcpy(qs + (size_t)r * D, a->q[r], (size_t)D * sizeof(float));
        direct_order(qs + (size_t)r * D, D, 1);
        a->top[r] = -INFINITY, a->sum[r] = 0.f;
        for (int d = 0; d < D; d++) a->o[r][d] = 0.f;
    }
    for (int b0 = lo; b0 < hi; b0 += ATT_BLOCK) {
        const int b1 = b0 + ATT_BLOCK < hi ? b0 + ATT_BLOCK : hi;
        for (int r0 = 0; r0 < R; r0 += 3) {
            const int nr = R - r0 < 3 ? R - r0 : 3;
            int t = b0;
            for (; t + 4 <= b1; t += 4) switch (nr) {
                case 3: direct_scores(a, qs, r0, 3, b0, t, 4); break;
                case 2: direct_scores(a, qs, r0, 2, b0, t, 4); break;
                default: direct_scores(a, qs, r0, 1, b0, t, 4); break;
                }
            for (; t < b1; t++) switch (nr) {
                case 3: direct_scores(a, qs, r0, 3, b0, t, 1); break;
                case 2: direct_scores(a, qs, r0, 2, b0, t, 1); break;
                default: direct_scores(a, qs, r0, 1, b0, t, 1); break;
                }
        }
        for (int r = 0; r < R; r++) softmax8(a, r, b0, b0, b1);
        for (int r0 = 0; r0 < R; r0 += 2)
            for (int d0 = 0; d0 < D; d0 += 32) {
                if (R - r0 >= 2)
                    direct_values(a, r0, 2, b0, b0, b1, d0);
                else
                    direct_values(a, r0, 1, b0, b0, b1, d0);
            }
    }
    for (int r = 0; r < R; r++) direct_order(a->o[r], D, 0);
}

/* attend_avx2's parts of the walk (kernels.h, EP_ATTEND_WALK): row r's scores of the 8
 * positions from t (keys in a->tmp, zeros past the block's end), eight dot products reduced
 * and stored together; its output plus the values of positions t + i0 .. t + i1 */
T256 static inline __attribute__((always_inline)) void scores8(Attend *a, int r, int t, int b0, __m256 scale) {
    const int D = a->D;
    const float *q = a->q[r];
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(a->tmp + (size_t)j * D + d), qv, acc[j]);
    }
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
    _mm256_storeu_ps(a->s + (size_t)r * ATT_BLOCK + (t - b0), _mm256_mul_ps(sums, scale));
}

T256 static inline __attribute__((always_inline)) void values_row(Attend *a, int r, int t, int b0, int i0, int i1) {
    const int D = a->D;
    const float *p = a->s + (size_t)r * ATT_BLOCK + (t - b0);
    float *o = a->o[r];
    int d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) values8(o, p, a->tmp, i0, i1, D, d0, 8);
    switch ((D - d0) / 8) {
    case 7: values8(o, p, a->tmp, i0, i1, D, d0, 7); break;
    case 6: values8(o, p, a->tmp, i0, i1, D, d0, 6); break;
    case 5: values8(o, p, a->tmp, i0, i1, D, d0, 5); break;
    case 4: values8(o, p, a->tmp, i0, i1, D, d0, 4); break;
    case 3: values8(o, p, a->tmp, i0, i1, D, d0, 3); break;
    case 2: values8(o, p, a->tmp, i0, i1, D, d0, 2); break;
    case 1: values8(o, p, a->tmp, i0, i1, D, d0, 1); break;
    }
}

T256 void attend_avx2(Attend *a) {
    const int R = a->R, D = a->D;
    if (D % 8) {
        attend_body(a);
        return;
    }
    int same = R <= 8 && D % 32 == 0;
    for (int r = 1; r < R && same; r++) same = a->lo[r] == a->lo[0] && a->hi[r] == a->hi[0];
    if (same) {
        attend_direct(a);
        return;
    }
    const __m256 scale = _mm256_set1_ps(a->scale);
    EP_ATTEND_WALK(a, rows8_f32, scores8(a, r, t, b0, scale), softmax8, values_row(a, r, t, b0, i0, i1));
}

/* int8 rows against the input rounded to int8 per block of 32 (prep_q8, step.c; act_bits 8),
 * llama.cpp's Q8_0 arithmetic turned round: per block, |x| (unsigned, made once for all rows)
 * times w with x's sign (signed) in maddubs (16-bit pair sums: 2 x 127 x 127 fits), pairs
 * summed to 32 bits by madd, one conversion to float and one FMA with the block's scale.
 * llama.cpp takes |w| and gives x w's sign: two sign operations per row and block where this
 * spends one, and on Zen 1 they compete with the multiplies (in L2, one thread: 3.0 -> 2.6 ns
 * per row and block). The products are the same integers, so the results are bitwise
 * unchanged. It needs w != -128 (its negation does not fit): the packer clamps codes to
 * [-127, 127] and the loader refuses a bundle with a -128 code (model_check_int8, module.c).
 * Per 32 weights of a row that is 5 vector instructions where the float kernel spends 16
 * (widen, convert, FMA, 4 times): on Zen 1, which splits each 256-bit operation in two,
 * converting every weight bounds it. Four rows share each block of x. The four rows lie end
 * to end, and their bytes are prefetched as one stream EP_PF ahead (two lines a block), not
 * as four: with rows of 576 bytes (SmolLM2-135M) the four interleaved streams read 15 GB/s
 * on 2 threads of this Zen 1 box, the one stream 19.5 (rows of 2048: 19 either way). */
T256 static inline __m256i dot_q8(const int8_t *w, __m256i x, __m256i ax, __m256i ones) {
    const __m256i wv = _mm256_loadu_si256((const __m256i *)w);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, x)), ones);
}

T256 static void int8_q8_rows(const Mat *m, const void *prep, int r0, int r1, float *y) {
    const int K = m->cols, nb = K / 32;
    const int8_t *xq = (const int8_t *)prep, *W = (const int8_t *)m->w;
    const float *xd = (const float *)(xq + K);
    const __m256i ones = _mm256_set1_epi16(1);
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        const int8_t *w0 = W + (size_t)r * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int b = 0; b < nb; b++) {
            const int at = 32 * b;
            if (EP_PF) /* the four rows' bytes as one stream: 128 of them a block */
                __builtin_prefetch(w0 + 4 * at + EP_PF), __builtin_prefetch(w0 + 4 * at + 64 + EP_PF);
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + at)), ax = _mm256_sign_epi8(x, x);
            const __m256 d = _mm256_broadcast_ss(xd + b);
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_q8(w0 + at, x, ax, ones)), d, a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_q8(w1 + at, x, ax, ones)), d, a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_q8(w2 + at, x, ax, ones)), d, a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_q8(w3 + at, x, ax, ones)), d, a3);
        }
        y[r] = hsum256(a0), y[r + 1] = hsum256(a1), y[r + 2] = hsum256(a2), y[r + 3] = hsum256(a3);
    }
    for (; r < r1; r++) {
        const int8_t *w = W + (size_t)r * K;
        __m256 a = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_q8(w + 32 * b, x, _mm256_sign_epi8(x, x), ones)), _mm256_broadcast_ss(xd + b), a);
        }
        y[r] = hsum256(a);
    }
}

/* 8-bit tables (W_INT8_B32) against the input rounded to int8 per block of 32 (prep_q8): both
 * sides carry a scale per block of 32, which is llama.cpp's Q8_0 x Q8_0. Per block and row
 * the integer dot product (dot_q8), one conversion, one FMA with the product of the two
 * scales. The float kernel (EP_B32_ROWS) converts every code to float32 and is compute-bound
 * here: on Zen 1 SmolLM2-135M's 49152 x 576 head took 2.69 ms of a 10.9 ms step at 2
 * threads, 47% of the speed its bytes allow. The weight scales of eight blocks are widened
 * (F16C) and multiplied by x's in one go, into `ds`, which the blocks broadcast from. */
T256 static inline void b32_scales(const uint16_t *d, const float *xd, int n, float *ds) {
    if (n == 8) {
        _mm256_storeu_ps(ds, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)d)), _mm256_loadu_ps(xd)));
        return;
    }
    for (int j = 0; j < n; j++) ds[j] = _cvtsh_ss(d[j]) * xd[j];
}

T256 static void int8_b32_q8_rows(const Mat *m, const void *prep, int r0, int r1, float *y) {
    const int K = m->cols, nb = K / 32;
    const int8_t *xq = (const int8_t *)prep, *W = (const int8_t *)m->w;
    const float *xd = (const float *)(xq + K);
    const __m256i ones = _mm256_set1_epi16(1);
    float ds[4][8];
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        const int8_t *w0 = W + (size_t)r * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        const uint16_t *d0 = m->sz + (size_t)r * nb;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int b0 = 0; b0 < nb; b0 += 8) {
            const int n = nb - b0 < 8 ? nb - b0 : 8;
            for (int i = 0; i < 4; i++) b32_scales(d0 + (size_t)i * nb + b0, xd + b0, n, ds[i]);
            for (int j = 0; j < n; j++) {
                const int at = 32 * (b0 + j);
                if (EP_PF) __builtin_prefetch(w0 + 4 * at + EP_PF), __builtin_prefetch(w0 + 4 * at + 64 + EP_PF);
                const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + at)), ax = _mm256_sign_epi8(x, x);
                a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_q8(w0 + at, x, ax, ones)), _mm256_broadcast_ss(&ds[0][j]), a0);
                a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_q8(w1 + at, x, ax, ones)), _mm256_broadcast_ss(&ds[1][j]), a1);
                a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_q8(w2 + at, x, ax, ones)), _mm256_broadcast_ss(&ds[2][j]), a2);
                a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_q8(w3 + at, x, ax, ones)), _mm256_broadcast_ss(&ds[3][j]), a3);
            }
        }
        y[r] = hsum256(a0), y[r + 1] = hsum256(a1), y[r + 2] = hsum256(a2), y[r + 3] = hsum256(a3);
    }
    for (; r < r1; r++) {
        const int8_t *w = W + (size_t)r * K;
        const uint16_t *d = m->sz + (size_t)r * nb;
        __m256 a = _mm256_setzero_ps();
        for (int b0 = 0; b0 < nb; b0 += 8) {
            const int n = nb - b0 < 8 ? nb - b0 : 8;
            b32_scales(d + b0, xd + b0, n, ds[0]);
            for (int j = 0; j < n; j++) {
                const int at = 32 * (b0 + j);
                const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + at));
                a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_q8(w + at, x, _mm256_sign_epi8(x, x), ones)), _mm256_broadcast_ss(&ds[0][j]), a);
            }
        }
        y[r] = hsum256(a);
    }
}

/* also AVX-512's */
T256 void int8_b32_q8_avx2(const Mat *m, const void *prep, int r0, int r1, float *y) { int8_b32_q8_rows(m, prep, r0, r1, y); }

/* int8_q8_rows for several sequences (batch.c): each block of 32 weights loaded, and its
 * |w| made, once for all sequences; per row and sequence the same integer dot products (exact,
 * so the order within a block does not matter), the same FMA into one accumulator over the
 * blocks in order, the same horizontal sum: bitwise int8_q8_rows's. Two rows and up to four
 * sequences a pass: 8 accumulators, 2 |w| and 2 weights, ones, x and its scale of 16 registers. */
T256 static inline __attribute__((always_inline)) void int8_q8_nb(const Mat *m, const void *const *prep, int r0,
                                                                   int r1, float *const *y, const int NB) {
    const int K = m->cols, nb = K / 32;
    const int8_t *W = (const int8_t *)m->w, *xq[4];
    const float *xd[4];
    for (int b = 0; b < NB; b++) xq[b] = (const int8_t *)prep[b], xd[b] = (const float *)(xq[b] + K);
    const __m256i ones = _mm256_set1_epi16(1);
    int r = r0;
    for (; r + 2 <= r1; r += 2) {
        const int8_t *w0 = W + (size_t)r * K, *w1 = w0 + K;
        __m256 a0[4], a1[4];
        for (int b = 0; b < NB; b++) a0[b] = _mm256_setzero_ps(), a1[b] = _mm256_setzero_ps();
        for (int k = 0; k < nb; k++) {
            const int at = 32 * k;
            if (EP_PF) __builtin_prefetch(w0 + 2 * at + EP_PF); /* the two rows' bytes as one stream */
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(w0 + at));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(w1 + at));
            const __m256i u0 = _mm256_sign_epi8(v0, v0), u1 = _mm256_sign_epi8(v1, v1);
            for (int b = 0; b < NB; b++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(xq[b] + at));
                const __m256 d = _mm256_broadcast_ss(xd[b] + k);
                const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(x, v0)), ones);
                const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(x, v1)), ones);
                a0[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), d, a0[b]);
                a1[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), d, a1[b]);
            }
        }
        for (int b = 0; b < NB; b++) y[b][r] = hsum256(a0[b]), y[b][r + 1] = hsum256(a1[b]);
    }
    for (; r < r1; r++) {
        const int8_t *w = W + (size_t)r * K;
        __m256 a[4];
        for (int b = 0; b < NB; b++) a[b] = _mm256_setzero_ps();
        for (int k = 0; k < nb; k++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 * k)), u = _mm256_sign_epi8(v, v);
            for (int b = 0; b < NB; b++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(xq[b] + 32 * k));
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(x, v)), ones);
                a[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(xd[b] + k), a[b]);
            }
        }
        for (int b = 0; b < NB; b++) y[b][r] = hsum256(a[b]);
    }
}

/* also AVX-512's (its int8_q8 is int8_q8_avx2) */
T256 void int8_q8_batch_avx2(const Mat *m, const void *const *prep, int B, int r0, int r1, float *const *y) {
    for (int b = 0; b < B; b += 4) {
        switch (B - b < 4 ? B - b : 4) {
        case 4: int8_q8_nb(m, prep + b, r0, r1, y + b, 4); break;
        case 3: int8_q8_nb(m, prep + b, r0, r1, y + b, 3); break;
        case 2: int8_q8_nb(m, prep + b, r0, r1, y + b, 2); break;
        default: int8_q8_nb(m, prep + b, r0, r1, y + b, 1); break;
        }
    }
}

/* int4 rows against the input rounded to int8 per block of 32 (prep_int4's int8 layout, step.c;
 * act_bits 8), llama.cpp's Q4_1 x Q8_1 in edgepack's int4 (kernels.h): per block, the codes
 * (0..15, unsigned) times the rounded input in maddubs, so sum_k q_k x_k is an integer times
 * the block's scale d; the zero term is (z - 8 s) times the rounded input's group sum, so
 * that the product is W x~ (prep_int4 says why). The
 * float kernel (int4_rows) converts every code to float32: compute-bound on Zen 1, it ran
 * SmolLM2-135M at 0.52x the 8-bit bundle's tokens/s, reading 0.70x its bytes.
 * A pair of blocks is one 32-byte load of codes: low nibbles are the even inputs of both
 * blocks, high nibbles the odd ones, and prep_int4 laid x out to match (E E O O). Their two
 * maddubs are added in 16 bits (2 x 15 x 127 x 2 fits), so a pair costs one madd where int8
 * rows spend two. Each 128-bit half of the 32-bit sums is one block's: with groups of 32 the
 * (scale, zero) pairs of four groups are one 16-byte load, shuffled (0, 2, 1, 3) and widened
 * so that an in-lane broadcast gives blocks 0 | 1 and 2 | 3 their scales; the same register
 * times prep's (-8 xsum, xsum) lanes is the four groups' zero terms. Larger groups, and the
 * blocks after the last four, take their scales one at a time. */
T256 static inline __m256i int4_pair(__m256i lo, __m256i hi, const int8_t *xq, __m256i ones) {
    const __m256i e = _mm256_loadu_si256((const __m256i *)xq), o = _mm256_loadu_si256((const __m256i *)(xq + 32));
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, e), _mm256_maddubs_epi16(hi, o)), ones);
}

/* a pair of blocks' 32 code bytes as low nibbles and high nibbles */
#define INT4_NIBBLES(c, lo, hi)                                          \
    const __m256i lo##_v = _mm256_loadu_si256((const __m256i *)(c));    \
    const __m256i lo = _mm256_and_si256(lo##_v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(lo##_v, 4), nib)

/* an unpaired last block: its 16 code bytes as low nibbles | high nibbles, against E | O */
T256 static inline __m256i int4_one(const uint8_t *c, const int8_t *xq, __m256i nib, __m256i ones) {
    const __m128i v = _mm_loadu_si128((const __m128i *)c);
    const __m256i codes = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), nib);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, _mm256_loadu_si256((const __m256i *)xq)), ones);
}

/* rows [r, r + NR) against NB inputs (batch.c: several sequences; each row's codes unpacked
 * and its scales widened once for all of them). Every (row, input) pair takes the same
 * operations in the same order whatever NR and NB, so a batched step is bitwise a single
 * one. The rows' codes, and their pairs, lie end to end: each prefetched as one stream. */
T256 static inline __attribute__((always_inline)) void int4_q8_pass(const Mat *m, const void *const *prep, int r,
                                                                     float *const *y, const int NR, const int NB) {
    const int K = m->cols, half = K / 2, nb = K / 32, ng = K / m->group, per = m->group / 32;
    const int8_t *xq[4];
    const float *d[4], *d4[4], *cz[4], *xs[4];
    for (int s = 0; s < NB; s++) {
        xq[s] = (const int8_t *)prep[s], d[s] = (const float *)(xq[s] + K), d4[s] = d[s] + nb;
        cz[s] = d4[s] + 4 * (size_t)nb, xs[s] = cz[s] + 2 * (size_t)ng;
    }
    const uint8_t *c = (const uint8_t *)m->w + (size_t)r * half;
    const uint16_t *sz = m->sz + (size_t)r * ng * 2;
    const __m256i nib = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 acc[4][4];
    float cst[4][4];
    for (int i = 0; i < NR; i++)
        for (int s = 0; s < NB; s++) acc[i][s] = _mm256_setzero_ps(), cst[i][s] = 0.f;
    int b = 0;
    if (per == 1)
        for (; b + 4 <= nb; b += 4) {
            if (EP_PF) {
                for (int l = 0; l < NR; l++) __builtin_prefetch(c + NR * 16 * b + 64 * l + EP_PF);
                __builtin_prefetch((const char *)sz + NR * 4 * b + EP_PF / 4);
            }
            for (int i = 0; i < NR; i++) {
                const __m128i raw = _mm_loadu_si128((const __m128i *)(sz + (size_t)i * 2 * ng + 2 * b));
                const __m256i wide = _mm256_cvtepu16_epi32(_mm_shuffle_epi32(raw, 0xD8));
                const __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)); /* s0 z0 s2 z2 | s1 z1 s3 z3 */
                const __m256 v01 = _mm256_shuffle_ps(v, v, 0x00), v23 = _mm256_shuffle_ps(v, v, 0xAA);
                const uint8_t *ci = c + (size_t)i * half + 16 * b;
                INT4_NIBBLES(ci, lo01, hi01);
                INT4_NIBBLES(ci + 32, lo23, hi23);
                for (int s = 0; s < NB; s++) {
                    const __m256 s01 = _mm256_mul_ps(v01, _mm256_loadu_ps(d4[s] + 4 * b));
                    const __m256 s23 = _mm256_mul_ps(v23, _mm256_loadu_ps(d4[s] + 4 * b + 8));
                    __m256 a = _mm256_fmadd_ps(v, _mm256_loadu_ps(cz[s] + 2 * b), acc[i][s]);
                    a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(int4_pair(lo01, hi01, xq[s] + 32 * b, ones)), s01, a);
                    acc[i][s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(int4_pair(lo23, hi23, xq[s] + 32 * b + 64, ones)), s23, a);
                }
            }
        }
    for (; b < nb; b += 2) {
        if (EP_PF && b % 4 == 0)
            for (int l = 0; l < NR; l++) __builtin_prefetch(c + NR * 16 * b + 64 * l + EP_PF);
        for (int i = 0; i < NR; i++) {
            const uint16_t *szi = sz + (size_t)i * 2 * ng;
            const uint8_t *ci = c + (size_t)i * half + 16 * b;
            const float s0 = bf16_to_f32(szi[2 * (b / per)]), s1 = b + 1 < nb ? bf16_to_f32(szi[2 * ((b + 1) / per)]) : 0.f;
            if (b + 1 < nb) {
                INT4_NIBBLES(ci, lo, hi);
                for (int s = 0; s < NB; s++) {
                    const __m256 sd = _mm256_set_m128(_mm_set1_ps(s1 * d[s][b + 1]), _mm_set1_ps(s0 * d[s][b]));
                    acc[i][s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(int4_pair(lo, hi, xq[s] + 32 * b, ones)), sd, acc[i][s]);
                }
            } else
                for (int s = 0; s < NB; s++)
                    acc[i][s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(int4_one(ci, xq[s] + 32 * b, nib, ones)),
                                                _mm256_set1_ps(s0 * d[s][b]), acc[i][s]);
        }
    }
    for (int g = per == 1 ? nb / 4 * 4 : 0; g < ng; g++)
        for (int i = 0; i < NR; i++) {
            const uint16_t *szi = sz + (size_t)i * 2 * ng;
            const float zt = bf16_to_f32(szi[2 * g + 1]) - 8.f * bf16_to_f32(szi[2 * g]);
            for (int s = 0; s < NB; s++) cst[i][s] += zt * xs[s][g];
        }
    for (int i = 0; i < NR; i++)
        for (int s = 0; s < NB; s++) y[s][r + i] = hsum256(acc[i][s]) + cst[i][s];
}

/* also AVX-512's */
T256 void int4_q8_avx2(const Mat *m, const void *prep, int r0, int r1, float *y) {
    const void *const p[1] = {prep};
    float *const out[1] = {y};
    int r = r0;
    for (; r + 4 <= r1; r += 4) int4_q8_pass(m, p, r, out, 4, 1);
    switch (r1 - r) {
    case 3: int4_q8_pass(m, p, r, out, 3, 1); break;
    case 2: int4_q8_pass(m, p, r, out, 2, 1); break;
    case 1: int4_q8_pass(m, p, r, out, 1, 1); break;
    }
}

/* int4_q8 for B sequences (batch.c), bitwise int4_q8_avx2's: a row at a time, its codes
 * unpacked once for up to four sequences (registers: 4 accumulators, 4 unpacked halves) */
T256 void int4_q8_batch_avx2(const Mat *m, const void *const *prep, int B, int r0, int r1, float *const *y) {
    for (int b = 0; b < B; b += 4)
        for (int r = r0; r < r1; r++) switch (B - b < 4 ? B - b : 4) {
            case 4: int4_q8_pass(m, prep + b, r, y + b, 1, 4); break;
            case 3: int4_q8_pass(m, prep + b, r, y + b, 1, 3); break;
            case 2: int4_q8_pass(m, prep + b, r, y + b, 1, 2); break;
            default: int4_q8_pass(m, prep + b, r, y + b, 1, 1); break;
            }
}

T256 static void silu(const float *g, const float *u, float *o, int n) { silu_mul_body(g, u, o, n); }

T256 static inline __m256 bcast256(float v) { return _mm256_set1_ps(v); }
#define EP_TILE256(RB, TV)                                                                        \
    EP_GEMM_TILE(tile_##RB##_##TV, T256, __m256, 8, RB, TV, _mm256_setzero_ps, _mm256_loadu_ps,  \
                 bcast256, _mm256_fmadd_ps, _mm256_storeu_ps)
EP_TILE256(4, 1)
EP_TILE256(4, 2)
EP_TILE256(1, 1)
EP_TILE256(1, 2)
static const Tiles tiles = {8, 2, 2, {4, 1}, {{NULL, tile_4_1, tile_4_2}, {NULL, tile_1_1, tile_1_2}}};

/* 8-bit tables (kernels.h, EP_B32_ROWS): a block of 32 codes is four 8-lane registers */
T256 static inline __m256 ld256_i8(const int8_t *p, int i) { return ld256_int8(p, (size_t)i); }
T256 static inline float f16c_scale(const uint16_t *p) { return _cvtsh_ss(*p); }
EP_B32_ROWS(int8_b32, T256, __m256, 8, _mm256_setzero_ps, _mm256_loadu_ps, ld256_i8, _mm256_fmadd_ps, _mm256_set1_ps,
            hsum256, f16c_scale)

/* also AVX-512's: F16C's rounding is the scalar f32_to_f16's (to nearest even) */
T256 void bf16_to_f16_f16c(const uint16_t *s, uint16_t *d, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i v = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i))), 16);
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_castsi256_ps(v), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; i++) d[i] = f32_to_f16(bf16_to_f32(s[i]));
}

/* also AVX-512's (int8_q8_avx2) */
T256 void int8_q8_avx2(const Mat *m, const void *prep, int r0, int r1, float *y) { int8_q8_rows(m, prep, r0, r1, y); }

const Kernels kernels_avx2 = {
    "avx2", {gemv_int8, gemv_bf16, gemv_f16, gemv_f32}, int4_rows, attend_avx2, silu, &tiles, bf16_to_f16_f16c,
    int8_q8_avx2,
    {gemv_batch_int8, gemv_batch_bf16, gemv_batch_f16, gemv_batch_f32},
    int8_q8_batch_avx2,
    int8_b32,
    int8_b32_q8_avx2,
    int4_q8_avx2,
    int4_q8_batch_avx2,
};
#endif
