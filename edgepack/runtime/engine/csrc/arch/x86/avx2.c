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

T256 static void int4_rows(const Mat *m, const float *prep, int r0, int r1, float *y) { int4_rows_body(m, prep, r0, r1, y); }

T256 static void attn(const float *q, const uint16_t *K, const uint16_t *V, int n, int D, float sc, float *s, float *o) {
    attn_head_body(q, K, V, n, D, sc, s, o);
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

/* also AVX-512's: F16C's rounding is the scalar f32_to_f16's (to nearest even) */
T256 void bf16_to_f16_f16c(const uint16_t *s, uint16_t *d, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i v = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i))), 16);
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_castsi256_ps(v), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; i++) d[i] = f32_to_f16(bf16_to_f32(s[i]));
}

const Kernels kernels_avx2 = {
    "avx2", {gemv_int8, gemv_bf16, gemv_f16, gemv_f32}, int4_rows, attn, silu, &tiles, bf16_to_f16_f16c,
};
#endif
