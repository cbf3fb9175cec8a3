/* AVX-512 (F, BW, VL, DQ) kernels (Skylake-SP, Ice Lake, Zen 4 on): 16 float32 lanes. */
#include "../../kernels.h"

#if EP_X86
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

/* weights as 16 float32 lanes from element i of row-major W */
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

#define EP_AVX512_ROWS(T) \
    EP_SIMD_ROWS(gemv_##T, T512, T, __m512, 16, _mm512_setzero_ps, _mm512_loadu_ps, ld512_##T, _mm512_fmadd_ps, hsum512)
EP_AVX512_ROWS(int8)
EP_AVX512_ROWS(f16)
EP_AVX512_ROWS(bf16)
EP_AVX512_ROWS(f32)
#define EP_AVX512_BATCH(T) EP_SIMD_ROWS_BATCH(gemv_batch_##T, T512, T, __m512, 16, _mm512_setzero_ps, \
                                              _mm512_loadu_ps, ld512_##T, _mm512_fmadd_ps, hsum512)
EP_AVX512_BATCH(int8)
EP_AVX512_BATCH(f16)
EP_AVX512_BATCH(bf16)
EP_AVX512_BATCH(f32)

/* int4 rows (kernels.h explains the sum): 16 groups' (scale, zero) pairs converted at once;
 * each group's 32 codes per 16 bytes: one widening (the only shuffle), then low and high
 * nibbles by mask and shift */
T512 static void int4_rows(const Mat *m, const float *prep, int r0, int r1, float *y) {
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

/* 8-bit tables (kernels.h, EP_B32_ROWS): a block of 32 codes is two 16-lane registers */
#define T512H __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
T512H static inline __m512 ld512_i8(const int8_t *p, int i) { return ld512_int8(p, (size_t)i); }
T512H static inline float f16c_scale512(const uint16_t *p) { return _cvtsh_ss(*p); }
EP_B32_ROWS(int8_b32, T512H, __m512, 16, _mm512_setzero_ps, _mm512_loadu_ps, ld512_i8, _mm512_fmadd_ps,
            _mm512_set1_ps, hsum512, f16c_scale512)

T512 static void silu(const float *g, const float *u, float *o, int n) { silu_mul_body(g, u, o, n); }

T512 static inline __m512 bcast512(float v) { return _mm512_set1_ps(v); }
#define EP_TILE512(RB, TV)                                                                        \
    EP_GEMM_TILE(tile_##RB##_##TV, T512, __m512, 16, RB, TV, _mm512_setzero_ps, _mm512_loadu_ps, \
                 bcast512, _mm512_fmadd_ps, _mm512_storeu_ps)
EP_TILE512(8, 1)
EP_TILE512(8, 2)
EP_TILE512(8, 3)
EP_TILE512(4, 1)
EP_TILE512(4, 2)
EP_TILE512(4, 3)
EP_TILE512(1, 1)
EP_TILE512(1, 2)
EP_TILE512(1, 3)
static const Tiles tiles = {16, 3, 3, {8, 4, 1}, {{NULL, tile_8_1, tile_8_2, tile_8_3},
                                                 {NULL, tile_4_1, tile_4_2, tile_4_3},
                                                 {NULL, tile_1_1, tile_1_2, tile_1_3}}};

const Kernels kernels_avx512 = {
    "avx512", {gemv_int8, gemv_bf16, gemv_f16, gemv_f32}, int4_rows, attend_avx2, silu, &tiles, bf16_to_f16_f16c,
    int8_q8_avx2,
    {gemv_batch_int8, gemv_batch_bf16, gemv_batch_f16, gemv_batch_f32},
    int8_q8_batch_avx2,
    int8_b32,
    int8_b32_q8_avx2,
    int4_q8_avx2,
    int4_q8_batch_avx2,
};
#endif
