/* Choosing the next token from a step's logits, on the calling thread: no torch thread pool
 * woken per token. */
#include <stdlib.h>

#include "engine.h"

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

/* a token drawn with u in [0, 1) from softmax(logits / temperature) restricted to the top_k
 * largest (0: all; ties kept) and then to the smallest most likely set whose mass reaches
 * top_p, as the torch path samples; SAMPLE_EMPTY when every logit is -inf */
int sample(const float *logits, size_t n, float temperature, int top_k, float top_p, double u) {
    const int cut_k = top_k > 0 && (size_t)top_k < n;
    Cand *c = malloc(n * sizeof(Cand));
    float *sorted = cut_k ? malloc(n * sizeof(float)) : NULL;
    if (!c || (cut_k && !sorted)) {
        free(c), free(sorted);
        return SAMPLE_NOMEM;
    }
    float kth = -INFINITY, top = -INFINITY;
    for (size_t i = 0; i < n; i++) top = logits[i] / temperature > top ? logits[i] / temperature : top;
    if (sorted) { /* the k-th largest scaled logit: values below it are dropped */
        for (size_t i = 0; i < n; i++) sorted[i] = logits[i] / temperature;
        qsort(sorted, n, sizeof(float), by_value_desc);
        kth = sorted[top_k - 1];
        free(sorted);
    }
    size_t m = 0;
    double total = 0.0;
    for (size_t i = 0; i < n; i++) {
        const float v = logits[i] / temperature;
        if (v >= kth && v > -INFINITY) {
            c[m].p = expf(v - top), c[m].i = (int)i;
            total += c[m++].p;
        }
    }
    if (m == 0) {
        free(c);
        return SAMPLE_EMPTY;
    }
    double kept = total;
    if (top_p < 1.f) {
        /* a token whose probability is below (1 - top_p) / (m - 1) cannot be in the top_p set
         * (llama2.c's cut): sort only the others */
        const double cut = m > 1 ? (1.0 - top_p) / (double)(m - 1) * total : 0.0;
        size_t k = 0;
        for (size_t i = 0; i < m; i++)
            if (c[i].p >= cut) c[k++] = c[i];
        if (k == 0) k = m; /* cannot happen (the largest is >= the mean), kept for safety */
        qsort(c, k, sizeof(Cand), by_p_desc);
        double cum = 0.0;
        size_t keep = 0;
        while (keep < k && cum < top_p * total) cum += c[keep++].p; /* mass before a token < top_p: kept */
        m = keep, kept = cum;
    }
    double r = u * kept, acc = 0.0;
    int token = c[m - 1].i;
    for (size_t i = 0; i < m; i++) {
        acc += c[i].p;
        if (r < acc) {
            token = c[i].i;
            break;
        }
    }
    free(c);
    return token;
}

/* the index of the first largest of n > 0 float32 values (NaN counts as largest, as in
 * torch.argmax) */
size_t argmax(const float *v, size_t n) {
    float top = v[0];
#pragma omp simd reduction(max : top)
    for (size_t i = 0; i < n; i++) top = v[i] > top ? v[i] : top;
    int nan = 0;
#pragma omp simd reduction(| : nan)
    for (size_t i = 0; i < n; i++) nan |= v[i] != v[i];
    for (size_t i = 0; i < n; i++)
        if (nan ? v[i] != v[i] : v[i] == top) return i;
    return 0;
}
