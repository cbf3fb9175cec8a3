/* Decode steps of several sequences in one pass (continuous batching in `edgepack serve`).
 * Decoding is bound by reading the weights: a step of one sequence reads every weight row
 * once to use it once. Here each thread takes its rows of a matrix in blocks small enough
 * to stay in cache (BLOCK_BYTES) and runs the step's own matrix-vector kernel over a block
 * for every sequence in turn: the block comes from memory once and from cache B - 1 times.
 * Each sequence has its own token, position and KV cache; norms, rotary, attention and
 * SiLU are run_step's, sequence by sequence.
 *
 * The kernels are the step's (the dispatch table's gemv / int4 / int8_q8 / int4_q8) or,
 * where the set has them, their batched twins (gemv_batch, int8_q8_batch, int4_q8_batch:
 * each weight loaded and converted once for all sequences, which is what bounds a batched
 * step once the block sits in cache), applied per row as in run_step, with int8 activations
 * where run_step uses them (act_bits 8: each sequence's input rounded by prep_q8 or
 * prep_int4), so every sequence's logits are bitwise those of run_step: greedy decoding
 * gives the same tokens batched or alone.
 *
 * Rows are shared out as run_step shares them (pool.c, take_rows): each thread its own
 * region a chunk at a time, then what is left of the others'. With a static split, a thread
 * preempted by another program held up the whole matrix: on this 2-core box at load ~6, a
 * step of one sequence ran at 0.70x run_step's tokens/s. */
#include <stdlib.h>

#include "engine.h"

/* rows of a matrix read as one block: SmolLM2-135M 8-bit, 2 threads, 4 sequences: 32 KiB
 * (L1) and 128 KiB (L2) came within noise; 64 KiB leaves room for the inputs */
#ifndef EP_BLOCK_BYTES
#define EP_BLOCK_BYTES 65536
#endif

/* a sequence's scratch: x[H] h[H] qkv[Q] att[qn] gu[2 inter] act[inter] tmp[widest] prep[widest + widest / 32 + 1] rope[2 D] */
enum { S_X, S_H, S_QKV, S_ATT, S_GU, S_ACT, S_TMP, S_PREP, S_ROPE, S_PARTS, S_LOGITS = -1 };

typedef struct {
    Model *m;
    const BatchSeq *seqs;
    int B, layer;
    const Mat *mat;
    float *scratch, *scores; /* scores: each thread's attention scratch (ATT_SCRATCH) */
    StepAttend *attend;      /* each sequence's decode attention (attend.c) */
    int *first;              /* where each sequence's units start, B + 1 */
    size_t off[S_PARTS + 1]; /* where each part starts in a sequence's scratch; its size last */
    int in, out, add, q8;    /* parts: the input, the output (S_LOGITS: each sequence's logits); q8: prep_q8 made S_PREP */
    const float **xs;        /* each sequence's input and kernel output (its S_TMP with add) */
    float **ts;
    const void **ps;         /* each sequence's S_PREP */
} Steps;

static void offsets(const Model *m, size_t *at) {
    const int qn = m->heads * m->head_dim, q = qn + 2 * m->kv_heads * m->head_dim;
    const int widest = m->hidden > m->inter ? (m->hidden > qn ? m->hidden : qn) : (m->inter > qn ? m->inter : qn);
    const size_t sizes[S_PARTS] = {m->hidden, m->hidden, q, qn, 2 * (size_t)m->inter, m->inter, widest,
                                   widest + widest / 32 + 1, 2 * (size_t)m->head_dim};
    size_t total = 0;
    for (int i = 0; i < S_PARTS; i++) at[i] = total, total += (sizes[i] + 15) & ~(size_t)15; /* 64-byte aligned */
    at[S_PARTS] = total;
}

static float *part(const Steps *s, int b, int which) {
    return which == S_LOGITS ? s->seqs[b].logits : s->scratch + (size_t)b * s->off[S_PARTS] + s->off[which];
}

/* y[r] for rows [r0, r1) of every sequence: the block read once, then once more per
 * sequence from cache; the row's scale and bias as mat_rows (step.c) applies them, and
 * with `add` the result added to y as task_mat does */
static void block_rows(const Steps *s, const Mat *mt, int r0, int r1, int in, int out, int add) {
    const size_t row_bytes = mt->type == W_INT4 ? (size_t)mt->cols / 2 + (size_t)mt->cols / mt->group * 4
                             : mt->type == W_INT8_B32 ? (size_t)mt->cols + (size_t)mt->cols / 16
                             : (size_t)mt->cols * (mt->type == W_INT8 ? 1 : mt->type == W_F32 ? 4 : 2);
    int rows = (int)(EP_BLOCK_BYTES / row_bytes) & ~3;
    rows = rows < 4 ? 4 : rows;
    const gemv_batch_fn together = mt->type >= W_INT4 || s->q8 ? NULL : kernels->gemv_batch[mt->type];
    const q8_batch_fn together_q8 = s->q8 && mt->type == W_INT8           ? kernels->int8_q8_batch
                                    : mt->type == W_INT4 && int4_q8_on() ? kernels->int4_q8_batch
                                                                         : NULL;
    for (int rb = r0; rb < r1; rb += rows) {
        const int re = rb + rows < r1 ? rb + rows : r1;
        if (together) together(mt->w, s->xs, s->B, mt->cols, rb, re, s->ts);
        if (together_q8) together_q8(mt, s->ps, s->B, rb, re, s->ts);
        for (int b = 0; b < s->B; b++) {
            float *y = part(s, b, out), *t = add ? part(s, b, S_TMP) : y;
            if (together || together_q8)
                ; /* every sequence's rows done above */
            else if (mt->type == W_INT4 && int4_q8_on())
                kernels->int4_q8(mt, part(s, b, S_PREP), rb, re, t);
            else if (mt->type == W_INT4)
                kernels->int4(mt, part(s, b, S_PREP), rb, re, t);
            else if (mt->type == W_INT8_B32 && s->q8)
                kernels->int8_b32_q8(mt, part(s, b, S_PREP), rb, re, t);
            else if (mt->type == W_INT8_B32)
                kernels->int8_b32(mt, part(s, b, in), rb, re, t);
            else if (s->q8)
                kernels->int8_q8(mt, part(s, b, S_PREP), rb, re, t);
            else
                kernels->gemv[mt->type](mt->w, part(s, b, in), mt->cols, rb, re, t);
            if (mt->scale)
                for (int r = rb; r < re; r++) t[r] *= mt->scale[r];
            if (mt->bias)
                for (int r = rb; r < re; r++) t[r] += mt->bias[r];
            if (add)
                for (int r = rb; r < re; r++) y[r] += t[r];
        }
    }
}

static void task_rows(void *ctx, int tid, int nth) {
    const Steps *s = (const Steps *)ctx;
    int lo, hi;
    while (take_rows(tid, nth, &lo, &hi)) block_rows(s, s->mat, lo, hi, s->in, s->out, s->add);
}

static void task_gate_up_rows(void *ctx, int tid, int nth) { /* act = silu(gate) * up, as task_gate_up (step.c) */
    const Steps *s = (const Steps *)ctx;
    const int inter = s->m->inter;
    int lo, hi;
    while (take_rows(tid, nth, &lo, &hi)) {
        block_rows(s, s->mat, lo, hi, S_H, S_GU, 0);
        block_rows(s, s->mat, inter + lo, inter + hi, S_H, S_GU, 0);
        for (int b = 0; b < s->B; b++) {
            const float *g = part(s, b, S_GU);
            kernels->silu(g + lo, g + inter + lo, part(s, b, S_ACT) + lo, hi - lo);
        }
    }
}

static void task_attn_seqs(void *ctx, int tid, int nth) { /* (sequence, attend.c unit) pairs */
    const Steps *s = (const Steps *)ctx;
    float *scratch = s->scores + tid * ATT_SCRATCH(s->m->head_dim);
    int lo, hi;
    while (take_rows(tid, nth, &lo, &hi))
        for (int p = lo; p < hi; p++) {
            int b = 0;
            while (p >= s->first[b + 1]) b++;
            step_attend_unit(s->m, &s->attend[b], p - s->first[b], scratch);
        }
}

static void rows(Steps *s, task_fn task, const Mat *mat, int in, int out, int add, int nth) {
    s->mat = mat, s->in = in, s->out = out, s->add = add;
    for (int b = 0; b < s->B; b++) s->xs[b] = part(s, b, in), s->ts[b] = add ? part(s, b, S_TMP) : part(s, b, out);
    s->q8 = 0;
    if (mat->type == W_INT4)
        for (int b = 0; b < s->B; b++) prep_int4(mat, part(s, b, in), part(s, b, S_PREP));
    else
        for (int b = 0; b < s->B; b++) s->q8 = prep_q8(mat, part(s, b, in), part(s, b, S_PREP));
    for (int b = 0; b < s->B; b++) s->ps[b] = part(s, b, S_PREP);
    parallel_rows(task, s, task == task_rows ? mat->rows : s->m->inter, 4, nth);
}

static float *scratch_floats;
static size_t scratch_size;

/* grown as needed, kept between calls (called under step_lock); 0 if out of memory */
static int grow(size_t floats) {
    if (floats <= scratch_size) return 1;
    float *p = malloc(floats * sizeof(float));
    if (!p) return 0;
    free(scratch_floats);
    scratch_floats = p, scratch_size = floats;
    return 1;
}

int run_steps(Model *m, const BatchSeq *seqs, int B, float theta, int nth) {
    const int H = m->hidden, D = m->head_dim, qn = m->heads * D, kn = m->kv_heads * D;
    Steps s = {.m = m, .seqs = seqs, .B = B};
    offsets(m, s.off);
    int longest = 1;
    for (int b = 0; b < B; b++) longest = seqs[b].max_tokens > longest ? seqs[b].max_tokens : longest;
    const size_t partial = step_attend_floats(m, longest);
    const float **xs = malloc(3 * (size_t)B * sizeof(float *) + (size_t)B * sizeof(StepAttend) + (B + 1) * sizeof(int));
    if (!xs || !grow((s.off[S_PARTS] + partial) * B + (size_t)nth * ATT_SCRATCH(D))) {
        free(xs);
        return -1;
    }
    s.xs = xs, s.ts = (float **)(xs + B), s.ps = (const void **)(xs + 2 * B);
    s.attend = (StepAttend *)(xs + 3 * B), s.first = (int *)(s.attend + B);
    s.scratch = scratch_floats, s.scores = scratch_floats + (s.off[S_PARTS] + partial) * B;
    for (int b = 0; b < B; b++)
        s.attend[b] = (StepAttend){.q = part(&s, b, S_QKV), .out = part(&s, b, S_ATT), .stride = (size_t)seqs[b].max_tokens * D,
                                   .partial = scratch_floats + s.off[S_PARTS] * B + partial * b};
    for (int b = 0; b < B; b++) {
        float *x = part(&s, b, S_X), *rope = part(&s, b, S_ROPE);
        embed_row(m, seqs[b].token, x);
        rope_tables(theta, D, seqs[b].pos, rope, rope + D);
    }
    for (int l = 0; l < m->n_layers; l++) {
        const Layer *L = &m->layers[l];
        for (int b = 0; b < B; b++) rms_norm(part(&s, b, S_X), L->in_norm, part(&s, b, S_H), H, m->eps);
        rows(&s, task_rows, &L->qkv, S_H, S_QKV, 0, nth);
        for (int b = 0; b < B; b++) {
            float *qkv = part(&s, b, S_QKV), *rope = part(&s, b, S_ROPE);
            const BatchSeq *q = &seqs[b];
            for (int h = 0; h < m->heads + m->kv_heads; h++) rotate(qkv + (size_t)h * D, rope, rope + D, D);
            for (int g = 0; g < m->kv_heads; g++) {
                const size_t at = (((size_t)l * m->kv_heads + g) * q->max_tokens + q->pos) * D;
                for (int d = 0; d < D; d++) {
                    q->kc[at + d] = f32_to_bf16(qkv[qn + g * D + d]);
                    q->vc[at + d] = f32_to_bf16(qkv[qn + kn + g * D + d]);
                }
            }
        }
        s.layer = l, s.first[0] = 0;
        for (int b = 0; b < B; b++) {
            StepAttend *a = &s.attend[b];
            const size_t at = (size_t)l * m->kv_heads * seqs[b].max_tokens * D;
            a->K = seqs[b].kc + at, a->V = seqs[b].vc + at;
            s.first[b + 1] = s.first[b] + step_attend_plan(m, a, seqs[b].pos + 1, 1);
        }
        parallel_rows(task_attn_seqs, &s, s.first[B], 1, nth);
        for (int b = 0; b < B; b++) step_attend_merge(m, &s.attend[b]);
        rows(&s, task_rows, &L->o, S_ATT, S_X, 1, nth);
        for (int b = 0; b < B; b++) rms_norm(part(&s, b, S_X), L->post_norm, part(&s, b, S_H), H, m->eps);
        rows(&s, task_gate_up_rows, &L->gate_up, S_H, S_GU, 0, nth);
        rows(&s, task_rows, &L->down, S_ACT, S_X, 1, nth);
    }
    for (int b = 0; b < B; b++) rms_norm(part(&s, b, S_X), m->norm, part(&s, b, S_H), H, m->eps);
    rows(&s, task_rows, &m->head, S_H, S_LOGITS, 0, nth);
    free(xs);
    return 0;
}
