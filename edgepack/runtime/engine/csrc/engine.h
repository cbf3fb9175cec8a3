/* edgepack's CPU engine: a Llama-family model's decode step and prompt pass in C.
 *
 * A decode step runs as ~40 torch ops a layer in the torch backend; on a small model their
 * per-op overhead is a third of the step, and torch's int8 kernel wants bfloat16
 * activations. The engine runs the whole step (embedding row, per layer [norm, q/k/v,
 * rotary, KV cache write, attention, o, norm, gate/up, SiLU, down], final norm, head) over
 * tensors the Python side already holds (no copy of any weight), with float32 activations
 * (rounded to int8 into a decode step's int8 products where act_bits is 8: below), on a small
 * pool of its own threads (rows of each matrix split between them).
 *
 * Weights: int8 rows with one float32 scale per row (bitsandbytes' int8 storage, SCB/127),
 * edgepack's int4 (codes and (scale, zero) pairs per group), or bfloat16 / float16 /
 * float32. The KV cache is bfloat16, [layers, kv_heads, max_tokens, head_dim].
 *
 * Files: this header (types, scalar helpers, the dispatch table), kernels.h (kernel bodies
 * written once, compiled per instruction set), arch/<cpu>/ (what differs per instruction
 * set), dispatch.c (the table in use), pool.c (threads), step.c (one token), prompt.c (many
 * tokens as GEMMs), attend.c (a step's attention), convert.c, sample.c, module.c (the Python
 * bindings). No Python object is touched while a step runs: the GIL is released.
 */
#ifndef EP_ENGINE_H
#define EP_ENGINE_H

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define EP_X86 1
#include <immintrin.h>
#else
#define EP_X86 0
#endif
#if defined(__aarch64__)
#define EP_ARM 1
#else
#define EP_ARM 0
#endif

/* W_INT8_B32: an 8-bit table (the embedding table / output layer): int8 codes with a float16
 * scale per block of 32 values of a row, W[r, k] = code * sz[r * cols / 32 + k / 32] */
enum { W_INT8 = 0, W_BF16 = 1, W_F16 = 2, W_F32 = 3, W_INT4 = 4, W_INT8_B32 = 5 };

/* Sizes the module exports (PROMPT_ROWS, PROMPT_CHUNK, MAX_THREADS); the planner's memory
 * estimate uses the first two, and the Python side checks they agree at import. */
#define PB 16          /* weight rows converted to float32 at a time in a prompt's GEMM */
#define CHUNK 96       /* prompt tokens per pass through the layers (two AVX-512 tiles of 48) */
#define MAX_THREADS 64 /* the caller plus 63 workers */

typedef struct {
    int type, rows, cols;
    const void *w;
    const float *scale;  /* int8 only: one per row */
    const float *bias;   /* optional, float32 */
    const uint16_t *sz;  /* int4: bfloat16 (scale, zero) pairs, [rows, cols / group, 2];
                          * W_INT8_B32: float16 scales, [rows, cols / 32] */
    int group;           /* int4 only: inputs sharing a pair, a multiple of 32 */
} Mat;

typedef struct {
    const float *in_norm, *post_norm; /* before attention, before the MLP */
    Mat qkv, o, gate_up, down;
    /* what other families add (family.c); NULL / 0 where the layer has none */
    const float *q_norm, *k_norm;              /* RMSNorm of each q and k head before rotary, [head_dim] */
    const float *attn_out_norm, *mlp_out_norm; /* RMSNorm of the attention's and the MLP's outputs (Gemma) */
    int rope;    /* the model's rotary table this layer uses; -1: no rotary (SmolLM3's no_rope_layers) */
    int sliding; /* attends to the last `window` positions only, its KV cache a ring of that many */
} Layer;

enum { ACT_SILU = 0, ACT_GELU_TANH = 1 };

typedef struct {
    int hidden, heads, kv_heads, head_dim, inter, n_layers, vocab;
    float eps;
    int embed_type;
    const void *embed;
    const float *embed_rows; /* W_INT8 tables only: each row's scale (absmax / 127) */
    const uint16_t *embed_b32; /* W_INT8_B32 tables only: float16 scales, [vocab, hidden / 32] */
    const float *norm;
    Mat head;
    Layer *layers;
    /* family features (family.c); a plain Llama has n_ropes 0 (one table from the caller's
     * rope_theta), embed_scale 1, attn_scale 0 (1 / sqrt(head_dim)), no caps, SiLU, no window */
    int n_ropes;         /* rotary tables: inv_freq [n_ropes, rot_dim / 2] (twice that with long_from) */
    float *inv_freq, *rope; /* rope: this step's cos | sin of each table, [n_ropes, 2, head_dim] */
    int rot_dim;         /* the leading dims of each head that rotate (Phi-4-mini: 0.75 of them), even */
    float rope_mult;     /* cos and sin multiplied by it (longrope's attention factor), else 1 */
    int long_from;       /* longrope: a call whose last position is at or past it uses the second set of
                          * n_ropes tables (long factors) for all its tokens, as transformers picks by the
                          * sequence length it is given; 0: one set */
    float embed_scale, attn_scale, attn_softcap, final_softcap;
    int act, window, n_sliding;
    int *sliding_before; /* sliding-window layers below each layer: where its KV cache starts */
    /* scratch */
    float *x, *h, *qkv, *att, *gu, *tmp, *prep;
    float *scores; /* a decode step's attention: partial sums, then each thread's scratch (attend.c) */
    size_t scores_floats;
} Model;

/* ------------------------------------------------------------------ scalar helpers */

/* The KV cache: per layer [kv_heads, positions, head_dim] keys (and as much values), a layer
 * holding max_tokens positions, or min(window, max_tokens) for a sliding-window layer (a
 * ring: position p in slot p % that). Where layer l's keys start and how many positions it holds: */
static inline size_t kv_layer(const Model *m, int l, int max_tokens) {
    if (!m->n_sliding) return (size_t)l * m->kv_heads * max_tokens * m->head_dim;
    const size_t s = (size_t)m->sliding_before[l], cap = (size_t)(m->window < max_tokens ? m->window : max_tokens);
    return (((size_t)l - s) * max_tokens + s * cap) * m->kv_heads * m->head_dim;
}
static inline int kv_positions(const Model *m, int l, int max_tokens) {
    return m->layers[l].sliding && m->window < max_tokens ? m->window : max_tokens;
}

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t h) { /* exact, subnormals included, branch-free */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7fffu, u = em << 13;
    float f;
    memcpy(&f, &u, 4);
    f *= 0x1p112f;
    memcpy(&u, &f, 4);
    if (em >= 0x7c00u) u = (em << 13) | 0x7f800000u; /* inf / nan */
    u |= sign;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_f16(float f) { /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504 */
    if (a < 0x38800000u) {                                   /* float16 subnormal or zero */
        float v;
        memcpy(&v, &a, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(v * 0x1p24f));
    }
    return (uint16_t)(sign | ((a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13));
}

/* e^x for float32, vectorizable (in `omp simd` loops; libm's expf is a call per value):
 * Cephes' expf, x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for e^r, 2^n built
 * in the exponent bits; relative error ~1e-7. Below -87.3 it returns ~1e-38, not 0. */
static inline __attribute__((always_inline)) float ep_exp(float x) {
    x = x < -87.3f ? -87.3f : x > 88.3f ? 88.3f : x;
    /* n = round(x / ln2) by adding and subtracting 1.5 x 2^23 (no floorf: a libm call before SSE4.1) */
    const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

static inline float load_value(int type, const void *w, size_t i) {
    switch (type) {
    case W_INT8: return (float)((const int8_t *)w)[i];
    case W_BF16: return bf16_to_f32(((const uint16_t *)w)[i]);
    case W_F16: return f16_to_f32(((const uint16_t *)w)[i]);
    default: return ((const float *)w)[i];
    }
}

/* Software prefetch EP_PF bytes ahead in each weight row being read: the hardware
 * prefetcher alone leaves the step waiting on memory (SmolLM2-135M 8-bit, 2 threads of a
 * 2-core AVX-512 box: 10.7 ms a step without, 4.5 ms at 9 KiB ahead, the best of 1-16 KiB). */
#ifndef EP_PF
#define EP_PF 9216
#endif
static inline void prefetch_row(const void *row, size_t bytes) { /* the row EP_PF bytes on */
    for (size_t b = 0; EP_PF && b < bytes; b += 64) __builtin_prefetch((const char *)row + b + EP_PF);
}

/* token's row of the embedding table as float32 (times the family's embed_scale) */
static inline void embed_row(const Model *m, int token, float *x) {
    const int H = m->hidden;
    const size_t at = (size_t)token * H;
    if (m->embed_type == W_INT8_B32) {
        const int8_t *row = (const int8_t *)m->embed + at;
        const uint16_t *d = m->embed_b32 + (size_t)token * (H / 32);
        for (int b = 0; b < H / 32; b++) {
            const float s = f16_to_f32(d[b]) * m->embed_scale;
            for (int i = 32 * b; i < 32 * b + 32; i++) x[i] = (float)row[i] * s;
        }
        return;
    }
    if (m->embed_type == W_INT8) {
        const int8_t *row = (const int8_t *)m->embed + at;
        const float s = m->embed_rows[token] * m->embed_scale;
        for (int i = 0; i < H; i++) x[i] = (float)row[i] * s;
        return;
    }
    for (int i = 0; i < H; i++) x[i] = load_value(m->embed_type, m->embed, at + i);
    if (m->embed_scale != 1.f)
        for (int i = 0; i < H; i++) x[i] *= m->embed_scale;
}

static inline void rms_norm(const float *x, const float *w, float *y, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float inv = 1.f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * inv * w[i];
}

static inline void rotate(float *v, const float *cos, const float *sin, int D) {
    const int half = D / 2;
    for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* ------------------------------------------------------------------ the dispatch table
 * One per instruction set (arch/), the one in use picked at import (dispatch.c). */

/* y[r] = sum_k W[r, k] x[k] for r in [r0, r1): raw dot products, scales and biases applied by the caller */
typedef void (*gemv_fn)(const void *W, const float *x, int K, int r0, int r1, float *y);
/* gemv_fn for B sequences: y[b][r] for inputs x[b] (kernels.h, EP_SIMD_ROWS_BATCH) */
typedef void (*gemv_batch_fn)(const void *W, const float *const *x, int B, int K, int r0, int r1, float *const *y);
/* the same for int4 rows, over the input as prep_int4 made it */
typedef void (*int4_fn)(const Mat *m, const float *prep, int r0, int r1, float *y);
/* Attention of R query rows sharing one bfloat16 key/value head (a GQA group's heads; in a
 * prompt, the group's heads for several tokens): each key and value is read and converted to
 * float32 once for all the rows, not once per row (SmolLM2: 9 heads on 3 kv heads, so a
 * third of the cache reads and conversions). Row r sees positions [lo[r], hi[r]) and is left
 * with o[r] = sum_t e^(s_t - top[r]) v_t (not yet divided), top[r] (its highest score s_t =
 * scale q.k_t, capped to cap tanh(s / cap) where cap > 0: Gemma 2) and sum[r] = sum_t
 * e^(s_t - top[r]). Positions go in blocks of ATT_BLOCK, a row's sums rescaled when a block
 * holds a higher score (flash attention), so the scores need ATT_ROWS x ATT_BLOCK floats
 * whatever the context. */
#define ATT_ROWS 16
#define ATT_BLOCK 256
typedef struct {
    int R, D;
    const uint16_t *K, *V; /* position 0 of the key and the value head, [positions, D] */
    float scale, cap;
    float *s, *tmp; /* scratch (ATT_SCRATCH): ATT_ROWS x ATT_BLOCK scores, 8 positions' keys or values as float32 */
    const float *q[ATT_ROWS];
    float *o[ATT_ROWS];
    int lo[ATT_ROWS], hi[ATT_ROWS];
    float top[ATT_ROWS], sum[ATT_ROWS];
} Attend;
#define ATT_SCRATCH(D) ((size_t)ATT_ROWS * ATT_BLOCK + 8 * (size_t)(D))
typedef void (*attend_fn)(Attend *a);
/* out[r] = silu(gate[r]) * up[r] for r < n */
typedef void (*silu_fn)(const float *gate, const float *up, float *out, int n);
/* a GEMM register tile (kernels.h, EP_GEMM_TILE) */
typedef void (*tile_fn)(const float *w, int K, const float *xt, int ldx, float *raw);
typedef void (*halve_fn)(const uint16_t *s, uint16_t *d, size_t n); /* bfloat16 -> float16 */
/* int8 rows against the input rounded to int8 per block of 32 (prep_q8): raw dot products */
typedef void (*q8_fn)(const Mat *m, const void *prep, int r0, int r1, float *y);
/* q8_fn for B sequences: y[b][r] against prep[b] (batch.c), bitwise q8_fn's */
typedef void (*q8_batch_fn)(const Mat *m, const void *const *prep, int B, int r0, int r1, float *const *y);
/* W_INT8_B32 rows (an 8-bit table) against float32 x: y[r] = sum_b scale[r, b] (codes . x) over each block */
typedef void (*b32_fn)(const Mat *m, const float *x, int r0, int r1, float *y);

typedef struct {
    int lanes, max_tv, n_rb, rb[3];
    tile_fn tile[3][5]; /* [row-block kind][registers of tokens] */
} Tiles;

typedef struct {
    const char *name;
    gemv_fn gemv[4]; /* by weight type: W_INT8, W_BF16, W_F16, W_F32 */
    int4_fn int4;
    attend_fn attend;
    silu_fn silu;
    const Tiles *tiles;
    halve_fn bf16_to_f16;
    q8_fn int8_q8; /* NULL: this set has none, int8 rows take gemv[W_INT8] */
    gemv_batch_fn gemv_batch[4]; /* by weight type, bitwise gemv's; NULL: batch.c calls gemv per sequence */
    q8_batch_fn int8_q8_batch;   /* bitwise int8_q8's; NULL: batch.c calls int8_q8 per sequence */
    b32_fn int8_b32;             /* W_INT8_B32 rows: every set has one */
    q8_fn int8_b32_q8;           /* W_INT8_B32 rows against prep_q8's input; NULL: int8_b32 takes them */
    q8_fn int4_q8;               /* int4 rows against prep_int4's int8 input (act_bits 8); NULL: int4 takes them */
    q8_batch_fn int4_q8_batch;   /* bitwise int4_q8's; NULL: batch.c calls int4_q8 per sequence */
} Kernels;

extern const Kernels kernels_generic;
#if EP_X86
extern const Kernels kernels_avx2, kernels_avx512;
void bf16_to_f16_f16c(const uint16_t *s, uint16_t *d, size_t n);
void attend_avx2(Attend *a);
void int8_q8_avx2(const Mat *m, const void *prep, int r0, int r1, float *y);
void int8_q8_batch_avx2(const Mat *m, const void *const *prep, int B, int r0, int r1, float *const *y);
void int8_b32_q8_avx2(const Mat *m, const void *prep, int r0, int r1, float *y);
void int4_q8_avx2(const Mat *m, const void *prep, int r0, int r1, float *y);
void int4_q8_batch_avx2(const Mat *m, const void *const *prep, int B, int r0, int r1, float *const *y);
#endif
#if EP_ARM
extern const Kernels kernels_neon, kernels_neon_dotprod;
/* arch/arm/dotprod.c: the integer kernels of kernels_neon_dotprod (their signatures are gemv_fn's, int4_fn's) */
void gemv_int8_dotprod(const void *W, const float *x, int K, int r0, int r1, float *y);
void int4_rows_dotprod(const Mat *m, const float *prep, int r0, int r1, float *y);
#endif
extern const Kernels *kernels; /* the table in use */
/* Activations into int8 matrix-vector products of a decode step: 8 (the default: rounded to
 * int8 per block of 32 inputs, as llama.cpp's Q8_0 does: about half the instructions per
 * weight on AVX2, where converting each int8 weight to float32 bounds the float kernel;
 * SmolLM2-135M as packed by default, 3,867 tokens: perplexity +0.43% and mean KL 0.0021 to
 * the source, float32's +0.33% and 0.0014, llama.cpp Q8_0's +0.64% and 0.0040,
 * tests/bench/table_quality.py; with the default 8-bit tables, whose output layer then takes
 * int8 inputs too, +0.48% and 0.0030; int4 rows take them too, int4_q8: from the Q4_1
 * source +0.47% and 0.0031, float32's +0.02% and 0.00019, at 2.3x the decode speed) or 32
 * (float32: logits within 1e-4 of float64's).
 * EDGEPACK_ACTIVATION_BITS=32 or 8 at import. Only where the kernel set has int8_q8 (x86);
 * decode steps only (step.c, and batch.c bitwise alike): prompts keep float32. */
extern int act_bits;
void detect_isa(void);
const char *current_isa(void);
int set_isa(const char *name); /* 0, or -1 when this CPU lacks it */
const char *best_isa(void);

/* ------------------------------------------------------------------ threads (pool.c) */

typedef void (*task_fn)(void *ctx, int tid, int nth);
extern pthread_mutex_t step_lock; /* one caller of the pool at a time: it and a model's scratch are shared */
void pool_after_fork(void);
int ensure_workers(int n);
void parallel(task_fn fn, void *ctx, int nth);
/* parallel() over `rows` shared out in chunks of whole `unit`s: a task takes them with take_rows */
void parallel_rows(task_fn fn, void *ctx, int rows, int unit, int nth);
int take_rows(int tid, int nth, int *lo, int *hi);
/* the thread count for the next decode step (at most `most`), and its measured time after it */
int adapt_threads(int most);
void adapt_record(int nth, double seconds);
/* the same over a state of one's own (batched steps: their times are not one sequence's) */
typedef struct {
    double ema[MAX_THREADS + 1];
    int current, most, steps, probe_up;
    int backoff[2], skip[2]; /* per direction (0 fewer, 1 more): turns it sits out after a lost probe */
} Adapt;
int adapt_threads_of(Adapt *a, int most);
void adapt_record_of(Adapt *a, int nth, double seconds);
int adapt_current(void);
double pool_now(void);

/* rows [lo, hi) of `rows` for thread tid of nth, in multiples of 4 (the kernels' unit) */
static inline void split(int rows, int tid, int nth, int *lo, int *hi) {
    *lo = tid == 0 ? 0 : (int)(((long long)rows * tid / nth) & ~3LL);
    *hi = tid == nth - 1 ? rows : (int)(((long long)rows * (tid + 1) / nth) & ~3LL);
}

/* ------------------------------------------------------------------ one token (step.c) */

/* a decode step's attention (attend.c): work units of (kv head, heads of its group, part of the
 * positions), run by any thread in any order; split into parts of ATT_SPLIT positions whatever
 * the thread count (so the result is the same on any), merged after */
#define ATT_SPLIT 256
typedef struct {
    const float *q;          /* heads x D queries */
    float *out;              /* heads x D */
    const uint16_t *K, *V;   /* the layer's first kv head */
    size_t stride;           /* elements from one kv head to the next */
    int n, parts, hs, subs;  /* positions; parts; heads a unit; units of a kv head's group */
    float *partial;          /* parts > 1: heads x parts x (D + 2): o, top, sum of each */
} StepAttend;

int step_attend_plan(const Model *m, StepAttend *a, int n, int spread); /* the unit count, about `spread` or more */
void step_attend_unit(const Model *m, const StepAttend *a, int u, float *scratch);
void step_attend_merge(const Model *m, const StepAttend *a);
size_t step_attend_floats(const Model *m, int max_tokens); /* the partial sums of a cache of max_tokens */
float attend_scale(const Model *m);

typedef struct {
    Model *m;
    const Mat *mat;
    const float *in, *prep;
    float *out;
    int add; /* out += result (the residual stream) instead of out = result */
    /* attention */
    const uint16_t *kc, *vc;
    int n, max_tokens, layer;
    int cap;         /* positions the layer's cache holds (kv_positions) */
    size_t layer_at; /* where its keys / values start (kv_layer) */
    StepAttend *attend;
} Job;

enum { P_SERIAL, P_QKV, P_ATTN, P_O, P_GATE_UP, P_DOWN, P_HEAD, P_PARTS };
extern const char *PART_NAMES[P_PARTS];
/* what the pool counts while profiling (pool.c): parallel() calls, futex wakes the caller
 * issued to sleeping workers, the caller's sleeps waiting for them, and the caller's
 * seconds from finishing its own share to the last worker finishing (imbalance + hand-off) */
enum { S_CALLS, S_WAKES, S_CALLER_SLEEPS, S_COUNTS };
extern const char *SYNC_NAMES[S_COUNTS];
extern long sync_counts[S_COUNTS];
extern double sync_wait_seconds;
extern int profiling;
extern double part_seconds[P_PARTS];
extern long profiled_steps;

/* 1 where int4 rows take int8 inputs now: act_bits 8 and a kernel for it (x86) */
static inline int int4_q8_on(void) { return act_bits == 8 && kernels->int4_q8 != NULL; }
void prep_int4(const Mat *m, const float *x, void *prep);
int prep_q8(const Mat *m, const float *x, void *prep); /* 1 if the q8 kernel runs this matrix */
void task_mat(void *ctx, int tid, int nth);
void product(Job *j, task_fn task, const Mat *mat, const float *in, float *out, int add, int nth);
int grow_scores(Model *m, int max_tokens, int nth);
void run_step(Model *m, int token, int pos, uint16_t *kc, uint16_t *vc, int max_tokens, const float *cos,
              const float *sin, float *logits, int nth);

/* ------------------------------------------------------------------ many tokens (prompt.c) */

/* scratch of one prompt pass: activations of CHUNK tokens, per-thread weight rows and scores */
typedef struct {
    float *x, *h, *qkv, *att, *gu, *act, *w32, *scores, *rope, *xt;
    size_t w32_floats;
    uint16_t *win; /* sliding-window layers: the keys | values a chunk attends to, in order (prompt.c) */
} PromptScratch;

void rope_tables(float theta, int D, int pos, float *cos, float *sin);
void int4_rows_f32(const Mat *m, int r0, int r1, float *out);
int prompt_scratch(const Model *m, int nth, int max_tokens, PromptScratch *s);
void run_prompt(Model *m, const int *tokens, int T, int pos, uint16_t *kc, uint16_t *vc, int max_tokens, float theta,
                float *logits, int nth, PromptScratch *s);

/* ------------------------------------------------------------------ other families (family.c) */

void rope_from_freqs(const float *inv_freq, int R, int pos, float mult, float *cos, float *sin);
const float *rope_set(const Model *m, int last); /* the tables of a call whose last position is `last` */
void model_rope(Model *m, int pos, int last, float *cos, float *sin); /* each table's cos | sin, [n_ropes, 2, D] */
void qk_norm(const Model *m, const Layer *L, float *qkv);
void act_mul(const Model *m, const float *gate, const float *up, float *out, int n);
void soft_cap(float *v, int n, float cap);
void norm_add(const float *in, const float *w, float *x, float *tmp, int n, float eps); /* x += norm(in) */

/* ------------------------------------------------------------------ several sequences (batch.c) */

typedef struct {
    int token, pos, max_tokens; /* the token at position pos of a cache of max_tokens */
    uint16_t *kc, *vc;
    float *logits; /* [vocab] */
} BatchSeq;

/* one decode step of each of B sequences, bitwise run_step's for each; -1 if out of memory
 * (called under step_lock) */
int run_steps(Model *m, const BatchSeq *seqs, int B, float theta, int nth);

/* ------------------------------------------------------------------ convert.c, sample.c */

int fits_f16(const void *s, int st, size_t n, float divisor);
void convert_values(const void *s, int st, void *d, int dt, size_t n, float divisor);
void transpose32(const uint32_t *s, size_t rows, size_t cols, uint32_t *d);
/* a token id, or SAMPLE_EMPTY / SAMPLE_NOMEM */
enum { SAMPLE_EMPTY = -1, SAMPLE_NOMEM = -2 };
int sample(const float *logits, size_t n, float temperature, int top_k, float top_p, double u);
size_t argmax(const float *v, size_t n);

#endif
