/* Value conversions the loader needs without torch: between bfloat16, float16 and float32,
 * and the int4 (scale, zero) pairs' transpose. */
#include "engine.h"

/* whether n values of type st, each divided by divisor, all fit float16 (|x| < 65504) */
int fits_f16(const void *s, int st, size_t n, float divisor) {
    if (st == W_BF16) { /* |x| orders as the bits without the sign (NaN above inf) */
        uint16_t top = 0;
        const uint16_t *b = (const uint16_t *)s;
#pragma omp simd reduction(max : top)
        for (size_t i = 0; i < n; i++) top = (uint16_t)(b[i] & 0x7fffu) > top ? (uint16_t)(b[i] & 0x7fffu) : top;
        return bf16_to_f32(top) / divisor < 65504.f;
    }
    int ok = 1;
    for (size_t i = 0; i < n && ok; i++) ok = fabsf(load_value(st, s, i)) / divisor < 65504.f;
    return ok;
}

/* n values from type st to dt, each divided by divisor (same index read before written) */
void convert_values(const void *s, int st, void *d, int dt, size_t n, float divisor) {
    if (st == W_BF16 && dt == W_F16 && divisor == 1.f) {
        kernels->bf16_to_f16((const uint16_t *)s, (uint16_t *)d, n);
        return;
    }
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

/* d[c, r] = s[r, c] for 32-bit items (int4's (scale, zero) pairs: stored [groups, rows],
 * read row by row) */
void transpose32(const uint32_t *s, size_t rows, size_t cols, uint32_t *d) {
    for (size_t r = 0; r < rows; r++)
        for (size_t c = 0; c < cols; c++) d[c * rows + r] = s[r * cols + c];
}
