/* tests/arm's test program: edgepack's engine (csrc/ without module.c, the Python bindings)
 * built for aarch64 and run under qemu. It reads a model and token calls written by
 * test_arm.py on x86 and writes the logits of each call back; or, with --kernels, checks
 * every kernel set this CPU runs against double-precision sums on random matrices.
 *
 *   driver MODEL CALLS OUT [threads]    prints "kernels: NAME", writes float32 [calls, vocab]
 *   driver --kernels                    prints one line per kernel set and weight type
 *
 * MODEL (little-endian): "EPARM1\0\0"; int32 hidden, heads, kv_heads, head_dim, inter,
 * vocab, layers, embed_type, max_tokens, 0; float32 eps, rope_theta; int64 embed, norm;
 * the head; per layer int64 in_norm, post_norm and the q/k/v, o, gate/up and down matrices;
 * int64 arena bytes, the arena. A matrix: int32 type, rows, cols, group; int64 weight,
 * scale, bias (-1: none). Every int64 is an offset into the arena, as the Python side's
 * engine laid it out. CALLS: int32 n; per call int32 fresh (1: an empty cache first),
 * int32 count, the token ids. */
#include <stdio.h>
#include <stdlib.h>

#include "engine.h"

static int32_t rd32(FILE *f) {
    int32_t v = 0;
    if (fread(&v, 4, 1, f) != 1) exit((fprintf(stderr, "short file\n"), 2));
    return v;
}
static int64_t rd64(FILE *f) {
    int64_t v = 0;
    if (fread(&v, 8, 1, f) != 1) exit((fprintf(stderr, "short file\n"), 2));
    return v;
}
static float rdf(FILE *f) {
    float v = 0;
    if (fread(&v, 4, 1, f) != 1) exit((fprintf(stderr, "short file\n"), 2));
    return v;
}

static char *arena;
static const void *at(int64_t off) { return off < 0 ? NULL : arena + off; }

static void rd_mat(FILE *f, int64_t *offs, Mat *m) {
    m->type = rd32(f), m->rows = rd32(f), m->cols = rd32(f), m->group = rd32(f);
    for (int i = 0; i < 3; i++) offs[i] = rd64(f);
}
static void fix_mat(const int64_t *offs, Mat *m) {
    m->w = at(offs[0]);
    m->scale = m->type == W_INT8 ? at(offs[1]) : NULL;
    m->sz = m->type == W_INT4 ? at(offs[1]) : NULL;
    m->bias = at(offs[2]);
}

static int run_model(const char *model_path, const char *calls_path, const char *out_path, int threads) {
    FILE *f = fopen(model_path, "rb");
    char magic[8];
    if (!f || fread(magic, 8, 1, f) != 1 || memcmp(magic, "EPARM1", 6)) return fprintf(stderr, "bad model file\n"), 2;
    Model *m = calloc(1, sizeof(Model));
    m->embed_scale = 1.f; /* as new() without features: a plain Llama layer (family.c) */
    m->hidden = rd32(f), m->heads = rd32(f), m->kv_heads = rd32(f), m->head_dim = rd32(f), m->inter = rd32(f);
    m->vocab = rd32(f), m->n_layers = rd32(f), m->embed_type = rd32(f);
    m->rot_dim = m->head_dim, m->rope_mult = 1.f; /* rotary over whole heads, as new() without features */
    const int max_tokens = rd32(f);
    rd32(f);
    m->eps = rdf(f);
    const float theta = rdf(f);
    const int64_t embed = rd64(f), norm = rd64(f);
    int64_t head[3], (*lay)[2 + 12] = malloc(sizeof *lay * m->n_layers);
    rd_mat(f, head, &m->head);
    m->layers = calloc(m->n_layers, sizeof(Layer));
    for (int l = 0; l < m->n_layers; l++) {
        Layer *L = &m->layers[l];
        lay[l][0] = rd64(f), lay[l][1] = rd64(f);
        rd_mat(f, lay[l] + 2, &L->qkv), rd_mat(f, lay[l] + 5, &L->o);
        rd_mat(f, lay[l] + 8, &L->gate_up), rd_mat(f, lay[l] + 11, &L->down);
    }
    const int64_t bytes = rd64(f);
    arena = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!arena || fread(arena, 1, bytes, f) != (size_t)bytes) return fprintf(stderr, "short arena\n"), 2;
    fclose(f);
    m->embed = at(embed), m->norm = at(norm);
    fix_mat(head, &m->head);
    for (int l = 0; l < m->n_layers; l++) {
        Layer *L = &m->layers[l];
        L->in_norm = at(lay[l][0]), L->post_norm = at(lay[l][1]);
        fix_mat(lay[l] + 2, &L->qkv), fix_mat(lay[l] + 5, &L->o), fix_mat(lay[l] + 8, &L->gate_up);
        fix_mat(lay[l] + 11, &L->down);
    }
    /* the scratch module.c's new() allocates */
    const int H = m->hidden, qkv = (m->heads + 2 * m->kv_heads) * m->head_dim, qn = m->heads * m->head_dim;
    m->x = malloc(((size_t)H * 2 + qkv + qn + 2 * (size_t)m->inter + H + m->inter) * sizeof(float));
    const int widest = H > m->inter ? (H > qn ? H : qn) : (m->inter > qn ? m->inter : qn);
    m->prep = malloc(((size_t)widest + widest / 32 + 1) * sizeof(float));
    m->h = m->x + H, m->qkv = m->h + H, m->att = m->qkv + qkv, m->gu = m->att + qn, m->tmp = m->gu + 2 * (size_t)m->inter;

    const size_t cache = (size_t)m->n_layers * m->kv_heads * max_tokens * m->head_dim;
    uint16_t *kc = calloc(cache, 2), *vc = calloc(cache, 2);
    float *logits = malloc(sizeof(float) * m->vocab);
    FILE *c = fopen(calls_path, "rb"), *out = fopen(out_path, "wb");
    if (!c || !out) return fprintf(stderr, "cannot open the calls or the output\n"), 2;
    const int ncalls = rd32(c);
    threads = ensure_workers(threads - 1) < threads ? ensure_workers(threads - 1) : threads;
    int pos = 0;
    for (int i = 0; i < ncalls; i++) {
        if (rd32(c)) pos = 0;
        const int n = rd32(c);
        int *tokens = malloc(sizeof(int) * n);
        for (int t = 0; t < n; t++) tokens[t] = rd32(c);
        if (pos + n > max_tokens) return fprintf(stderr, "the calls overrun the cache\n"), 2;
        if (n == 1) { /* as module.c's forward() */
            float rope[2 * 512];
            grow_scores(m, max_tokens, threads);
            rope_tables(theta, m->head_dim, pos, rope, rope + m->head_dim);
            run_step(m, tokens[0], pos, kc, vc, max_tokens, rope, rope + m->head_dim, logits, threads);
        } else {
            PromptScratch s;
            if (prompt_scratch(m, threads, max_tokens, &s)) return fprintf(stderr, "out of memory\n"), 2;
            run_prompt(m, tokens, n, pos, kc, vc, max_tokens, theta, logits, threads, &s);
            free(s.x);
        }
        pos += n;
        fwrite(logits, sizeof(float), m->vocab, out);
        free(tokens);
    }
    fclose(out);
    fclose(c);
    return 0;
}

/* ------------------------------------------------------------------ --kernels */

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static double uniform(void) { /* xorshift64*, in [-1, 1) */
    rng ^= rng >> 12, rng ^= rng << 25, rng ^= rng >> 27;
    return (double)((rng * 0x2545f4914f6cdd1dull) >> 11) / 4503599627370496.0 - 1.0;
}

/* one matrix of each type and shape (int4: and group) through the set in use: the worst
 * |y - exact| / max|exact| */
static double check(int type, int rows, int cols, int group) {
    const int esize = type == W_INT8 || type == W_INT8_B32 ? 1 : type == W_F32 ? 4 : 2;
    const size_t n = (size_t)rows * cols;
    void *w = malloc(type == W_INT4 ? n / 2 : n * esize);
    uint16_t *sz = malloc(sizeof(uint16_t) * 2 * (n / group + 1));
    float *x = malloc(sizeof(float) * cols), *y = malloc(sizeof(float) * rows);
    float *prep = malloc(sizeof(float) * (cols + cols / 32 + 1));
    double *exact = calloc(rows, sizeof(double));
    for (int k = 0; k < cols; k++) x[k] = (float)(uniform() * (k % 7 == 0 ? 8.0 : 1.0)); /* a few large values */
    Mat m = {.type = type, .rows = rows, .cols = cols, .w = w, .sz = sz, .group = group};
    for (int r = 0; r < rows; r++)
        for (int k = 0; k < cols; k++) {
            const size_t i = (size_t)r * cols + k;
            double v;
            if (type == W_INT8_B32) { /* an 8-bit table: a float16 scale per block of 32 */
                const size_t at = (size_t)r * (cols / 32) + k / 32;
                if (k % 32 == 0) sz[at] = f32_to_f16((float)(uniform() + 1.5) / 256);
                ((int8_t *)w)[i] = (int8_t)lrint(uniform() * 127);
                v = (double)((int8_t *)w)[i] * f16_to_f32(sz[at]);
            } else if (type == W_INT4) {
                if (k % 2 == 0) ((uint8_t *)w)[i / 2] = (uint8_t)((rng >> 7) & 0xff), uniform();
                const size_t at = ((size_t)r * (cols / group) + k / group) * 2;
                if (k % group == 0) {
                    sz[at] = f32_to_bf16((float)uniform() / 8);
                    sz[at + 1] = f32_to_bf16((float)uniform() / 8);
                }
                const int q = k % 2 ? ((uint8_t *)w)[i / 2] >> 4 : ((uint8_t *)w)[i / 2] & 15;
                v = (q - 8) * (double)bf16_to_f32(sz[at]) + bf16_to_f32(sz[at + 1]);
            } else {
                const float f = (float)uniform();
                if (type == W_INT8) ((int8_t *)w)[i] = (int8_t)lrint(f * 127);
                else if (type == W_BF16) ((uint16_t *)w)[i] = f32_to_bf16(f);
                else if (type == W_F16) ((uint16_t *)w)[i] = f32_to_f16(f);
                else ((float *)w)[i] = f;
                v = load_value(type, w, i);
            }
            exact[r] += v * x[k];
        }
    if (type == W_INT4) {
        prep_int4(&m, x, prep);
        kernels->int4(&m, prep, 0, rows, y);
    } else if (type == W_INT8_B32)
        kernels->int8_b32(&m, x, 0, rows, y);
    else
        kernels->gemv[type](w, x, cols, 0, rows, y);
    double top = 0, err = 0;
    for (int r = 0; r < rows; r++) {
        top = fabs(exact[r]) > top ? fabs(exact[r]) : top;
        err = fabs(y[r] - exact[r]) > err ? fabs(y[r] - exact[r]) : err;
    }
    free(w), free(sz), free(x), free(y), free(prep), free(exact);
    return err / top;
}

static int run_kernels(void) {
    static const char *sets[] = {"neon-dotprod", "neon", "generic"};
    static const char *names[] = {"int8", "bf16", "f16", "f32", "int4", "int8_b32"};
    /* the last one past the integer kernels' stack buffers (16384 inputs): their float fallback */
    static const int shapes[][2] = {{1, 16}, {7, 37}, {33, 200}, {130, 576}, {5, 4096}, {3, 16400}};
    /* rows, columns, group: the default group of 32 and larger ones (several blocks a group) */
    static const int int4_shapes[][3] = {{1, 32, 32}, {7, 64, 32}, {33, 576, 32}, {130, 1536, 32}, {9, 512, 128}, {6, 384, 64}};
    int bad = 0;
    for (int s = 0; s < 3; s++) {
        if (set_isa(sets[s])) continue;
        for (int type = 0; type <= W_INT8_B32; type++) {
            double worst = 0;
            const int count = 6;
            for (int i = 0; i < count; i++) {
                const double e = type == W_INT8_B32 ? check(type, int4_shapes[i][0], int4_shapes[i][1], 32)
                                 : type == W_INT4 ? check(type, int4_shapes[i][0], int4_shapes[i][1], int4_shapes[i][2])
                                                : check(type, shapes[i][0], shapes[i][1], 32);
                worst = e > worst ? e : worst;
            }
            printf("%-13s %-5s worst error %.2e of the largest output\n", sets[s], names[type], worst);
            bad |= !(worst <= 1e-5); /* float32 rounding (the dot-product set's 24-bit activations too) */
        }
    }
    return bad;
}

int main(int argc, char **argv) {
    detect_isa();
    if (argc == 2 && !strcmp(argv[1], "--kernels")) return run_kernels();
    if (argc < 4) return fprintf(stderr, "usage: driver MODEL CALLS OUT [threads] | driver --kernels\n"), 2;
    printf("kernels: %s\n", current_isa());
    return run_model(argv[1], argv[2], argv[3], argc > 4 ? atoi(argv[4]) : 2);
}
