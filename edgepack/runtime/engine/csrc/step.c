/* One decode step: a token through every layer as matrix-vector products, each split by
 * rows between the pool's threads. */
#include <stdlib.h>
#include <time.h>

#include "engine.h"

/* the input of an int4 matrix-vector product as the int4 kernels read it (kernels.h): even
 * inputs, then odd ones, then the sum of each group; or, where int4 rows take int8 inputs
 * (int4_q8_on), the layout int4_q8 reads:
 * - K codes, each block of 32 inputs rounded to int8 as prep_q8 rounds it, its 16 even
 *   inputs (E, meeting a code byte's low nibbles) apart from its 16 odd ones (O, the high
 *   nibbles), two blocks a pair: E_2p E_2p+1 O_2p O_2p+1 (a last, unpaired block: E O);
 * - float32: the block scales d (K / 32); the same, four lanes each (a pair's scales in the
 *   halves of one register); per group two lanes (-8 xsum, xsum), four groups in the order
 *   0, 2, 1, 3 (that of their (scale, zero) pairs after int4_q8's shuffle); xsum per group.
 *   xsum is the rounded input's (d times its codes' sum), as llama.cpp's Q8_1 keeps it: the
 *   zero term then meets the same input as the codes, and the product is W x~ (with the
 *   float sum, the rounding error of the codes' side, all codes 0..15, did not cancel: 3.0%
 *   mean relative logit error on the tests' tiny Llama, against 1.2% for int8 rows) */
static void prep_int4_f32(const Mat *m, const float *x, float *prep) {
    const int K = m->cols, half = K / 2, G = m->group;
    for (int j = 0; j < half; j++) prep[j] = x[2 * j], prep[half + j] = x[2 * j + 1];
    for (int g = 0; g < K / G; g++) {
        float sum = 0.f;
        for (int k = g * G; k < (g + 1) * G; k++) sum += x[k];
        prep[K + g] = sum;
    }
}

/* a block of 32 inputs' scale for rounding to int8 (max |x| / 127) and its inverse: the
 * rounding of prep_q8 and prep_int4 alike */
static inline float block_scale(const float *xb, float *inv) {
    float amax = 0.f;
    for (int i = 0; i < 32; i++) amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
    *inv = amax > 0.f ? 127.f / amax : 0.f;
    return amax / 127.f;
}

static void prep_int4_q8(const Mat *m, const float *x, void *prep) {
    const int K = m->cols, nb = K / 32, G = m->group, ng = K / G;
    int8_t *q = prep;
    float *d = (float *)(q + K), *d4 = d + nb, *cz = d4 + 4 * (size_t)nb, *xs = cz + 2 * (size_t)ng;
    for (int g = 0; g < ng; g++) xs[g] = 0.f;
    for (int b = 0; b < nb; b++) {
        const float *xb = x + 32 * b;
        float inv;
        d[b] = block_scale(xb, &inv);
        const int paired = b / 2 * 2 + 1 < nb, at = 64 * (b / 2) + (paired ? 16 * (b % 2) : 0);
        int sum = 0;
        for (int i = 0; i < 16; i++) {
            const int8_t e = (int8_t)lrintf(xb[2 * i] * inv), o = (int8_t)lrintf(xb[2 * i + 1] * inv);
            q[at + i] = e, q[at + (paired ? 32 : 16) + i] = o, sum += e + o;
        }
        for (int i = 0; i < 4; i++) d4[4 * b + i] = d[b];
        xs[b * 32 / G] += d[b] * (float)sum;
    }
    for (int g = 0; g < ng; g++) {
        const int lane = g / 4 * 4 + 4 > ng ? g : g / 4 * 4 + (g % 4 == 1 ? 2 : g % 4 == 2 ? 1 : g % 4); /* 0, 2, 1, 3 */
        cz[2 * lane] = -8.f * xs[g], cz[2 * lane + 1] = xs[g];
    }
}

void prep_int4(const Mat *m, const float *x, void *prep) {
    if (int4_q8_on())
        prep_int4_q8(m, x, prep);
    else
        prep_int4_f32(m, x, prep);
}

/* the input of an int8 matrix-vector product or 8-bit table rounded to int8 per block of 32
 * (act_bits 8): K codes, then K / 32 float32 scales (max |x| / 127 of each block); 0 (nothing
 * written) where the float kernel runs it: act_bits 32, no q8 kernel, K not a multiple of 32 */
int prep_q8(const Mat *m, const float *x, void *prep) {
    const int K = m->cols;
    const q8_fn q8 = m->type == W_INT8 ? kernels->int8_q8 : m->type == W_INT8_B32 ? kernels->int8_b32_q8 : NULL;
    if (act_bits != 8 || !q8 || K % 32) return 0;
    int8_t *q = prep;
    float *d = (float *)(q + K);
    for (int b = 0; b < K / 32; b++) {
        const float *xb = x + 32 * b;
        float inv;
        d[b] = block_scale(xb, &inv);
        for (int i = 0; i < 32; i++) q[32 * b + i] = (int8_t)lrintf(xb[i] * inv);
    }
    return 1;
}

/* y[r] for r in [r0, r1): the dot products, then the row's scale and bias (int4: `prep`,
 * the input as prep_int4 made it; int8 and 8-bit tables with a `prep`: prep_q8's) */
static void mat_rows(const Mat *m, const float *x, const float *prep, float *y, int r0, int r1) {
    if (r1 <= r0) return;
    if (m->type == W_INT4 && int4_q8_on())
        kernels->int4_q8(m, prep, r0, r1, y);
    else if (m->type == W_INT4)
        kernels->int4(m, prep, r0, r1, y);
    else if (m->type == W_INT8 && prep)
        kernels->int8_q8(m, prep, r0, r1, y);
    else if (m->type == W_INT8_B32 && prep)
        kernels->int8_b32_q8(m, prep, r0, r1, y);
    else if (m->type == W_INT8_B32)
        kernels->int8_b32(m, x, r0, r1, y);
    else
        kernels->gemv[m->type](m->w, x, m->cols, r0, r1, y);
    if (m->scale)
        for (int r = r0; r < r1; r++) y[r] *= m->scale[r];
    if (m->bias)
        for (int r = r0; r < r1; r++) y[r] += m->bias[r];
}

void task_mat(void *ctx, int tid, int nth) {
    Job *j = (Job *)ctx;
    int lo, hi;
    while (take_rows(tid, nth, &lo, &hi)) {
        if (!j->add) {
            mat_rows(j->mat, j->in, j->prep, j->out, lo, hi);
            continue;
        }
        mat_rows(j->mat, j->in, j->prep, j->m->tmp, lo, hi);
        for (int r = lo; r < hi; r++) j->out[r] += j->m->tmp[r];
    }
}

static void task_gate_up(void *ctx, int tid, int nth) { /* gu[r] = silu(gate[r]) * up[r] */
    Job *j = (Job *)ctx;
    const int inter = j->m->inter;
    int lo, hi;
    float *g = j->m->gu;
    while (take_rows(tid, nth, &lo, &hi)) {
        mat_rows(j->mat, j->in, j->prep, g, lo, hi);
        mat_rows(j->mat, j->in, j->prep, g, inter + lo, inter + hi);
        act_mul(j->m, g + lo, g + inter + lo, j->out + lo, hi - lo);
    }
}

static void task_attn(void *ctx, int tid, int nth) { /* attend.c's units */
    Job *j = (Job *)ctx;
    float *scratch = j->m->scores + step_attend_floats(j->m, j->max_tokens) + tid * ATT_SCRATCH(j->m->head_dim);
    int lo, hi;
    while (take_rows(tid, nth, &lo, &hi))
        for (int u = lo; u < hi; u++) step_attend_unit(j->m, j->attend, u, scratch);
}

/* where a step's time goes (profile(True) turns the clock on): wall time of each part on
 * the calling thread, summed over steps */
const char *PART_NAMES[P_PARTS] = {"norms, rotary, cache writes", "q/k/v", "attention", "o", "gate/up + SiLU",
                                   "down", "head"};
int profiling;
double part_seconds[P_PARTS];
long profiled_steps;

static inline double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static inline void lap(int part, double *t) {
    if (!profiling) return;
    const double n = now();
    part_seconds[part] += n - *t;
    *t = n;
}

/* a matrix-vector product of the step, on all threads */
void product(Job *j, task_fn task, const Mat *mat, const float *in, float *out, int add, int nth) {
    j->mat = mat, j->in = in, j->out = out, j->add = add, j->prep = NULL;
    if (mat->type == W_INT4) {
        prep_int4(mat, in, j->m->prep);
        j->prep = j->m->prep;
    } else if (prep_q8(mat, in, j->m->prep)) {
        j->prep = j->m->prep;
    }
    parallel_rows(task, j, task == task_mat ? mat->rows : j->m->inter, 4, nth);
}

void run_step(Model *m, int token, int pos, uint16_t *kc, uint16_t *vc, int max_tokens, const float *cos,
              const float *sin, float *logits, int nth) {
    const int H = m->hidden, D = m->head_dim, qn = m->heads * D, kn = m->kv_heads * D;
    double t = profiling ? now() : 0.0;
    embed_row(m, token, m->x);
    if (m->n_ropes) model_rope(m, pos, pos, m->rope, m->rope + D);
    Job j = {.m = m, .kc = kc, .vc = vc, .max_tokens = max_tokens};
    for (int l = 0; l < m->n_layers; l++) {
        const Layer *L = &m->layers[l];
        rms_norm(m->x, L->in_norm, m->h, H, m->eps);
        lap(P_SERIAL, &t);
        product(&j, task_mat, &L->qkv, m->h, m->qkv, 0, nth);
        lap(P_QKV, &t);
        if (L->q_norm) qk_norm(m, L, m->qkv);
        if (L->rope >= 0) {
            const float *c = m->n_ropes ? m->rope + (size_t)L->rope * 2 * D : cos, *s = m->n_ropes ? c + D : sin;
            for (int h = 0; h < m->heads + m->kv_heads; h++) rotate(m->qkv + (size_t)h * D, c, s, m->rot_dim);
        }
        j.cap = kv_positions(m, l, max_tokens), j.layer_at = kv_layer(m, l, max_tokens);
        j.n = pos + 1 < j.cap ? pos + 1 : j.cap; /* a ring holds the last cap positions */
        for (int g = 0; g < m->kv_heads; g++) {
            const size_t at = j.layer_at + ((size_t)g * j.cap + pos % j.cap) * D;
            for (int d = 0; d < D; d++) {
                kc[at + d] = f32_to_bf16(m->qkv[qn + g * D + d]);
                vc[at + d] = f32_to_bf16(m->qkv[qn + kn + g * D + d]);
            }
        }
        lap(P_SERIAL, &t);
        j.layer = l;
        StepAttend sa = {.q = m->qkv, .out = m->att, .K = kc + j.layer_at, .V = vc + j.layer_at,
                         .stride = (size_t)j.cap * D, .partial = m->scores};
        j.attend = &sa;
        parallel_rows(task_attn, &j, step_attend_plan(m, &sa, j.n, 2 * nth), 1, nth);
        step_attend_merge(m, &sa);
        lap(P_ATTN, &t);
        if (L->attn_out_norm) {
            product(&j, task_mat, &L->o, m->att, m->h, 0, nth);
            norm_add(m->h, L->attn_out_norm, m->x, m->h, H, m->eps);
        } else {
            product(&j, task_mat, &L->o, m->att, m->x, 1, nth);
        }
        lap(P_O, &t);
        rms_norm(m->x, L->post_norm, m->h, H, m->eps);
        lap(P_SERIAL, &t);
        product(&j, task_gate_up, &L->gate_up, m->h, m->tmp + H, 0, nth); /* tmp: [H | inter] */
        lap(P_GATE_UP, &t);
        if (L->mlp_out_norm) {
            product(&j, task_mat, &L->down, m->tmp + H, m->h, 0, nth);
            norm_add(m->h, L->mlp_out_norm, m->x, m->h, H, m->eps);
        } else {
            product(&j, task_mat, &L->down, m->tmp + H, m->x, 1, nth);
        }
        lap(P_DOWN, &t);
    }
    rms_norm(m->x, m->norm, m->h, H, m->eps);
    lap(P_SERIAL, &t);
    product(&j, task_mat, &m->head, m->h, logits, 0, nth);
    if (m->final_softcap > 0.f) soft_cap(logits, m->vocab, m->final_softcap);
    lap(P_HEAD, &t);
    profiled_steps += profiling != 0;
}
