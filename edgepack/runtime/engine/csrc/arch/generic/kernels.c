/* Portable kernels: plain C the compiler vectorizes for whatever CPU it targets (SSE2 on
 * x86-64, NEON on aarch64). Every CPU can run these; arch/<cpu>/ holds faster ones. */
#include "../../kernels.h"

/* one row at a time, the compiler vectorizes the dot product */
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
EP_GENERIC_ROWS(gemv_int8, int8_t, EP_CAST)
EP_GENERIC_ROWS(gemv_bf16, uint16_t, bf16_to_f32)
EP_GENERIC_ROWS(gemv_f16, uint16_t, f16_to_f32)
EP_GENERIC_ROWS(gemv_f32, float, EP_CAST)

static void int4_rows(const Mat *m, const float *prep, int r0, int r1, float *y) { int4_rows_body(m, prep, r0, r1, y); }

static void int8_b32(const Mat *m, const float *x, int r0, int r1, float *y) { int8_b32_body(m, x, r0, r1, y); }

static void attend(Attend *a) { attend_body(a); }

static void silu(const float *g, const float *u, float *o, int n) { silu_mul_body(g, u, o, n); }

static inline float f_zero(void) { return 0.f; }
static inline float f_load(const float *p) { return *p; }
static inline float f_bcast(float v) { return v; }
static inline float f_fma(float a, float b, float c) { return a * b + c; }
static inline void f_store(float *p, float v) { *p = v; }
#define EP_TILE_GENERIC(RB, TV) \
    EP_GEMM_TILE(tile_##RB##_##TV, , float, 1, RB, TV, f_zero, f_load, f_bcast, f_fma, f_store)
EP_TILE_GENERIC(4, 1)
EP_TILE_GENERIC(4, 2)
EP_TILE_GENERIC(4, 3)
EP_TILE_GENERIC(4, 4)
EP_TILE_GENERIC(1, 1)
EP_TILE_GENERIC(1, 2)
EP_TILE_GENERIC(1, 3)
EP_TILE_GENERIC(1, 4)
static const Tiles tiles = {1, 4, 2, {4, 1}, {{NULL, tile_4_1, tile_4_2, tile_4_3, tile_4_4},
                                             {NULL, tile_1_1, tile_1_2, tile_1_3, tile_1_4}}};

static void bf16_to_f16(const uint16_t *s, uint16_t *d, size_t n) {
    for (size_t i = 0; i < n; i++) d[i] = f32_to_f16(bf16_to_f32(s[i]));
}

const Kernels kernels_generic = {
    "generic", {gemv_int8, gemv_bf16, gemv_f16, gemv_f32}, int4_rows, attend, silu, &tiles, bf16_to_f16,
    .int8_b32 = int8_b32,
};
