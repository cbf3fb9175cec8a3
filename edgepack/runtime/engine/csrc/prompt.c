/* A prompt's tokens go through each matrix together: a GEMM, not one GEMV per token. Each
 * thread takes rows of the weight, converts PB of them at a time to float32 (they stay in
 * L1/L2) and multiplies them with the chunk's tokens in register tiles: a weight is read
 * from memory once per chunk of CHUNK tokens instead of once per token, and converted once
 * per chunk. Norms, rotary, attention and SiLU as in the step, token by token. */
#include <stdlib.h>

#include "engine.h"

/* rows [r0, r0 + n) of m as float32 (int8: the raw codes; their scale is applied after) */
#define EP_GENERIC_CVT(NAME, T, CONV)                                                 \
    static void NAME(const void *W, size_t at, size_t count, float *out) {             \
        const T *w = (const T *)W + at;                                                \
        _Pragma("omp simd") for (size_t i = 0; i < count; i++) out[i] = CONV(w[i]);    \
    }
#define EP_CAST(v) ((float)(v))
EP_GENERIC_CVT(cvt_int8, int8_t, EP_CAST)
EP_GENERIC_CVT(cvt_bf16, uint16_t, bf16_to_f32)
EP_GENERIC_CVT(cvt_f16, uint16_t, f16_to_f32)
EP_GENERIC_CVT(cvt_f32, float, EP_CAST)

void int4_rows_f32(const Mat *m, int r0, int r1, float *out) {
    const int K = m->cols, half = K / 2, G = m->group, ng = K / G;
    for (int r = r0; r < r1; r++) {
        const uint8_t *c = (const uint8_t *)m->w + (size_t)r * half;
        float *o = out + (size_t)(r - r0) * K;
        for (int g = 0; g < ng; g++) {
            const float s = bf16_to_f32(m->sz[((size_t)r * ng + g) * 2]), z = bf16_to_f32(m->sz[((size_t)r * ng + g) * 2 + 1]);
            const float b = z - 8.f * s;
            for (int j = g * G / 2; j < (g + 1) * G / 2; j++) {
                o[2 * j] = (float)(c[j] & 15) * s + b;
                o[2 * j + 1] = (float)(c[j] >> 4) * s + b;
            }
        }
    }
}

static void rows_f32(const Mat *m, int r0, int r1, float *out) {
    const size_t at = (size_t)r0 * m->cols, count = (size_t)(r1 - r0) * m->cols;
    switch (m->type) {
    case W_INT8: cvt_int8(m->w, at, count, out); break;
    case W_BF16: cvt_bf16(m->w, at, count, out); break;
    case W_F16: cvt_f16(m->w, at, count, out); break;
    case W_F32: cvt_f32(m->w, at, count, out); break;
    default: int4_rows_f32(m, r0, r1, out);
    }
}

/* xt[k, t] = x[t, k] for t < T, zero up to ldx (whole registers of tokens) */
static void transpose_inputs(const float *x, int T, int K, float *xt, int ldx) {
    for (int k = 0; k < K; k++) {
        float *row = xt + (size_t)k * ldx;
        for (int t = 0; t < T; t++) row[t] = x[(size_t)t * K + k];
        for (int t = T; t < ldx; t++) row[t] = 0.f;
    }
}

/* out[t, r] (add: +=) = (W x_t)[r] * scale[r] + bias[r] for rows [r0, r1) and tokens t < T;
 * xt: the inputs transposed (transpose_inputs, ldx columns); w32: PB x cols floats of scratch */
static void gemm_rows(const Mat *m, const float *xt, int ldx, int T, int r0, int r1, float *w32, float *out, int ldo,
                      int add) {
    const int K = m->cols;
    const Tiles *tl = kernels->tiles;
    /* tokens in blocks of at most lanes x max_tv, as even as whole registers allow (64 tokens
     * on AVX-512: 32 + 32, not 48 + 16, whose one register a row is load-bound) */
    const int most = tl->lanes * tl->max_tv, blocks = (T + most - 1) / most;
    const int step = ((T + blocks - 1) / blocks + tl->lanes - 1) / tl->lanes * tl->lanes;
    float raw[8 * 48];
    for (int rb = r0; rb < r1; rb += PB) {
        const int re = rb + PB < r1 ? rb + PB : r1;
        rows_f32(m, rb, re, w32);
        for (int r = rb; r < re;) {
            int kind = 0;
            while (tl->rb[kind] > re - r) kind++;
            const int nr = tl->rb[kind];
            for (int t0 = 0; t0 < T; t0 += step) {
                const int nt = T - t0 < step ? T - t0 : step, tv = (nt + tl->lanes - 1) / tl->lanes, w = tv * tl->lanes;
                tl->tile[kind][tv](w32 + (size_t)(r - rb) * K, K, xt + t0, ldx, raw);
                for (int t = 0; t < nt; t++) {
                    float *o = out + (size_t)(t0 + t) * ldo + r;
                    for (int i = 0; i < nr; i++) {
                        float v = raw[i * w + t];
                        if (m->scale) v *= m->scale[r + i];
                        if (m->bias) v += m->bias[r + i];
                        o[i] = add ? o[i] + v : v;
                    }
                }
            }
            r += nr;
        }
    }
}

typedef struct {
    Model *m;
    const Mat *mat;
    const float *xt; /* the inputs transposed: [cols, ldx] */
    float *out, *w32, *act; /* act: gate/up only, [T, inter] = silu(gate) * up */
    int T, ldx, ldo, add;
    size_t w32_floats;
    /* attention */
    float *q, *att, *scores;
    const uint16_t *kc, *vc;
    int pos, max_tokens, layer, qkv_width;
    int cap;         /* positions the layer's cache holds (kv_positions) */
    size_t layer_at; /* where its keys / values start (kv_layer) */
    int win_len, win_prev; /* a sliding-window layer: keys | values in s->win, win_prev of them before the chunk */
    const uint16_t *win;
} Batch;

static void task_gemm(void *ctx, int tid, int nth) {
    Batch *b = (Batch *)ctx;
    int lo, hi;
    while (take_rows(tid, nth, &lo, &hi))
        gemm_rows(b->mat, b->xt, b->ldx, b->T, lo, hi, b->w32 + tid * b->w32_floats, b->out, b->ldo, b->add);
}

static void task_gemm_gate_up(void *ctx, int tid, int nth) {
    Batch *b = (Batch *)ctx;
    const int inter = b->m->inter;
    int lo, hi;
    float *w32 = b->w32 + tid * b->w32_floats;
    while (take_rows(tid, nth, &lo, &hi)) {
        gemm_rows(b->mat, b->xt, b->ldx, b->T, lo, hi, w32, b->out, 2 * inter, 0);
        gemm_rows(b->mat, b->xt, b->ldx, b->T, inter + lo, inter + hi, w32, b->out, 2 * inter, 0);
        for (int t = 0; t < b->T; t++) {
            const float *g = b->out + (size_t)t * 2 * inter;
            act_mul(b->m, g + lo, g + inter + lo, b->act + (size_t)t * inter + lo, hi - lo);
        }
    }
}

/* The chunk's attention in units of (tokens, kv head, heads of its group): up to ATT_ROWS
 * queries, the group's heads for as many tokens as fit, against the kv head's keys and values,
 * each read and converted once for them all (one (token, head) at a time read the chunk's
 * context 96 x 9 times a layer for SmolLM2's 9 heads). Row (t, h) sees positions up to pos + t,
 * the last `window` of them on a sliding-window layer (in order in s->win). */
static int attn_units(const Model *m, int T, int *hs, int *tb) {
    const int G = m->heads / m->kv_heads;
    *hs = G < ATT_ROWS ? G : ATT_ROWS, *tb = ATT_ROWS / *hs;
    return (T + *tb - 1) / *tb * m->kv_heads * ((G + *hs - 1) / *hs);
}

static void task_attn_batch(void *ctx, int tid, int nth) {
    Batch *b = (Batch *)ctx;
    const Model *m = b->m;
    const int D = m->head_dim, G = m->heads / m->kv_heads;
    int hs, tb, lo, hi;
    attn_units(m, b->T, &hs, &tb);
    const int subs = (G + hs - 1) / hs;
    float *scratch = b->scores + tid * ATT_SCRATCH(D);
    Attend a = {.D = D, .scale = attend_scale(m), .cap = m->attn_softcap, .s = scratch,
                .tmp = scratch + (size_t)ATT_ROWS * ATT_BLOCK};
    while (take_rows(tid, nth, &lo, &hi))
        for (int u = lo; u < hi; u++) {
            const int sub = u % subs, g = u / subs % m->kv_heads, t0 = u / subs / m->kv_heads * tb;
            const int t1 = t0 + tb < b->T ? t0 + tb : b->T, h0 = g * G + sub * hs, h1 = h0 + hs < (g + 1) * G ? h0 + hs : (g + 1) * G;
            int off = 0; /* the position of the keys' first row */
            if (b->win) {
                const size_t at = (size_t)g * b->win_len * D;
                a.K = b->win + at, a.V = b->win + (size_t)m->kv_heads * b->win_len * D + at, off = b->pos - b->win_prev;
            } else {
                const size_t at = b->layer_at + (size_t)g * b->cap * D;
                a.K = b->kc + at, a.V = b->vc + at;
            }
            a.R = 0;
            for (int t = t0; t < t1; t++) {
                const int n = b->pos + t + 1, first = b->win && n > m->window ? n - m->window : 0;
                for (int h = h0; h < h1; h++, a.R++) {
                    a.q[a.R] = b->q + (size_t)t * b->qkv_width + (size_t)h * D;
                    a.o[a.R] = b->att + ((size_t)t * m->heads + h) * D;
                    a.lo[a.R] = first - off, a.hi[a.R] = n - off;
                }
            }
            kernels->attend(&a);
            for (int r = 0; r < a.R; r++) {
                const float inv = 1.f / a.sum[r];
                for (int d = 0; d < D; d++) a.o[r][d] *= inv;
            }
        }
}

void rope_tables(float theta, int D, int pos, float *cos, float *sin) {
    const int half = D / 2;
    for (int i = 0; i < half; i++) {
        const float inv = 1.f / powf(theta, (float)(2 * i) / (float)D);
        const float f = (float)pos * inv;
        cos[i] = cos[i + half] = cosf(f);
        sin[i] = sin[i + half] = sinf(f);
    }
}

int prompt_scratch(const Model *m, int nth, int max_tokens, PromptScratch *s) {
    const int H = m->hidden, qkv = (m->heads + 2 * m->kv_heads) * m->head_dim, qn = m->heads * m->head_dim;
    const int widest = H > m->inter ? H : m->inter;
    s->w32_floats = (size_t)PB * (widest > qn ? widest : qn);
    const size_t per_token = (size_t)2 * H + qkv + qn + 2 * (size_t)m->inter + m->inter;
    const size_t xt_floats = (size_t)(widest > qn ? widest : qn) * (CHUNK + 16);
    const size_t ropes = m->n_ropes > 1 ? (size_t)m->n_ropes : 1;
    /* a sliding-window layer's keys and values (bfloat16, two a float) for a chunk and the window before it */
    const int window = m->window < max_tokens ? m->window : max_tokens;
    const size_t win_floats = m->n_sliding ? (size_t)m->kv_heads * (window - 1 + CHUNK) * m->head_dim : 0;
    const size_t floats = CHUNK * per_token + nth * s->w32_floats + nth * ATT_SCRATCH(m->head_dim) +
                          2 * ropes * CHUNK * m->head_dim + xt_floats + win_floats;
    s->x = malloc(floats * sizeof(float));
    if (!s->x) return -1;
    s->h = s->x + (size_t)CHUNK * H, s->qkv = s->h + (size_t)CHUNK * H, s->att = s->qkv + (size_t)CHUNK * qkv;
    s->gu = s->att + (size_t)CHUNK * qn, s->act = s->gu + (size_t)CHUNK * 2 * m->inter;
    s->w32 = s->act + (size_t)CHUNK * m->inter, s->scores = s->w32 + nth * s->w32_floats;
    s->rope = s->scores + nth * ATT_SCRATCH(m->head_dim);
    s->xt = s->rope + 2 * ropes * CHUNK * m->head_dim;
    s->win = (uint16_t *)(s->xt + xt_floats);
    return 0;
}

/* a chunk's keys and values (row t of qkv: position p0 + t) into layer l's cache; for a layer
 * whose ring is shorter than the cache, also the chunk and the window before it, in order,
 * into s->win for the chunk's attention (the ring would overwrite positions the chunk's first
 * tokens still see) */
static void write_kv(Model *m, int l, Batch *b, PromptScratch *s, int n, int width) {
    const int D = m->head_dim, qn = m->heads * D, kn = m->kv_heads * D, p0 = b->pos;
    const int cap = b->cap;
    uint16_t *kc = (uint16_t *)b->kc, *vc = (uint16_t *)b->vc;
    b->win = NULL;
    if (m->layers[l].sliding && cap < b->max_tokens) {
        const int prev = p0 < m->window - 1 ? p0 : m->window - 1, len = prev + n;
        uint16_t *wk = s->win, *wv = s->win + (size_t)m->kv_heads * len * D;
        for (int g = 0; g < m->kv_heads; g++) {
            for (int i = 0; i < prev; i++) { /* position p0 - prev + i, from its slot in the ring */
                const size_t from = b->layer_at + ((size_t)g * cap + (p0 - prev + i) % cap) * D;
                memcpy(wk + ((size_t)g * len + i) * D, kc + from, (size_t)D * 2);
                memcpy(wv + ((size_t)g * len + i) * D, vc + from, (size_t)D * 2);
            }
            for (int t = 0; t < n; t++) {
                const float *row = s->qkv + (size_t)t * width;
                uint16_t *k = wk + ((size_t)g * len + prev + t) * D, *v = wv + ((size_t)g * len + prev + t) * D;
                for (int d = 0; d < D; d++) k[d] = f32_to_bf16(row[qn + g * D + d]), v[d] = f32_to_bf16(row[qn + kn + g * D + d]);
            }
        }
        b->win = s->win, b->win_len = len, b->win_prev = prev;
    }
    for (int t = 0; t < n; t++) {
        const float *row = s->qkv + (size_t)t * width;
        for (int g = 0; g < m->kv_heads; g++) {
            const size_t at = b->layer_at + ((size_t)g * cap + (p0 + t) % cap) * D;
            for (int d = 0; d < D; d++) {
                kc[at + d] = f32_to_bf16(row[qn + g * D + d]);
                vc[at + d] = f32_to_bf16(row[qn + kn + g * D + d]);
            }
        }
    }
}

/* tokens [0, T) at positions pos.. through the model in chunks; the logits of the last */
void run_prompt(Model *m, const int *tokens, int T, int pos, uint16_t *kc, uint16_t *vc, int max_tokens,
                float theta, float *logits, int nth, PromptScratch *s) {
    const int H = m->hidden, D = m->head_dim, qn = m->heads * D, kn = m->kv_heads * D, width = qn + 2 * kn;
    Batch b = {.m = m, .w32 = s->w32, .w32_floats = s->w32_floats, .kc = kc, .vc = vc, .max_tokens = max_tokens,
               .scores = s->scores, .qkv_width = width, .q = s->qkv, .att = s->att};
    const size_t rope_floats = 2 * (size_t)CHUNK * D; /* a table's cos | sin for the chunk's positions, [2, CHUNK, D] */
    const int lanes = kernels->tiles->lanes, R = m->rot_dim;
    const float *set = m->n_ropes ? rope_set(m, pos + T - 1) : NULL; /* one set for the whole call */
    for (int c0 = 0; c0 < T; c0 += CHUNK) {
        const int n = T - c0 < CHUNK ? T - c0 : CHUNK, p0 = pos + c0;
        for (int t = 0; t < n; t++) embed_row(m, tokens[c0 + t], s->x + (size_t)t * H);
        for (int t = 0; t < n; t++) {
            float *cos = s->rope + (size_t)t * D, *sin = cos + (size_t)CHUNK * D;
            if (!m->n_ropes) rope_tables(theta, D, p0 + t, cos, sin);
            for (int r = 0; r < m->n_ropes; r++)
                rope_from_freqs(set + (size_t)r * R / 2, R, p0 + t, m->rope_mult, cos + r * rope_floats, sin + r * rope_floats);
        }
        b.T = n, b.pos = p0, b.ldx = (n + lanes - 1) / lanes * lanes, b.xt = s->xt;
        for (int l = 0; l < m->n_layers; l++) {
            const Layer *L = &m->layers[l];
            for (int t = 0; t < n; t++) rms_norm(s->x + (size_t)t * H, L->in_norm, s->h + (size_t)t * H, H, m->eps);
            transpose_inputs(s->h, n, H, s->xt, b.ldx);
            b.mat = &L->qkv, b.out = s->qkv, b.ldo = width, b.add = 0;
            parallel_rows(task_gemm, &b, L->qkv.rows, PB, nth);
            for (int t = 0; t < n; t++) {
                float *row = s->qkv + (size_t)t * width;
                if (L->q_norm) qk_norm(m, L, row);
                if (L->rope < 0) continue;
                const float *cos = s->rope + L->rope * rope_floats + (size_t)t * D, *sin = cos + (size_t)CHUNK * D;
                for (int h = 0; h < m->heads + m->kv_heads; h++) rotate(row + (size_t)h * D, cos, sin, R);
            }
            b.layer = l, b.cap = kv_positions(m, l, max_tokens), b.layer_at = kv_layer(m, l, max_tokens);
            write_kv(m, l, &b, s, n, width);
            int hs, tb;
            parallel_rows(task_attn_batch, &b, attn_units(m, n, &hs, &tb), 1, nth);
            transpose_inputs(s->att, n, qn, s->xt, b.ldx);
            b.mat = &L->o, b.out = L->attn_out_norm ? s->h : s->x, b.ldo = H, b.add = !L->attn_out_norm;
            parallel_rows(task_gemm, &b, H, PB, nth);
            if (L->attn_out_norm)
                for (int t = 0; t < n; t++) norm_add(s->h + (size_t)t * H, L->attn_out_norm, s->x + (size_t)t * H, s->h + (size_t)t * H, H, m->eps);
            for (int t = 0; t < n; t++) rms_norm(s->x + (size_t)t * H, L->post_norm, s->h + (size_t)t * H, H, m->eps);
            transpose_inputs(s->h, n, H, s->xt, b.ldx);
            b.mat = &L->gate_up, b.out = s->gu, b.act = s->act;
            parallel_rows(task_gemm_gate_up, &b, m->inter, PB, nth);
            transpose_inputs(s->act, n, m->inter, s->xt, b.ldx);
            b.mat = &L->down, b.out = L->mlp_out_norm ? s->h : s->x, b.ldo = H, b.add = !L->mlp_out_norm;
            parallel_rows(task_gemm, &b, H, PB, nth);
            if (L->mlp_out_norm)
                for (int t = 0; t < n; t++) norm_add(s->h + (size_t)t * H, L->mlp_out_norm, s->x + (size_t)t * H, s->h + (size_t)t * H, H, m->eps);
        }
    }
    const int last = (T - 1) % CHUNK;
    rms_norm(s->x + (size_t)last * H, m->norm, m->h, H, m->eps);
    Job j = {.m = m, .mat = &m->head, .in = m->h, .out = logits}; /* float32 input, as the whole prompt (no prep) */
    parallel_rows(task_mat, &j, m->head.rows, 4, nth);
    if (m->final_softcap > 0.f) soft_cap(logits, m->vocab, m->final_softcap);
}
