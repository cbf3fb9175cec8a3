/* A decode step's attention over the KV cache (step.c, batch.c), in units any thread runs.
 *
 * A unit is one kv head with some of its group's query heads (all of them where there are
 * enough units: then each key and value is read and converted once for the group) over a part
 * of ATT_SPLIT positions. Parts let two threads share a long context when there are few kv
 * heads (SmolLM2: 3, Gemma 3 270M: 1): each leaves its heads' unnormalized sums, top score and
 * softmax sum, merged after the parallel part in order (flash decoding). Parts are cut by the
 * position count alone, never by the thread count: a result is the same on any number of
 * threads, and batch.c's is bitwise run_step's. */
#include <stdlib.h>

#include "engine.h"

float attend_scale(const Model *m) { return m->attn_scale > 0.f ? m->attn_scale : 1.f / sqrtf((float)m->head_dim); }

size_t step_attend_floats(const Model *m, int max_tokens) {
    const int parts = (max_tokens + ATT_SPLIT - 1) / ATT_SPLIT;
    return parts > 1 ? (size_t)m->heads * parts * (m->head_dim + 2) : 0;
}

/* parts of the n positions, then the units of a kv head's group: one (the whole group) where
 * kv heads x parts reach `spread`, else up to one a head to reach it (short contexts: 3 units
 * of 3 heads left a thread of two idle a third of the time) */
int step_attend_plan(const Model *m, StepAttend *a, int n, int spread) {
    const int G = m->heads / m->kv_heads;
    a->n = n, a->parts = (n + ATT_SPLIT - 1) / ATT_SPLIT;
    const int units = m->kv_heads * a->parts;
    int subs = units >= spread ? 1 : (spread + units - 1) / units;
    subs = subs < G ? subs : G;
    a->hs = (G + subs - 1) / subs;
    a->subs = (G + a->hs - 1) / a->hs;
    return units * a->subs;
}

void step_attend_unit(const Model *m, const StepAttend *a, int u, float *scratch) {
    const int D = m->head_dim, G = m->heads / m->kv_heads, parts = a->parts;
    const int part = u % parts, sub = u / parts % a->subs, g = u / parts / a->subs;
    const int h0 = g * G + sub * a->hs, h1 = h0 + a->hs < (g + 1) * G ? h0 + a->hs : (g + 1) * G;
    const int lo = part * ATT_SPLIT, hi = lo + ATT_SPLIT < a->n ? lo + ATT_SPLIT : a->n;
    Attend at = {.D = D, .K = a->K + g * a->stride, .V = a->V + g * a->stride, .scale = attend_scale(m),
                 .cap = m->attn_softcap, .s = scratch, .tmp = scratch + (size_t)ATT_ROWS * ATT_BLOCK};
    for (int h = h0; h < h1; h += ATT_ROWS) {
        at.R = h1 - h < ATT_ROWS ? h1 - h : ATT_ROWS;
        for (int r = 0; r < at.R; r++) {
            at.q[r] = a->q + (size_t)(h + r) * D, at.lo[r] = lo, at.hi[r] = hi;
            at.o[r] = parts > 1 ? a->partial + ((size_t)(h + r) * parts + part) * (D + 2) : a->out + (size_t)(h + r) * D;
        }
        kernels->attend(&at);
        for (int r = 0; r < at.R; r++) {
            float *o = at.o[r];
            if (parts > 1) {
                o[D] = at.top[r], o[D + 1] = at.sum[r];
                continue;
            }
            const float inv = 1.f / at.sum[r];
            for (int d = 0; d < D; d++) o[d] *= inv;
        }
    }
}

/* each head's parts into its output: sum_p e^(top_p - top) o_p / sum_p e^(top_p - top) sum_p */
void step_attend_merge(const Model *m, const StepAttend *a) {
    const int D = m->head_dim, parts = a->parts;
    if (parts < 2) return;
    for (int h = 0; h < m->heads; h++) {
        const float *pt = a->partial + (size_t)h * parts * (D + 2);
        float *out = a->out + (size_t)h * D, top = -INFINITY, sum = 0.f;
        for (int p = 0; p < parts; p++) top = pt[p * (D + 2) + D] > top ? pt[p * (D + 2) + D] : top;
        for (int d = 0; d < D; d++) out[d] = 0.f;
        for (int p = 0; p < parts; p++) {
            const float *o = pt + (size_t)p * (D + 2), c = ep_exp(o[D] - top);
            sum += c * o[D + 1];
            for (int d = 0; d < D; d++) out[d] += c * o[d];
        }
        const float inv = 1.f / sum;
        for (int d = 0; d < D; d++) out[d] *= inv;
    }
}

/* a model's decode attention scratch (partial sums, then ATT_SCRATCH floats a thread) grown
 * for a cache of max_tokens and nth threads; 0 if out of memory (called under step_lock) */
int grow_scores(Model *m, int max_tokens, int nth) {
    nth = nth < 1 ? 1 : nth > MAX_THREADS ? MAX_THREADS : nth;
    const size_t floats = step_attend_floats(m, max_tokens) + nth * ATT_SCRATCH(m->head_dim);
    if (m->scores_floats < floats) {
        float *grown = malloc(floats * sizeof(float));
        if (grown) free(m->scores), m->scores = grown, m->scores_floats = floats;
    }
    return m->scores_floats >= floats;
}
